"""Batched sampling with a KV cache: prefill + a compiled ``lax.while_loop`` of decode steps.

One compile per (batch, prompt length, max_new_tokens, greedy?) shape; temperature, top-p, the
PRNG key, any hook's arrays and any LoRA adapter's factors (passed beside the params, see
:mod:`jaxpersona.model.lora`) are traced, so changing them never recompiles. Prompts are
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
from jaxpersona.edit.interventions import check_for_model
from jaxpersona.model import skinny
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.lora import Adapter, AdapterStack
from jaxpersona.model.params import Params, activation_dtype
from jaxpersona.model.transformer import (
    Capture,
    Hook,
    KVCache,
    Recorder,
    apply_hook,
    check_context,
    check_tokens,
    embed,
    forward,
    prepare,
    run_layers,
    unembed,
)


class GenerateOutput(NamedTuple):
    """Generated tokens ``[B, N]`` (``pad_id`` after a row's EOS), their log-probs ``[B, N]`` and new lengths ``[B]``."""

    tokens: jax.Array  # [B, N] new tokens; pad_id after a row's EOS
    logprobs: jax.Array  # [B, N] log p(token) under the (unscaled) model distribution
    lengths: jax.Array  # [B] new tokens up to and including EOS


def greedy_ids(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis of ``logits [..., V]`` as int32: the first maximum, or the first NaN where a
    row has one. On a CPU in cheap passes: the first block of ids holding the row's maximum (or its first NaN),
    then ``argmax`` inside that block. XLA:CPU's one-pass argmax (a value-and-index reduction) is ~7x slower
    over a whole vocabulary, which a greedy decode step reads for every row. Other platforms keep the one-pass
    ``argmax`` (``jax.lax.platform_dependent`` picks at lowering; the ids are the same). No ``cond``, so it stays
    cheap under ``vmap``."""
    v = logits.shape[-1]
    bs = next((s for s in (256, 128, 64, 32) if v % s == 0 and v > s), None)

    def one_pass() -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def blocked() -> jax.Array:
        assert bs is not None
        blocks = logits.reshape(*logits.shape[:-1], v // bs, bs)
        nan = jnp.isnan(blocks).any(-1)  # XLA:CPU's max may skip NaN, so blocks holding one are found apart
        j = jnp.where(nan.any(-1), jnp.argmax(nan, axis=-1), jnp.argmax(blocks.max(-1), axis=-1))
        inner = jnp.take_along_axis(blocks, j[..., None, None], axis=-2)[..., 0, :]
        return (j * bs + jnp.argmax(inner, axis=-1)).astype(jnp.int32)

    if bs is None:
        return one_pass()
    return jax.lax.platform_dependent(cpu=blocked, default=one_pass)


def _nucleus_threshold(scaled: jax.Array, key: jax.Array, top_p: jax.Array) -> jax.Array:
    """Exact top-p over the whole vocabulary without a sort.

    Token ``i`` is kept iff the mass of tokens strictly more probable than ``i`` is ``< top_p``.
    That set is ``{p_i >= p*}``; ``p*`` is found by bisection on the float bit patterns (monotone
    for non-negative floats), 32 vectorised passes instead of an ``O(V log V)`` sort.
    """
    probs = jax.nn.softmax(scaled, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

    def mass_above(b: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(bits > b[:, None], probs, 0.0), axis=-1)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = mass_above(mid) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.zeros(bits.shape[:1], jnp.int32)
    hi = jnp.max(bits, axis=-1)
    _, threshold = jax.lax.fori_loop(0, 32, body, (lo, hi))
    keep = bits >= threshold[:, None]
    return jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)


def _candidates(scaled: jax.Array, top_p: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The ``k`` most likely ids of ``scaled [B, V]``: their logits and ids ``[B, k]``, the mask ``[B, k]`` of the
    nucleus among them (``top_p`` a scalar or ``[B, 1]``; the first id always kept) and their total probability
    ``[B]`` (the nucleus is exact among them where it is ``>= top_p``)."""
    vals, idx = jax.lax.top_k(scaled, k)
    probs = jnp.exp(vals - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))  # true probabilities
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p).at[:, 0].set(True)
    return vals, idx, keep, jnp.sum(probs, axis=-1)


def sample_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, candidates: int = 256
) -> jax.Array:
    """Sample ``[B]`` ids from ``logits [B, V]`` with temperature and nucleus (top-p) filtering.

    Exact: the nucleus is first sought among the ``candidates`` most likely tokens (a cheap
    ``top_k``); only if some row's nucleus is larger than that is the whole vocabulary sorted.
    """
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    k = min(candidates, scaled.shape[-1])

    def nucleus() -> jax.Array:
        vals, idx, keep, mass = _candidates(scaled, top_p, k)
        covered = jnp.all(mass >= top_p)

        def from_top_k() -> jax.Array:
            choice = jax.random.categorical(key, jnp.where(keep, vals, -jnp.inf), axis=-1)
            return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]

        return jax.lax.cond(covered, from_top_k, lambda: _nucleus_threshold(scaled, key, top_p))

    return jax.lax.cond(top_p >= 1.0, lambda: jax.random.categorical(key, scaled, axis=-1), nucleus)


