"""Accelerator checks (``pytest -m gpu`` on a GPU/TPU machine; skipped on CPU): bf16 weights with fp32
accumulation track the fp32 forward on a ~1B-shaped random model, and a (1, n) tensor-parallel mesh over the
local accelerators gives the single-device logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona import sharding
from jaxpersona.config import from_hf_config
from jaxpersona.models.transformer import forward, init_params

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
