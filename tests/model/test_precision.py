"""Mixed precision (``matmul_dtype="bfloat16"`` under float32 activations) against HF transformers + torch.

The reference is the HF model (fp32, eager) with every ``nn.Linear`` and the embedding table rounded to bfloat16
and every ``nn.Linear`` input rounded to bfloat16 (a forward pre-hook). A product of two bfloat16 numbers is exact
in float32, so that reference computes what a bfloat16 matmul with float32 accumulation computes, up to summation
order — and to the inputs that summation order moves across a bfloat16 rounding boundary, which then differ by one
bfloat16 step. So most logits agree exactly and the rest by far less than the float32 forward's distance from the
same reference (a forward that kept float32 products is that far away).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from jaxpersona import errors
from jaxpersona.compute.generate import generate
from jaxpersona.compute.handle import load, model_fingerprint
from jaxpersona.model.params import MATMUL_WEIGHTS, activation_dtype, matmul_weight_dtype, with_matmul_dtype
from jaxpersona.model.transformer import forward

TOKENS, VALID = hf_tiny.left_padded_batch()
fwd = jax.jit(forward, static_argnames=("cfg", "capture", "logits"))


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def hf_bf16_matmuls(hf):
    """A copy of ``hf`` whose linear layers (and LM head) multiply bfloat16-rounded inputs by bfloat16-rounded
    weights in float32, and whose embedding table is bfloat16-rounded."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(bf16_round(m.weight))
                m.register_forward_pre_hook(lambda mod, args: (bf16_round(args[0]), *args[1:]))
        emb = ref.get_input_embeddings()
        emb.weight.copy_(bf16_round(emb.weight))
    return ref


def hf_logits(hf) -> np.ndarray:
    ids = torch.tensor(np.asarray(TOKENS), dtype=torch.long)
    mask = torch.tensor(np.asarray(VALID), dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()


def test_mixed_precision_forward_matches_hf_with_bfloat16_products(tiny) -> None:
    params = with_matmul_dtype(tiny.params, "bfloat16")
    ours = np.asarray(fwd(params, tiny.cfg, jnp.asarray(TOKENS), valid=jnp.asarray(VALID)).logits)
    ref = hf_logits(hf_bf16_matmuls(tiny.hf))
    full = hf_logits(tiny.hf)
    v = np.asarray(VALID)
    err, err_full = np.abs(ours - ref)[v], np.abs(full - ref)[v]
    # most logits match the reference exactly; the rest differ where a product's input sits on a bfloat16 rounding
    # boundary and the two sides' float32 sums (equal to ~1e-6) round it to neighbouring values. Measured: mean
    # |diff| 3e-8 .. 1e-3 against the float32 forward's 7e-3 .. 1.4e-2 from the same reference.
    assert np.median(err) <= 0.2 * np.median(err_full), tiny.family
    assert err.mean() < 0.25 * err_full.mean(), f"{tiny.family}: mean |diff| {err.mean():.2e} vs {err_full.mean():.2e}"
    assert err.max() < 0.5 * err_full.max(), f"{tiny.family}: max |diff| {err.max():.2e} vs {err_full.max():.2e}"


def test_only_the_matmul_weights_are_narrowed_and_the_products_are_bfloat16(tiny_llama) -> None:
    params = with_matmul_dtype(tiny_llama.params, jnp.bfloat16)
    for name, w in params["layers"].items():
        assert w.dtype == (jnp.bfloat16 if name in MATMUL_WEIGHTS else jnp.float32), name
    assert params["embed"].dtype == jnp.bfloat16 and params["final_norm"].dtype == jnp.float32
    assert activation_dtype(params) == jnp.float32 and matmul_weight_dtype(params) == jnp.bfloat16
    out = fwd(params, tiny_llama.cfg, jnp.asarray(TOKENS), valid=jnp.asarray(VALID), capture=None)
    assert out.logits.dtype == jnp.float32
    hlo = fwd.lower(params, tiny_llama.cfg, jnp.asarray(TOKENS), valid=jnp.asarray(VALID)).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert any("bf16" in line for line in dots), "no bfloat16 product in the compiled forward"


def test_greedy_tokens_under_mixed_precision_are_the_same_alone_or_in_a_batch(tiny_llama) -> None:
    params = with_matmul_dtype(tiny_llama.params, "bfloat16")
    tok, val = jnp.asarray(TOKENS), jnp.asarray(VALID)
    batch = generate(params, tiny_llama.cfg, tok, val, max_new_tokens=8).tokens
    for i in range(tok.shape[0]):
        alone = generate(params, tiny_llama.cfg, tok[i : i + 1], val[i : i + 1], max_new_tokens=8).tokens
        np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(batch[i]))


