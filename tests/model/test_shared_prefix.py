"""A cache that carries a shared :class:`KVPrefix` (read, never written or copied per row) gives the numbers of
one cache holding the prefix's slots and its own: a chunk's forward (every family, sliding windows included,
scalar and per-row slots), greedy generation under a response-position steer, and the same under ``vmap`` over
grid points with the prefix unbatched. And ``greedy_ids`` is ``argmax``, ties, NaN and infinities included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.compute.generate import generate_loop, greedy_ids
from jaxpersona.edit import interventions as iv
from jaxpersona.model.transformer import KVCache, KVPrefix, forward


def _prompt(cfg, rng, b=2, t=7):
    tokens = jnp.asarray(rng.integers(5, min(cfg.vocab_size, 100), (b, t)).astype(np.int32))
    valid = jnp.asarray(np.arange(t)[None, :] >= np.array([[0], [2]])[:b])  # row 1 left-padded
    return tokens, valid


def _split(params, cfg, tokens, valid, own):
    """The prompt minus its last token as (a) one cache of ``P + own`` slots, (b) a KVPrefix + ``own`` slots."""
    b, t = tokens.shape
    p = t - 1
    whole = forward(params, cfg, tokens[:, :-1], valid=valid[:, :-1], cache=KVCache.empty(cfg, b, p + own, jnp.float32),
                    logits=False).kv()
    pre = forward(params, cfg, tokens[:, :-1], valid=valid[:, :-1], cache=KVCache.empty(cfg, b, p, jnp.float32),
                  logits=False).kv()
    shared = KVCache.empty(cfg, b, own, jnp.float32)._replace(prefix=KVPrefix(pre.k, pre.v, pre.valid))
    return whole, shared


@pytest.mark.parametrize("per_row", [False, True])
def test_a_chunk_after_a_shared_prefix_equals_one_cache(tiny, per_row):
    cfg, params = tiny.cfg, tiny.params
    rng = np.random.default_rng(3)
    tokens, valid = _prompt(cfg, rng)
    whole, shared = _split(params, cfg, tokens, valid, own=4)
    chunk = jnp.asarray(rng.integers(5, 100, (2, 2)).astype(np.int32))
    cvalid = jnp.ones((2, 2), bool)
    p = tokens.shape[1] - 1
    at = (lambda i: jnp.asarray([i, i])) if per_row else (lambda i: i)
    a = forward(params, cfg, chunk, valid=cvalid, cache=whole, cache_index=at(p))
    b = forward(params, cfg, chunk, valid=cvalid, cache=shared, cache_index=at(0))
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-5)
    # the returned cache keeps the prefix and holds the chunk's keys in its own slots
    assert b.cache.prefix is shared.prefix
    np.testing.assert_array_equal(np.asarray(b.cache.valid), np.asarray(a.cache.valid[:, p:]))
    np.testing.assert_allclose(np.asarray(b.cache.k), np.asarray(a.cache.k[..., p:, :]), rtol=1e-5, atol=1e-5)
    # a second chunk attends to the prefix, the first chunk and itself
    nxt = jnp.asarray(rng.integers(5, 100, (2, 1)).astype(np.int32))
    a2 = forward(params, cfg, nxt, cache=a.cache, cache_index=at(p + 2))
    b2 = forward(params, cfg, nxt, cache=b.cache, cache_index=at(2))
    np.testing.assert_allclose(np.asarray(b2.logits), np.asarray(a2.logits), rtol=1e-5, atol=1e-5)


def _steer(cfg, valid, coeff):
    vec = np.random.default_rng(7).standard_normal(cfg.d_model).astype(np.float32)
    return iv.steer(cfg.n_layers + 1, vec, coeff, [1], iv.Positions.response(valid))


def test_greedy_generation_after_a_shared_prefix_equals_one_cache(tiny_llama):
    cfg, params = tiny_llama.cfg, tiny_llama.params
    rng = np.random.default_rng(4)
    tokens, valid = _prompt(cfg, rng)
    n = 6
    whole, shared = _split(params, cfg, tokens, valid, own=1 + n)
    hook = _steer(cfg, valid, 4.0)
    kw = dict(max_new_tokens=n, greedy=True, eos_ids=(), pad_id=0, early_exit=False)
    key, t0, p1 = jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0)
    want = generate_loop(params, cfg, tokens, valid, key, t0, p1, hook, **kw)
    one = generate_loop(params, cfg, tokens, valid, key, t0, p1, hook, prefix_cache=whole, **kw)
    got = generate_loop(params, cfg, tokens, valid, key, t0, p1, hook, prefix_cache=shared, **kw)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)

    # vmapped over three steering strengths, the prefix closed over (unbatched): each point as alone
    hooks = jax.tree.map(lambda *x: jnp.stack(x), *[_steer(cfg, valid, c) for c in (0.0, 4.0, -4.0)])

    def point(h):
        return generate_loop(params, cfg, tokens, valid, key, t0, p1, h, prefix_cache=shared, **kw).tokens

    batched = jax.jit(jax.vmap(point))(hooks)
    for i, c in enumerate((0.0, 4.0, -4.0)):
        alone = generate_loop(params, cfg, tokens, valid, key, t0, p1, _steer(cfg, valid, c), **kw).tokens
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(alone))


def test_blocked_attention_refuses_a_shared_prefix(tiny_llama):
    from jaxpersona.model.transformer import Blocked

    cfg, params = tiny_llama.cfg, tiny_llama.params
    tokens, valid = _prompt(cfg, np.random.default_rng(5))
    _, shared = _split(params, cfg, tokens, valid, own=4)
    with pytest.raises(ValueError, match="shared prefix"):
        forward(params, cfg, tokens[:, -1:], cache=shared, cache_index=0, blocked=Blocked(4, 4))


@pytest.mark.parametrize("shape", [(5, 49152), (3, 1000), (2, 7), (4, 3, 512), (2, 151936)])
def test_greedy_ids_is_argmax(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 0, 3] = x[..., 0, 5] = x[..., 0, :].max() + 1.0  # a tie: the first wins
    got = jax.jit(greedy_ids)(jnp.asarray(x))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, -1))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(greedy_ids))(jnp.asarray(x)[None]))[0], np.argmax(x, -1))


def test_greedy_ids_with_nan_and_infinities():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 4096)).astype(np.float32)
    x[0, 900] = x[0, 3000] = np.nan  # first NaN wins, as in argmax
    x[1, :] = -np.inf
    x[2, 7], x[2, 8] = np.inf, -np.inf
    x[3, 300], x[3, 257], x[3, 260], x[3, 4000] = np.inf, -np.inf, np.inf, np.nan  # a later NaN beats +inf
    x[4, :] = np.nan
    x[5, 4095] = 1e30
    x[6, 10], x[6, 600] = 3e38, 3e38
    want = jnp.argmax(jnp.asarray(x), -1)
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy_ids)(jnp.asarray(x))), np.asarray(want))