def sample_rows(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, candidates: int = 256
) -> jax.Array:
    """Sample ``[B]`` ids from ``logits [B, V]``, row ``b`` with its own key ``keys[b]`` (typed), temperature and
    top-p ``[B]``: row ``b`` gets exactly ``sample_token(logits[b:b+1], keys[b], temperature[b], top_p[b])``.

    The choices between sampling paths are made once for the batch, not per row (a ``vmap`` of
    :func:`sample_token` would turn its conditionals into selects and run every path for every row): the
    candidates' nucleus for all rows; the whole-vocabulary bisection only if some row's nucleus is wider than
    the candidates; a whole-vocabulary draw only if some row has ``top_p >= 1``.
    """
    chex.assert_rank(logits, 2)
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    k = min(candidates, scaled.shape[-1])
    draw = jax.vmap(lambda key, lg: jax.random.categorical(key, lg[None], axis=-1)[0])
    vals, idx, keep, mass = _candidates(scaled, top_p[:, None], k)
    choice = draw(keys, jnp.where(keep, vals, -jnp.inf))
    tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    full = top_p >= 1.0
    wide = ~full & (mass < top_p)
    tok = jax.lax.cond(
        jnp.any(wide),
        lambda: jnp.where(wide, jax.vmap(lambda key, s, p: _nucleus_threshold(s[None], key, p)[0])(keys, scaled, top_p),
                          tok),
        lambda: tok)
    return jax.lax.cond(jnp.any(full), lambda: jnp.where(full, draw(keys, scaled), tok), lambda: tok)


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not 0 <= temperature < float("inf"):
        raise errors.InputError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise errors.InputError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise errors.InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


class _Decoded(NamedTuple):
    out: GenerateOutput
    cache: KVCache
    proj: jax.Array  # [B, N, n] projections of each new token's resid at the monitored points


def _monitor_capture(monitor: tuple[int, ...]) -> Capture | None:
    return Capture(monitor, "tokens") if monitor else None


def _project(captured: jax.Array | None, units: jax.Array | None) -> jax.Array:
    """``captured [n, B, T, D]`` onto ``units [n, D]`` -> ``[B, T, n]`` (float32); empty when unmonitored."""
    if captured is None:
        return jnp.zeros((0,), jnp.float32)
    return jnp.einsum("nbtd,nd->btn", captured.astype(jnp.float32), units)


def _decode(params: Params, cfg: ModelConfig, logits: jax.Array, cache: KVCache, start: jax.Array | int,
            key: jax.Array, temperature: jax.Array, top_p: jax.Array, hook: Hook | None, *, max_new_tokens: int,
            greedy: bool, eos_ids: tuple[int, ...], pad_id: int, monitor: tuple[int, ...] = (),
            units: jax.Array | None = None, adapter: Adapter | AdapterStack | None = None,
            adapter_select: jax.Array | None = None, early_exit: bool = True, logprobs: bool = True) -> _Decoded:
    """The decode loop after a prefill: ``logits [B, V]`` of the last prompt token; new tokens are written
    into ``cache`` at slots ``start, start+1, ...``. A row's tokens after its EOS are written as padding
    (``valid`` False), so the cache can carry on into a next turn. ``monitor``: resid points whose
    projections on ``units [n, D]`` are recorded per new token (post-hook). ``adapter`` (``adapter_select
    [B]`` for a stack): applied in every decode step, as in the prefill. ``early_exit``: stop once every row has
    ended (otherwise run all ``max_new_tokens`` steps: the same tokens; under ``vmap`` a per-element exit test
    makes every step select the whole carry, KV cache included). ``logprobs``: False leaves them 0 (no
    ``[B, V]`` log-softmax per step)."""
    b = logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    capture = _monitor_capture(monitor)
    # a step's float32 projections by the CPU kernel (one CPU device): the same numbers for a row alone, in any
    # batch or vmapped over grid points or seeds (the prefill keeps XLA's dots)
    cpu_kernel = skinny.for_decode()

    def pick(logits: jax.Array, step: jax.Array) -> jax.Array:
        if greedy:
            return greedy_ids(logits)
        return sample_token(logits, jax.random.fold_in(key, step), temperature, top_p).astype(jnp.int32)

    class State(NamedTuple):
        step: jax.Array
        cache: KVCache
        logits: jax.Array  # [B, V]
        out: jax.Array
        logprobs: jax.Array
        done: jax.Array
        lengths: jax.Array
        proj: jax.Array

    def cond(s: State) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done) if early_exit else s.step < max_new_tokens

    def body(s: State) -> State:
        tok = pick(s.logits, s.step)
        if logprobs:
            lp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        else:
            lp = jnp.zeros(tok.shape, jnp.float32)
        tok = jnp.where(s.done, pad_id, tok)
        lp = jnp.where(s.done, 0.0, lp)
        out = s.out.at[:, s.step].set(tok)
        lps = s.logprobs.at[:, s.step].set(lp)
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        nxt = forward(params, cfg, tok[:, None], valid=~s.done[:, None], cache=s.cache, cache_index=start + s.step,
                      hook=hook, logits="last", capture=capture, adapter=adapter, adapter_select=adapter_select,
                      cpu_kernel=cpu_kernel)
        proj = s.proj
        if capture is not None:
            proj = jax.lax.dynamic_update_slice_in_dim(proj, _project(nxt.captured, units), s.step, axis=1)
        done = s.done | jnp.isin(tok, eos)
        return State(s.step + 1, nxt.kv(), nxt.last_logits(), out, lps, done, lengths, proj)

    init = State(
        jnp.int32(0), cache, logits,
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b, max_new_tokens), jnp.float32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, max_new_tokens, len(monitor)) if monitor else (0,), jnp.float32),
    )
    final = jax.lax.while_loop(cond, body, init)
    return _Decoded(GenerateOutput(final.out, final.logprobs, final.lengths), final.cache, final.proj)


