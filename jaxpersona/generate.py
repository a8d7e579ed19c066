"""Batched sampling with a KV cache: prefill + a compiled ``lax.while_loop`` of decode steps.

One compile per (batch, prompt length, max_new_tokens, greedy?) shape; temperature, top-p, the
PRNG key and any hook's arrays are traced, so changing them never recompiles. Prompts are
left-padded; each row stops at its first EOS (later positions hold ``pad_id``). The loop exits as
soon as every row has stopped. Same key -> same tokens.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxpersona import errors
from jaxpersona.config import ModelConfig
from jaxpersona.models.transformer import Hook, KVCache, Params, forward


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B, N] new tokens; pad_id after a row's EOS
    logprobs: jax.Array  # [B, N] log p(token) under the (unscaled) model distribution
    lengths: jax.Array  # [B] new tokens up to and including EOS


def sample_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sample ``[B]`` ids from ``logits [B, V]`` with temperature and nucleus (top-p) filtering."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise errors.InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise errors.InputError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise errors.InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "eos_ids", "pad_id"))
def _generate(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    hook: Hook | None,
    *,
    max_new_tokens: int,
    greedy: bool,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> GenerateOutput:
    b, t = tokens.shape
    dtype = params["embed"].dtype
    cache = KVCache.empty(cfg, b, t + max_new_tokens, dtype)
    pre = forward(params, cfg, tokens, valid=valid, cache=cache, cache_index=0, hook=hook, logits="last")
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits: jax.Array, step: jax.Array) -> jax.Array:
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_token(logits, jax.random.fold_in(key, step), temperature, top_p).astype(jnp.int32)

    class State(NamedTuple):
        step: jax.Array
        cache: KVCache
        logits: jax.Array  # [B, V]
        out: jax.Array
        logprobs: jax.Array
        done: jax.Array
        lengths: jax.Array

    def cond(s: State) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: State) -> State:
        tok = pick(s.logits, s.step)
        lp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(s.done, pad_id, tok)
        lp = jnp.where(s.done, 0.0, lp)
        out = s.out.at[:, s.step].set(tok)
        logprobs = s.logprobs.at[:, s.step].set(lp)
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        done = s.done | jnp.isin(tok, eos)
        nxt = forward(
            params, cfg, tok[:, None], cache=s.cache, cache_index=t + s.step, hook=hook, logits="last"
        )
        return State(s.step + 1, nxt.cache, nxt.logits[:, 0], out, logprobs, done, lengths)

    init = State(
        jnp.int32(0),
        pre.cache,
        pre.logits[:, 0],
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b, max_new_tokens), jnp.float32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
    )
    final = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(final.out, final.logprobs, final.lengths)


def generate(
    params: Params,
    cfg: ModelConfig,
    tokens: Any,
    valid: Any | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: tuple[int, ...] | None = None,
    pad_id: int | None = None,
    hook: Hook | None = None,
) -> GenerateOutput:
    """Generate ``max_new_tokens`` for each left-padded prompt row of ``tokens [B, T]``.

    ``temperature == 0`` is greedy. ``hook`` must be a pytree (e.g. an intervention, or
    ``jax.tree_util.Partial(fn)``); it is applied at every resid point in prefill and decode.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    chex.assert_rank(tokens, 2)
    b, t = tokens.shape
    if b == 0 or t == 0:
        raise errors.InputError(f"empty batch (tokens shape {tokens.shape}); give at least one non-empty prompt")
    check_sampling(temperature, top_p, max_new_tokens)
    if t + max_new_tokens > cfg.max_position:
        raise errors.ContextLengthError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds the model's context of "
            f"{cfg.max_position} tokens; shorten the prompt or ask for fewer new tokens"
        )
    valid = jnp.ones((b, t), bool) if valid is None else jnp.asarray(valid, bool)
    if not bool(jnp.all(valid[:, -1])):
        raise errors.InputError("prompts must be left-padded: the last column of `valid` must be all True")
    if key is None:
        key = jax.random.key(0)
    return _generate(
        params,
        cfg,
        tokens,
        valid,
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        hook,
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0,
        eos_ids=tuple(cfg.eos_token_ids if eos_ids is None else eos_ids),
        pad_id=int(pad_id if pad_id is not None else (cfg.pad_token_id or 0)),
    )
