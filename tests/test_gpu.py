"""Accelerator checks (``pytest -m gpu`` on a GPU/TPU machine; skipped on CPU): bf16 weights with fp32
accumulation track the fp32 forward on a ~1B-shaped random model, a (1, n) tensor-parallel mesh over the
local accelerators gives the single-device logits, and the serving engine keeps rows with different
interventions isolated there (same tokens together as alone)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.model import sharding
from jaxpersona.model.config import from_hf_config
from jaxpersona.model.transformer import forward
from jaxpersona.model.params import init_params

pytestmark = pytest.mark.gpu

ONE_B = {"model_type": "llama", "vocab_size": 32768, "hidden_size": 2048, "intermediate_size": 8192,
         "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}


def test_bf16_tracks_fp32_on_a_1b_model() -> None:
    cfg = from_hf_config(ONE_B)
    p32 = init_params(cfg, jax.random.key(0), jnp.float32)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    tokens = jax.random.randint(jax.random.key(1), (4, 256), 0, cfg.vocab_size)
    f = jax.jit(lambda p, t: forward(p, cfg, t).logits)
    a, b = np.asarray(f(p32, tokens)), np.asarray(f(p16, tokens))
    assert np.all(np.isfinite(b)) and b.dtype == np.float32
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_tensor_parallel_mesh_over_the_local_accelerators() -> None:
    n = jax.local_device_count()
    cfg = from_hf_config({**ONE_B, "num_hidden_layers": 4})
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, cfg.vocab_size)
    f = jax.jit(lambda p, t: forward(p, cfg, t).logits)
    ref = np.asarray(f(params, tokens))
    mesh = sharding.make_mesh((1, n))
    got = np.asarray(f(sharding.shard_params(params, cfg, mesh), tokens))
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=2e-3)


def test_serving_engine_on_the_accelerator_isolates_rows() -> None:
    """SmolLM2 in bf16 on the accelerator, 8 rows: requests with different interventions submitted together
    give the greedy tokens each gives alone (the serving claim, where kernels are picked per shape)."""
    import queue

    from jaxpersona.compute.handle import load
    from jaxpersona.serve.engine import Engine, EngineConfig, Item, Sequence

    m = load("smollm2-135m-instruct", "bfloat16")
    n, d = m.cfg.n_resid, m.cfg.d_model
    v = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    w = np.zeros(n, np.float32)
    w[12] = 1.0
    items = [[], [Item(v * 0.5, 1.0, steer_w=w)], [Item(v, lo=np.full(n, -np.inf, np.float32),
                                                          hi=np.zeros(n, np.float32), cap_w=w)]] * 4
    prompts = [m.tokenizer.encode(m.format_chat([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in ("Tell me about your day.", "Name three colours.", "Why is the sky blue?")] * 4
    eng = Engine(m.params, m.cfg, m.tokenizer, m.eos_ids, m.pad_id, EngineConfig(batch=8, max_context=256,
                                                                                prefill_rows=4))
    eng.start()

    def run(indices: list[int]) -> dict[int, list[int]]:
        qs = {}
        for i in indices:
            qs[i] = queue.Queue()
            eng.submit([Sequence(0, prompts[i], 24, qs[i], items=items[i], logprobs=0, ignore_eos=True)])
        out = {}
        for i, q in qs.items():
            toks = []
            while (ev := q.get(timeout=600))[0] != "done":
                toks.append(ev[3][0])
            out[i] = toks
        return out

    try:
        alone = {i: run([i])[i] for i in range(3)}
        together = run(list(range(12)))
    finally:
        eng.stop()
    assert alone[0] != alone[1]
    for i in range(12):
        assert together[i] == alone[i % 3], i
