"""A prefill into a KV cache on a CPU scans the cache layer by layer (``transformer.streams_cache``) instead of
carrying it through the layer scan: the same keys, values and logits as the carried cache, to float rounding
(XLA fuses the two programs differently; on SmolLM2's 40 x 64 prefill they agree bit for bit), for every family,
a span of layers and a sweep's vmapped points; and no layer of the cache is copied out of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_checks import cache_copies

from jaxpersona.model import transformer
from jaxpersona.model.transformer import KVCache, Recorder, embed, forward, prepare, run_layers


def _prefill(params, cfg, tokens, valid, slots: int):
    out = forward(params, cfg, tokens, valid=valid, cache=KVCache.empty(cfg, tokens.shape[0], slots, jnp.float32))
    return out.logits, out.kv()


def _carried(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on this test traces the carried cache (jit's caches would otherwise hand back the streamed trace)."""
    monkeypatch.setattr(transformer, "streams_cache", lambda *a: False)
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _fresh_traces():
    """No trace of the carried cache outlives its test (nor does one from before reach it)."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def test_streamed_prefill_equals_the_carried_cache(tiny, monkeypatch):
    cfg, params = tiny.cfg, tiny.params
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(5, 100, (3, 7)).astype(np.int32))
    valid = jnp.asarray(np.arange(7)[None, :] >= np.asarray([0, 2, 4])[:, None])  # left padding
    assert transformer.streams_cache(embed(params, cfg, tokens), jnp.int32(0), None)
    logits, kv = jax.jit(_prefill, static_argnums=(1, 4))(params, cfg, tokens, valid, 12)
    _carried(monkeypatch)
    ref_logits, ref_kv = jax.jit(_prefill, static_argnums=(1, 4))(params, cfg, tokens, valid, 12)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(kv), jax.tree.leaves(ref_kv)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_span_and_vmapped_points_stream_the_same(tiny_llama, monkeypatch):
    """Layers outside the span leave their cache layer as it was (a sweep's trunk); under ``vmap`` over points
    (each its own cache) the same holds point by point."""
    cfg, params = tiny_llama.cfg, tiny_llama.params
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(5, 100, (2, 5)).astype(np.int32))
    valid = jnp.ones((2, 5), bool)
    start = jnp.asarray(rng.standard_normal((2, cfg.n_layers, 2, cfg.n_kv_heads, 9, cfg.head_dim)), jnp.float32)

    def part(k, lo):
        cache = KVCache(k, k + 1.0, jnp.zeros((2, 9), bool))
        prep = prepare(cfg, valid, cache=cache, cache_index=2)
        h0 = embed(params, cfg, tokens)
        rec = Recorder.make(cfg, None, valid)
        h, _, out = run_layers(params, cfg, h0, prep, jnp.zeros((0,), h0.dtype), rec, cache=cache, cache_index=2,
                               span=(lo, jnp.int32(cfg.n_layers)))
        return h, out.k, out.v

    run = jax.jit(jax.vmap(part, in_axes=(0, None)))
    got = run(start, jnp.int32(1))
    _carried(monkeypatch)
    want = jax.jit(jax.vmap(part, in_axes=(0, None)))(start, jnp.int32(1))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[1][:, 0]), np.asarray(start[:, 0]))  # layer 0: outside the span


def test_no_layer_of_the_cache_is_copied_out(tiny_llama, monkeypatch):
    """What the streamed cache saves: the carried prefill's program copies each layer's keys and values out of the
    whole ``[L, B, KV, S, hd]`` cache (after rewriting it) before attending; the streamed one takes its layers in
    as the scan's slices."""
    cfg, params = tiny_llama.cfg, tiny_llama.params
    tokens = jnp.ones((2, 6), jnp.int32)
    valid = jnp.ones((2, 6), bool)

    def hlo() -> str:
        return jax.jit(_prefill, static_argnums=(1, 4)).lower(params, cfg, tokens, valid, 40).compile().as_text()

    streamed = hlo()
    _carried(monkeypatch)
    carried = hlo()
    assert not cache_copies(streamed, cfg), cache_copies(streamed, cfg)
    assert cache_copies(carried, cfg)  # the check sees the copies it is about


def test_decode_steps_and_server_chunks_keep_the_carried_cache():
    """One new token a row (a decode step, read in place by the attention kernel), a slot per row or a blocked
    span (a server's prefill chunks) keep the carried cache."""
    h = jnp.zeros((2, 1, 8))
    assert not transformer.streams_cache(h, jnp.int32(3), None)
    several = jnp.zeros((2, 4, 8))
    assert not transformer.streams_cache(several, jnp.asarray([3, 5]), None)
    assert not transformer.streams_cache(several, jnp.int32(3), transformer.Blocked(4, 8))
    assert transformer.streams_cache(several, jnp.int32(3), None) == (jax.default_backend() == "cpu")
