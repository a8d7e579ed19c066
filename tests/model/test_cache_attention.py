"""The CPU kernel for a decode step's attention over one layer of the carried KV cache
(jaxpersona.model.cache_attention): exact to fp32 rounding against a float64 reference, XLA's attention within
fp32 rounding, a row's bits its own (alone, in any batch, vmapped as one call), and used by the library's and
the server's decode steps without a copy of the cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.model import cache_attention, skinny, transformer
from jaxpersona.model.config import ModelConfig

from test_skinny import machine_can_build  # tests/model is on the path (pytest prepend mode)


def config(heads: int, kv: int, hd: int, softcap: float | None = None) -> ModelConfig:
    return ModelConfig("llama", 64, heads * hd, 3, heads, kv, hd, 64, 256, attn_softcap=softcap)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float) -> np.ndarray:
    """float64 GQA attention: q [B,T,H,hd], k/v [B,KV,S,hd], mask [B,T,S] -> [B,T,H*hd] (no key: zeros)."""
    b, t, h, hd = q.shape
    g = h // k.shape[1]
    out = np.zeros((b, t, h, hd))
    for hi in range(h):
        s = np.einsum("btd,bsd->bts", q[:, :, hi].astype(np.float64), k[:, hi // g].astype(np.float64)) * scale
        s = np.where(mask, s, -np.inf)
        mx = s.max(-1, keepdims=True)
        e = np.where(mask, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0.0)
        p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
        out[:, :, hi] = np.einsum("bts,bsd->btd", p, v[:, hi // g].astype(np.float64))
    return out.reshape(b, t, h * hd)


def case(seed: int, b: int, t: int, h: int, kv: int, hd: int, s: int, layers: int = 3):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, hd)).astype(np.float32)
    k = rng.standard_normal((layers, b, kv, s, hd)).astype(np.float32)
    v = rng.standard_normal((layers, b, kv, s, hd)).astype(np.float32)
    filled = rng.integers(t, s + 1, b)  # each row its own number of slots in use; causal over the last t
    slots = np.arange(s)
    q_slot = filled[:, None] - t + np.arange(t)[None, :]
    mask = (slots[None, None, :] <= q_slot[:, :, None]) & (slots[None, None, :] < filled[:, None, None])
    return q, k, v, mask


def need_kernel() -> bool:
    if not skinny.available():
        assert not machine_can_build(), skinny.unavailable_reason()  # not a skip: CI's machine builds it
        return False
    return True


@pytest.mark.parametrize("b,t,h,kv,hd,s", [(16, 1, 9, 3, 64, 96), (3, 1, 14, 2, 64, 37), (2, 5, 4, 1, 256, 40),
                                           (4, 3, 8, 8, 32, 17), (1, 1, 2, 1, 16, 1)])
def test_matches_a_float64_reference_for_every_layer(b, t, h, kv, hd, s):
    """GQA groups of 1-7 heads, head sizes 16-256, a query chunk of several tokens (causal), slot counts that are
    not multiples of 16, rows with different numbers of slots in use."""
    if not need_kernel():
        return
    q, k, v, mask = case(b * 100 + s, b, t, h, kv, hd, s)
    cfg = config(h, kv, hd)
    f = jax.jit(lambda q, k, v, layer, mask: cache_attention.attend(cfg, q, k, v, layer, mask))
    for layer in range(3):
        got = np.asarray(f(q, k, v, jnp.int32(layer), mask))
        ref = reference(q, k[layer], v[layer], mask, cfg.scale)
        assert got.shape == (b, t, h * hd)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(v).max())
        xla = np.asarray(transformer.attention(cfg, jnp.asarray(q), jnp.asarray(k[layer]), jnp.asarray(v[layer]),
                                               jnp.asarray(mask)))
        np.testing.assert_allclose(got, xla, rtol=0, atol=2e-5 * np.abs(v).max())


def test_only_the_first_slots_are_read_and_a_row_without_keys_gets_zeros():
    """``mask [B, T, Sm]`` with Sm < S reads slots < Sm only (NaN beyond them changes nothing); a row that may
    attend nothing (a padding row) gets zeros, not NaN."""
    if not need_kernel():
        return
    q, k, v, mask = case(1, 4, 1, 6, 2, 32, 48)
    mask = mask[..., :32].copy()
    mask[2] = False
    k[:, :, :, 32:], v[:, :, :, 32:] = np.nan, np.nan
    cfg = config(6, 2, 32)
    got = np.asarray(jax.jit(lambda *a: cache_attention.attend(cfg, *a))(q, k, v, jnp.int32(1), mask))
    assert np.isfinite(got).all() and (got[2] == 0).all()
    keep = [0, 1, 3]
    np.testing.assert_allclose(got[keep], reference(q, k[1, :, :, :32], v[1, :, :, :32], mask, cfg.scale)[keep],
                               rtol=0, atol=1e-4)


def test_a_row_gets_the_same_bits_alone_in_any_batch_and_vmapped_as_one_call():
    """The server's and the sweeps' invariant: a row's numbers do not depend on the rows or grid points beside
    it; a vmap over grid points is one custom call (no loop) with the same bits as one call per point."""
    if not need_kernel():
        return
    q, k, v, mask = case(2, 8, 1, 9, 3, 64, 40)
    cfg = config(9, 3, 64)
    f = jax.jit(lambda *a: cache_attention.attend(cfg, *a))
    whole = np.asarray(f(q, k, v, jnp.int32(2), mask))
    for rows in ([3], [0, 5], [7, 1, 2]):
        part = np.asarray(f(q[rows], k[:, rows], v[:, rows], jnp.int32(2), mask[rows]))
        assert (part == whole[rows]).all()
    points = 3
    qp = np.stack([q * (i + 1) for i in range(points)])
    kp = np.stack([k + i for i in range(points)])
    g = jax.jit(jax.vmap(lambda q, k, layer: cache_attention.attend(cfg, q, k, jnp.asarray(v), layer, mask),
                         in_axes=(0, 0, None)))
    hlo = g.lower(qp, kp, jnp.int32(2)).compile().as_text()
    assert hlo.count(f'custom_call_target="{cache_attention.TARGET}"') == 1 and "while" not in hlo
    batched = np.asarray(g(qp, kp, jnp.int32(2)))
    for i in range(points):
        assert (batched[i] == np.asarray(f(qp[i], kp[i], v, jnp.int32(2), mask))).all()


def test_where_it_does_not_apply_the_layer_keeps_xlas_attention_exactly():
    """A softcapped model (Gemma 2), bfloat16, a head size that is not a multiple of 16, or a chunk of several
    new tokens a row (a server's prefill: a small matmul, faster in XLA) keep XLA's attention of the layer's
    slice, bit for bit."""
    qc, kc, vc, mc = (jnp.asarray(a) for a in case(7, 2, 4, 4, 2, 32, 20))
    got = transformer.layer_attention(config(4, 2, 32), qc, kc, vc, jnp.int32(1), mc)
    assert (np.asarray(got) == np.asarray(transformer.attention(config(4, 2, 32), qc, kc[1], vc[1], mc))).all()
    q, k, v, mask = case(3, 2, 1, 4, 2, 24, 20)
    for cfg, dtype in ((config(4, 2, 24), jnp.float32), (config(4, 2, 32, softcap=50.0), jnp.float32),
                       (config(4, 2, 32), jnp.bfloat16)):
        hd = cfg.head_dim
        qq, kk, vv = (jnp.asarray(np.resize(a, (*a.shape[:-1], hd))).astype(dtype) for a in (q, k, v))
        assert not cache_attention.applies(cfg, qq, kk)
        got = transformer.layer_attention(cfg, qq, kk, vv, jnp.int32(1), jnp.asarray(mask))
        ref = transformer.attention(cfg, qq, kk[1], vv[1], jnp.asarray(mask))
        assert (np.asarray(got, np.float32) == np.asarray(ref, np.float32)).all()


def test_a_shared_prefix_is_attended_first_and_stays_one_array_under_vmap():
    """A :class:`~jaxpersona.model.transformer.KVPrefix` (a sweep's prompt, shared by every grid point): its slots
    come before the cache's own, as one cache of ``P + S`` slots (float64 reference, and XLA's split attention);
    vmapped over points with the prefix unbatched it is one call, the same bits as one call per point."""
    if not need_kernel():
        return
    b, h, kv, hd, pre, own = 5, 9, 3, 64, 30, 12
    q, k, v, mask = case(4, b, 1, h, kv, hd, pre + own)
    cfg = config(h, kv, hd)
    pk, pv = jnp.asarray(k[:, :, :, :pre]), jnp.asarray(v[:, :, :, :pre])
    ok, ov = np.ascontiguousarray(k[:, :, :, pre:]), np.ascontiguousarray(v[:, :, :, pre:])
    f = jax.jit(lambda q, k, v, mask, pk, pv: cache_attention.attend(cfg, q, k, v, jnp.int32(1), mask, (pk, pv)))
    got = np.asarray(f(q, ok, ov, mask, pk, pv))
    np.testing.assert_allclose(got, reference(q, k[1], v[1], mask, cfg.scale), rtol=0, atol=1e-4)
    split = transformer.attention(cfg, jnp.asarray(q), jnp.asarray(ok[1]), jnp.asarray(ov[1]), jnp.asarray(mask),
                                  prefix=(pk[1], pv[1]))
    np.testing.assert_allclose(got, np.asarray(split), rtol=0, atol=1e-4)
    whole = np.asarray(jax.jit(lambda *a: cache_attention.attend(cfg, *a))(q, k, v, jnp.int32(1), mask))
    assert (got == whole).all()  # the same keys in the same slot order: the same bits as one cache
    points = 4
    qp, okp = np.stack([q * (i + 1) for i in range(points)]), np.stack([ok - i for i in range(points)])
    g = jax.jit(jax.vmap(lambda q, k: cache_attention.attend(cfg, q, k, jnp.asarray(ov), jnp.int32(1),
                                                             jnp.asarray(mask), (pk, pv))))
    hlo = g.lower(qp, okp).compile().as_text()
    assert hlo.count(f'custom_call_target="{cache_attention.TARGET}"') == 1 and "while" not in hlo
    assert f"f32[{points},3,{b},{kv},{pre},{hd}]" not in hlo  # the prefix is not broadcast to the points
    batched = np.asarray(g(qp, okp))
    for i in range(points):
        assert (batched[i] == np.asarray(f(qp[i], okp[i], ov, mask, pk, pv))).all()


def test_a_batched_layer_index_is_one_call_per_element():
    """A vmap over the layer index (not a decode step's case) falls back to one call per layer: the same bits."""
    if not need_kernel():
        return
    q, k, v, mask = case(5, 3, 1, 4, 2, 32, 20)
    cfg = config(4, 2, 32)
    f = jax.jit(lambda *a: cache_attention.attend(cfg, *a))
    layers = jnp.arange(3, dtype=jnp.int32)
    got = np.asarray(jax.jit(jax.vmap(lambda layer: cache_attention.attend(cfg, jnp.asarray(q), jnp.asarray(k),
                                                                       jnp.asarray(v), layer, jnp.asarray(mask))))(layers))
    for layer in range(3):
        assert (got[layer] == np.asarray(f(q, k, v, jnp.int32(layer), mask))).all()


def test_a_prefix_per_point_is_one_call_too():
    """All-position sweep points steer their prompts, so each point has its own prefix (batched with the points):
    still one custom call with no loop and no copy of a point's cache, the same bits as one call per point."""
    if not need_kernel():
        return
    b, h, kv, hd, pre, own, points = 3, 6, 2, 32, 20, 6, 3
    q, k, v, mask = case(6, b, 1, h, kv, hd, pre + own)
    cfg = config(h, kv, hd)
    kp, vp = np.stack([k * (i + 1) for i in range(points)]), np.stack([v - i for i in range(points)])
    qp = np.stack([q + i for i in range(points)])

    def one(q, k, v):
        pk, pv = k[:, :, :, :pre], v[:, :, :, :pre]
        return cache_attention.attend(cfg, q, k[:, :, :, pre:], v[:, :, :, pre:], jnp.int32(2), jnp.asarray(mask),
                                      (pk, pv))

    g = jax.jit(jax.vmap(one))
    hlo = g.lower(qp, kp, vp).compile().as_text()
    assert hlo.count(f'custom_call_target="{cache_attention.TARGET}"') == 1 and "while" not in hlo
    batched = np.asarray(g(qp, kp, vp))
    for i in range(points):
        assert (batched[i] == np.asarray(jax.jit(one)(qp[i], kp[i], vp[i]))).all()
        np.testing.assert_allclose(batched[i], reference(qp[i], kp[i][2], vp[i][2], mask, cfg.scale), rtol=0,
                                   atol=1e-4)