class PromptTrunk(NamedTuple):
    """A prompt prefilled below ``resid[start]``, unintervened (:func:`prefill_trunk`)."""

    start: jax.Array  # the first resid point an intervention may touch
    h: jax.Array  # resid[start] [B, T, D]
    cache: KVCache  # the prompt's keys/values of layers < start; ``valid`` as before the prompt


def prefill_trunk(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array, start: jax.Array, *,
                  max_new_tokens: int, adapter: Adapter | AdapterStack | None = None) -> PromptTrunk:
    """The prompt's prefill below ``resid[start]``, in a cache of ``T + max_new_tokens`` slots. Run once, it serves
    every intervention that is off below ``start`` (:func:`generate_loop`'s ``trunk``)."""
    b, t = tokens.shape
    empty = KVCache.empty(cfg, b, t + max_new_tokens, activation_dtype(params))
    prep = prepare(cfg, valid, None, empty, 0)
    h, _, cache = run_layers(params, cfg, embed(params, cfg, tokens), prep, jnp.zeros((0,), activation_dtype(params)),
                             Recorder.make(cfg, None, valid), cache=empty, cache_index=0,
                             span=(jnp.int32(0), start), adapter=adapter)
    assert cache is not None
    return PromptTrunk(start, h, cache._replace(valid=empty.valid))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "eos_ids", "pad_id", "early_exit",
                                             "logprobs"))
def generate_loop(
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
    prefix_cache: KVCache | None = None,
    trunk: PromptTrunk | None = None,
    adapter: Adapter | AdapterStack | None = None,
    adapter_select: jax.Array | None = None,
    early_exit: bool = True,
    logprobs: bool = True,
) -> GenerateOutput:
    """``prefix_cache``: the first ``T-1`` prompt tokens already prefilled (unintervened, under the same adapter)
    in a cache of ``T + max_new_tokens`` slots, or held by its shared :class:`KVPrefix` (``T - 1`` slots) with
    ``1 + max_new_tokens`` slots of its own; only the last prompt token then runs here, under the hook.
    ``trunk``: the prompt already prefilled below ``resid[trunk.start]`` (:func:`prefill_trunk`; the hook
    must be off below it): only blocks ``start..L-1`` of the prompt run here, the same numbers as the whole
    prefill. ``adapter`` (``adapter_select [B]`` for a stack): a LoRA adapter beside ``params``. Callers that
    ``vmap`` this pass ``early_exit=False`` (see :func:`_decode`); ``logprobs=False`` when they are not read."""
    b, t = tokens.shape
    dtype = activation_dtype(params)
    if trunk is not None:
        prep = prepare(cfg, valid, None, trunk.cache, 0)
        h = apply_hook(hook, trunk.start, trunk.h, prep.ctx)
        h, _, cache = run_layers(params, cfg, h, prep, jnp.zeros((0,), h.dtype), Recorder.make(cfg, None, valid),
                                 hook=hook, cache=trunk.cache, cache_index=0,
                                 span=(trunk.start, jnp.int32(cfg.n_layers)), adapter=adapter,
                                 adapter_select=adapter_select)
        assert cache is not None
        logits = unembed(params, cfg, h[:, -1:])[:, -1]
    else:
        if prefix_cache is None:
            pre = forward(params, cfg, tokens, valid=valid, cache=KVCache.empty(cfg, b, t + max_new_tokens, dtype),
                          cache_index=0, hook=hook, logits="last", adapter=adapter, adapter_select=adapter_select)
        else:  # a shared KVPrefix holds the first slots: this cache's own slots count after it
            t = t - (0 if prefix_cache.prefix is None else prefix_cache.prefix.valid.shape[1])
            pre = forward(params, cfg, tokens[:, -1:], valid=valid[:, -1:], cache=prefix_cache, cache_index=t - 1,
                          hook=hook, logits="last", adapter=adapter, adapter_select=adapter_select)
        logits, cache = pre.last_logits(), pre.kv()
    return _decode(params, cfg, logits, cache, t, key, temperature, top_p, hook,
                   max_new_tokens=max_new_tokens, greedy=greedy, eos_ids=eos_ids, pad_id=pad_id, adapter=adapter,
                   adapter_select=adapter_select, early_exit=early_exit, logprobs=logprobs).out


