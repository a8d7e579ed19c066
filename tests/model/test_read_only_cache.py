"""``run_layers(..., read_only=True)``: attending over a shared cache without carrying it gives the numbers of
the ordinary cached forward (scalar and per-row slots, every family), and returns no cache."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.model.transformer import KVCache, Recorder, embed, forward, prepare, run_layers


@pytest.mark.parametrize("per_row", [False, True])
def test_read_only_cache_equals_the_carried_cache(tiny, per_row):
    cfg, params = tiny.cfg, tiny.params
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(5, 100, (2, 6)).astype(np.int32))
    pre = forward(params, cfg, prompt, cache=KVCache.empty(cfg, 2, 10, jnp.float32), logits=False).cache
    chunk = jnp.asarray(rng.integers(5, 100, (2, 3)).astype(np.int32))
    valid = jnp.ones((2, 3), bool)
    index = jnp.asarray([6, 6]) if per_row else 6
    prep = prepare(cfg, valid, cache=pre, cache_index=index)
    h0 = embed(params, cfg, chunk)
    rec = Recorder.make(cfg, None, valid)
    buf = jnp.zeros((0,), h0.dtype)
    carried, _, cache = run_layers(params, cfg, h0, prep, buf, rec, cache=pre, cache_index=index)
    shared, _, none = run_layers(params, cfg, h0, prep, buf, rec, cache=pre, cache_index=index, read_only=True)
    assert cache is not None and none is None
    np.testing.assert_allclose(np.asarray(shared), np.asarray(carried), rtol=1e-6, atol=1e-6)