def test_layer_weights_held_as_bits_give_the_same_numbers_and_share_memory(tiny_llama) -> None:
    """``layers_as_bits`` (what the serving engine holds on a CPU): the bfloat16 layer weights as their uint16 bits,
    the same memory; a forward with a KV cache (prefill, then a decode step) gives the same numbers bit for bit."""
    from jaxpersona.model.transformer import KVCache, layers_as_bits

    cfg = tiny_llama.cfg
    params = with_matmul_dtype(tiny_llama.params, "bfloat16")
    bits = layers_as_bits(params)
    for name, w in bits["layers"].items():
        assert w.dtype == (jnp.uint16 if name in MATMUL_WEIGHTS else jnp.float32), name
        assert w.unsafe_buffer_pointer() == params["layers"][name].unsafe_buffer_pointer(), name
    assert matmul_weight_dtype(bits) == jnp.bfloat16 and bits["embed"] is params["embed"]
    f32 = layers_as_bits(tiny_llama.params)
    assert all(f32["layers"][k] is w for k, w in tiny_llama.params["layers"].items())
    step = jax.jit(forward, static_argnames=("cfg", "logits"))
    tok, val = jnp.asarray(TOKENS), jnp.asarray(VALID)
    outs = []
    for p in (params, bits):
        first = step(p, cfg, tok, valid=val, cache=KVCache.empty(cfg, tok.shape[0], 16, jnp.float32), cache_index=0)
        nxt = jnp.argmax(first.logits[:, -1], axis=-1)[:, None]
        outs.append((first.logits, step(p, cfg, nxt, cache=first.cache, cache_index=tok.shape[1]).logits))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama, word_tokenizer, tmp_path_factory):
    """The tiny llama's HF directory with a tokenizer and chat template: what ``load`` and the CLI read."""
    path = tmp_path_factory.mktemp("tiny_llama_chat")
    shutil.copytree(tiny_llama.path, path, dirs_exist_ok=True)
    word_tokenizer(TEMPLATE).save_pretrained(path)
    return path


def test_load_takes_a_matmul_dtype_and_keeps_float32_fingerprints(tiny_dir) -> None:
    plain = load(tiny_dir)
    same = load(tiny_dir, matmul_dtype="float32")
    mixed = load(tiny_dir, matmul_dtype="bfloat16")
    assert matmul_weight_dtype(mixed.params) == jnp.bfloat16 and activation_dtype(mixed.params) == jnp.float32
    assert model_fingerprint(plain) == model_fingerprint(same)  # float32 run directories keep their cache keys
    assert model_fingerprint(mixed) != model_fingerprint(plain)  # ... and never serve a mixed run's work
    with pytest.raises(errors.UnsupportedDtypeError, match="wider"):
        load(tiny_dir, dtype="bfloat16", matmul_dtype="float32")
    with pytest.raises(errors.UnsupportedDtypeError):
        load(tiny_dir, matmul_dtype="float16")


def test_cli_takes_matmul_dtype(tiny_dir) -> None:
    r = subprocess.run([sys.executable, "-m", "jaxpersona", "chat", "the cat", "--model", str(tiny_dir),
                        "--matmul-dtype", "bfloat16", "--max-new-tokens", "4"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "jaxpersona", "chat", "the cat", "--model", str(tiny_dir),
                          "--matmul-dtype", "int8"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "int8" in bad.stderr