class TurnOutput(NamedTuple):
    """One conversation turn continued from a KV cache."""

    out: GenerateOutput
    cache: KVCache  # now also holding this turn's prompt chunk and new tokens
    prompt_proj: jax.Array  # [B, T, n] projections of the prompt chunk's tokens at the monitored points
    proj: jax.Array  # [B, N, n] the same for each new token


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "eos_ids", "pad_id", "monitor"))
def continue_turn(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    tokens: jax.Array,
    valid: jax.Array,
    write_at: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    hook: Hook | None,
    units: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    eos_ids: tuple[int, ...],
    pad_id: int,
    monitor: tuple[int, ...],
    adapter: Adapter | AdapterStack | None = None,
    adapter_select: jax.Array | None = None,
) -> TurnOutput:
    """Prefill the chunk ``tokens [B, T]`` (left-padded; ``valid`` False on padding) into ``cache`` at slots
    ``write_at .. write_at+T-1`` — earlier slots (past turns) are attended to as they are — then
    generate up to ``max_new_tokens`` at the following slots. Rope positions continue from the number
    of valid cached tokens, so gaps of invalid slots are harmless. ``monitor``/``units [n, D]``: resid
    points and directions whose projections are recorded for every token (post-hook). ``adapter``
    (``adapter_select [B]`` for a stack): a LoRA adapter beside ``params``, in prefill and decode."""
    t = tokens.shape[1]
    pre = forward(params, cfg, tokens, valid=valid, cache=cache, cache_index=write_at, hook=hook, logits="last",
                  capture=_monitor_capture(monitor), adapter=adapter, adapter_select=adapter_select)
    dec = _decode(params, cfg, pre.last_logits(), pre.kv(), write_at + t, key, temperature, top_p, hook,
                  max_new_tokens=max_new_tokens, greedy=greedy, eos_ids=eos_ids, pad_id=pad_id, monitor=monitor,
                  units=units, adapter=adapter, adapter_select=adapter_select)
    return TurnOutput(dec.out, dec.cache, _project(pre.captured, units), dec.proj)


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
    adapter: Adapter | AdapterStack | None = None,
    adapter_select: Any = None,
) -> GenerateOutput:
    """Generate ``max_new_tokens`` for each left-padded prompt row of ``tokens [B, T]``.

    ``temperature == 0`` is greedy. ``hook`` must be a pytree (e.g. an intervention, or
    ``jax.tree_util.Partial(fn)``); it is applied at every resid point in prefill and decode.
    ``adapter``: a LoRA :class:`~jaxpersona.model.lora.Adapter` beside ``params`` (or an ``AdapterStack``
    with ``adapter_select [B]``, the adapter each row uses), applied in prefill and decode.
    """
    tokens, valid = check_tokens(cfg, tokens, valid)
    check_sampling(temperature, top_p, max_new_tokens)
    check_context(cfg, valid, max_new_tokens)
    if hook is not None:  # a wrong-length per-layer vector would otherwise be read clamped, without a word
        check_for_model(hook, cfg.d_model, cfg.n_resid, tokens.shape)
    if not valid[:, -1].all():
        raise errors.InputError("prompts must be left-padded: the last column of `valid` must be all True")
    if key is None:
        key = jax.random.key(0)
    return generate_loop(
        params,
        cfg,
        jnp.asarray(tokens),
        jnp.asarray(valid),
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        hook,
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0,
        eos_ids=tuple(cfg.eos_token_ids if eos_ids is None else eos_ids),
        pad_id=int(pad_id if pad_id is not None else (cfg.pad_token_id or 0)),
        adapter=adapter,
        adapter_select=None if adapter_select is None else jnp.asarray(adapter_select, jnp.int32),
    )
