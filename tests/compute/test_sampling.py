"""Batched sampling with a key per row (the server's decode step) and the step's log-prob readout.

``sample_rows`` must give each row exactly what ``sample_token`` gives that row alone with its key, on every
path: the nucleus among the candidates, a nucleus wider than the candidates (whole-vocabulary bisection) and
``top_p = 1`` (the whole vocabulary); ``read_logits`` must give log_softmax's numbers without a ``[B, V]``
log-softmax, and the step's head stay a ``top_k`` (not a sort of the vocabulary) once compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.compute.generate import sample_rows, sample_token
from jaxpersona.serve.engine import TOP_LOGPROBS, pick_tokens, read_logits


def batch(seed: int, b: int = 12, v: int = 3000):
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.05, 1.0, 5.0, 20.0], size=b)[:, None]  # 0.05: near-uniform rows, nucleus > 256 ids
    scale[:3, 0] = (1.0, 0.05, 20.0)  # every path in every batch: top_p 1, a wide nucleus, a narrow one
    logits = jnp.asarray(rng.standard_normal((b, v)) * scale, jnp.float32)
    keys = jax.vmap(jax.random.key)(jnp.asarray(rng.integers(0, 2**31, b), jnp.uint32))
    temps = jnp.asarray(rng.choice([0.3, 0.7, 1.0, 1.5], size=b), jnp.float32)
    top_ps = rng.choice([0.5, 0.9, 0.99, 1.0], size=b)
    top_ps[:3] = (1.0, 0.9, 0.9)
    top_ps = jnp.asarray(top_ps, jnp.float32)
    return logits, keys, temps, top_ps


@pytest.mark.parametrize("seed", range(4))
def test_each_row_gets_what_it_gets_alone(seed):
    logits, keys, temps, top_ps = batch(seed)
    got = np.asarray(jax.jit(sample_rows)(logits, keys, temps, top_ps))
    alone = jax.jit(lambda lg, k, t, p: sample_token(lg[None], k, t, p)[0])
    want = np.asarray([alone(logits[i], keys[i], temps[i], top_ps[i]) for i in range(len(got))])
    np.testing.assert_array_equal(got, want)
    # the batch held every path: a wide nucleus, top_p = 1 and a nucleus among the candidates
    probs = np.asarray(jax.nn.softmax(logits / temps[:, None], axis=-1))
    top = -np.sort(-probs, axis=-1)[:, :256].sum(-1)
    p = np.asarray(top_ps)
    assert ((p < 1) & (top < p)).any() and (p >= 1).any() and ((p < 1) & (top >= p)).any()


def test_one_rows_draw_does_not_depend_on_the_others():
    logits, keys, temps, top_ps = batch(7)
    full = np.asarray(sample_rows(logits, keys, temps, top_ps))
    for i in range(3):
        one = sample_rows(logits[i:i + 1], keys[i:i + 1], temps[i:i + 1], top_ps[i:i + 1])
        assert int(one[0]) == full[i]


def test_pick_tokens_is_greedy_at_temperature_zero_and_seeded_per_row():
    logits, _, _, top_ps = batch(3, b=6)
    kd = jnp.asarray(np.arange(12, dtype=np.uint32).reshape(6, 2))
    counts = jnp.arange(6, dtype=jnp.int32)
    temps = jnp.asarray([0, 0.8, 0, 0.8, 1.0, 0], jnp.float32)
    got = np.asarray(pick_tokens(logits, kd, counts, temps, top_ps))
    argmax = np.asarray(jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(got[np.asarray(temps) == 0], argmax[np.asarray(temps) == 0])
    for i in np.flatnonzero(np.asarray(temps) > 0):
        key = jax.random.fold_in(jax.random.wrap_key_data(kd[i]), counts[i])
        assert got[i] == int(sample_token(logits[i:i + 1], key, temps[i], top_ps[i])[0])


def test_read_logits_gives_log_softmax_numbers_without_a_sort():
    logits, *_ = batch(5, v=5000)
    logits = logits.at[2, 7].set(logits[2].max() + 1).at[2, 9].set(logits[2].max() + 1)  # a tie: lowest id first
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    fn = jax.jit(read_logits)
    lp, top_id, top_lp = (np.asarray(x) for x in fn(logits, tok))
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(lp, ref[np.arange(len(tok)), np.asarray(tok)], rtol=0, atol=2e-6)
    want_lp, want_id = jax.lax.top_k(jnp.asarray(ref), TOP_LOGPROBS)
    np.testing.assert_array_equal(top_id, np.asarray(want_id))
    assert top_id[2, 0] == 7 and top_id[2, 1] == 9
    np.testing.assert_allclose(top_lp, np.asarray(want_lp), rtol=0, atol=2e-6)
    # a picked token other than the greedy one reads its own log-prob
    other = (tok + 1) % logits.shape[-1]
    np.testing.assert_allclose(np.asarray(fn(logits, other)[0]), ref[np.arange(len(tok)), np.asarray(other)],
                               rtol=0, atol=2e-6)
    if jax.default_backend() == "cpu":  # the decode step's head (picked tokens + top ids) must not become a sort
        def head(lg):
            greedy = jnp.argmax(lg, axis=-1).astype(jnp.int32)
            return (greedy, *read_logits(lg, greedy))

        head = jax.jit(head)
        assert " sort(" not in head.lower(logits).compile().as_text()


def test_read_logits_skips_the_log_probs_no_row_asked_for():
    logits, *_ = batch(6)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lp, top_id, top_lp = jax.jit(read_logits)(logits, tok, jnp.asarray(False))
    assert not np.asarray(lp).any() and not np.asarray(top_id).any() and not np.asarray(top_lp).any()


@pytest.mark.parametrize("greedy", [True, False])
def test_a_loop_without_early_exit_or_logprobs_gives_the_same_tokens(tiny_llama, greedy):
    """``generate_loop(early_exit=False, logprobs=False)`` (the sweep's and the seed axis' vmapped loops) gives the
    tokens and lengths of the default loop, rows that end early included; vmapped over keys as well."""
    from jaxpersona.compute.generate import generate_loop

    import hf_tiny

    tokens, valid = (jnp.asarray(x) for x in hf_tiny.left_padded_batch())
    cfg, params = tiny_llama.cfg, tiny_llama.params
    first = generate_loop(params, cfg, tokens, valid, jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), None,
                          max_new_tokens=12, greedy=greedy, eos_ids=(), pad_id=0)
    eos = (int(first.tokens[0, 2]), int(first.tokens[2, 5]))  # rows 0 and 2 end early, the others may not

    def run(key, **flags):
        return generate_loop(params, cfg, tokens, valid, key, jnp.float32(1.0), jnp.float32(1.0), None,
                             max_new_tokens=12, greedy=greedy, eos_ids=eos, pad_id=0, **flags)

    keys = jax.random.split(jax.random.key(3), 3)
    want = jax.vmap(run)(keys)
    got = jax.vmap(lambda k: run(k, early_exit=False, logprobs=False))(keys)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    assert np.asarray(want.lengths).min() < 12  # some row did end early
    assert not np.asarray(got.logprobs).any() and np.asarray(want.logprobs).any()


@pytest.mark.parametrize("seed", range(3))
def test_a_batchs_first_rows_draw_what_they_draw_with_more_rows_after_them(seed):
    """The generate stage pads its last chunk of jobs to a multiple of 8 rows, not to a full batch: the real rows'
    draws must not depend on the padding rows (copies of the last real row) after them, on every path."""
    logits, _, _, _ = batch(seed, b=24)
    key = jax.random.key(seed)
    for top_p in (1.0, 0.9, 0.5):
        for n in (8, 16):
            padded = jnp.concatenate([logits[:n - 3], jnp.repeat(logits[n - 4 : n - 3], 3, axis=0)])
            longer = jnp.concatenate([padded, jnp.repeat(logits[n - 4 : n - 3], 24 - n, axis=0)])
            short = jax.jit(sample_token)(padded, key, jnp.float32(0.8), jnp.float32(top_p))
            np.testing.assert_array_equal(short[: n - 3],
                                          jax.jit(sample_token)(longer, key, jnp.float32(0.8), jnp.float32(top_p))[: n - 3])
