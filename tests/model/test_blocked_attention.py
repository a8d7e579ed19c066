"""Blocked attention over the slots in use (``forward(..., blocked=Blocked(block, span))``): the same numbers
for a row whatever span covers it (bit for bit), and the plain attention's numbers to float32 rounding, on
every family (sliding windows, soft-capping, GQA)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.model.transformer import Blocked, KVCache, forward


def test_blocked_attention_is_span_invariant_and_equals_plain(tiny):
    cfg, params = tiny.cfg, tiny.params
    rng = np.random.default_rng(0)
    s, block = 32, 4
    lengths = [5, 11]  # row 0 uses 5 slots, row 1 eleven: spans 8, 16 and 32 all cover both
    prompt = rng.integers(5, 100, (2, max(lengths))).astype(np.int32)
    valid = np.zeros_like(prompt, bool)
    for b, n in enumerate(lengths):
        valid[b, :n] = True
    cache = KVCache.empty(cfg, 2, s, jnp.float32)
    pre = forward(params, cfg, jnp.asarray(prompt), valid=jnp.asarray(valid), cache=cache, cache_index=0, logits=False)
    nxt = jnp.asarray(rng.integers(5, 100, (2, 1)).astype(np.int32))
    at = jnp.asarray(lengths)

    def step(blocked):
        return forward(params, cfg, nxt, cache=pre.cache, cache_index=at, logits="last", blocked=blocked).logits

    plain = np.asarray(step(None))
    by_span = {span: np.asarray(step(Blocked(block, span))) for span in (12, 16, 32)}
    for span, got in by_span.items():
        assert np.array_equal(got, by_span[32]), (tiny.family, span)  # bit for bit
    np.testing.assert_allclose(by_span[32], plain, rtol=1e-5, atol=1e-5)
    # a chunk of several queries (a prefill block) too, each row at its own slot
    chunk = jnp.asarray(rng.integers(5, 100, (2, 4)).astype(np.int32))
    outs = [np.asarray(forward(params, cfg, chunk, cache=pre.cache, cache_index=at, logits=True,
                               blocked=Blocked(block, span)).logits) for span in (16, 32)]
    assert np.array_equal(outs[0], outs[1])
    ref = forward(params, cfg, chunk, cache=pre.cache, cache_index=at, logits=True).logits
    np.testing.assert_allclose(outs[1], np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_blocked_attention_rejects_a_bad_span(tiny_llama):
    cfg, params = tiny_llama.cfg, tiny_llama.params
    cache = KVCache.empty(cfg, 1, 16, jnp.float32)
    tok = jnp.ones((1, 1), jnp.int32)
    for bad in (Blocked(4, 6), Blocked(4, 20)):
        with pytest.raises(ValueError, match="blocked attention"):
            forward(params, cfg, tok, cache=cache, cache_index=0, blocked=bad)
