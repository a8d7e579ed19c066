"""Continuous batching with a different intervention, adapter and readout on every row.

The engine keeps ``batch`` rows of one KV cache ``[L, B, KV, S, hd]``. A request (one *choice*) owns a row
from admission to its last token, and its tokens always sit at the same slots of that row: the prompt at
``0 .. n-1``, generated tokens from ``n`` on. Each row is written at its own slot (``forward(...,
cache_index=[B])``), so a request's computation never depends on when it joined or on what the other rows
hold: interleaved requests give the tokens they give alone.

**Chunked prefill.** A prompt is prefilled in blocks of ``C = prefill_chunk`` tokens at slots ``0, C, 2C,
...`` — always the same blocks, one call of shape ``[1, C]`` for a lone prompt or ``[prefill_rows, C]`` for
several side by side — into a prefill buffer,
blocks for about one decode step's time between two decode steps of the running rows: a long prompt never
stalls the streams already running (they wait at most about one more step per token). When its last block is done the row moves into the batch cache.
**Prefix cache** (:mod:`jaxpersona.serve.prefix`): a block's keys and values depend only on the tokens up to
it, the adapter and the interventions acting on its slots, so blocks another request computed are copied in
instead of recomputed — the same numbers, bit for bit. **Attention over the slots in use**: prefill and
decode attend over the first ``span`` slots (a power-of-two number of ``attn_block`` blocks covering the
longest row), in blocks with an online softmax whose result for a row does not depend on ``span``
(:class:`~jaxpersona.model.transformer.Blocked`): a step at 1/8 of the context reads 1/8 of the cache, and a
request's numbers are still the same alone or beside a long one.

Every row carries its interventions as data (:class:`RowInterventions`: ``K`` items of
``vector [N, D]``, steer coefficient and layer weights, cap bounds and layer weights, a position mask over
the row's cache slots; and at most one persona mixture, :class:`RowMixture`: up to ``M = max_mixture``
directions ``[M, N, D]``, alpha, tau, fixed weights or context-conditional, layer weights, a position mask).
One jitted decode step applies them all — a ``vmap`` over rows of the library's own
:class:`~jaxpersona.edit.interventions.Cap`, :class:`~jaxpersona.edit.interventions.Steer` and
:class:`~jaxpersona.edit.interventions.Mixture` — and samples every row with its own temperature, top-p and
PRNG key. An ablation is a cap with ``floor = ceiling = mean``. Order at each resid point: the row's items in
request order (each a cap, then a steer), then its mixture (which therefore sees the capped/steered residual).
Rows without a mixture have ``alpha = 0`` (bit-identical residuals); when no row has one, none is traced.

LoRA adapters (the way multi-adapter servers select them): the engine may hold an
:class:`~jaxpersona.model.lora.AdapterStack` whose member 0 is the base model (a zero adapter); every row has
an ``adapter_select [B]`` entry (0 = base) and ``forward(..., adapter=stack, adapter_select=...)`` gives each
row its own adapter inside the one prefill / decode step, so base and several fine-tunes share a batch and a
compiled program. Without a stack (``adapters=None``) no adapter array is traced and the programs are the
plain ones.

The host loop (:meth:`Engine.run`) admits waiting requests into free prefill slots (a batch row reserved for
each), runs one prefill block for them and one decode step for the running rows, and hands each
request its tokens, log-probs, text deltas and a persona readout: each generated token's residual (after
the interventions) at the readout layers projected on named unit directions — per token, on the delta that
carries the token's text, and their mean at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.adapters import shard_adapter
from jaxpersona.compute.generate import greedy_ids, sample_rows
from jaxpersona.edit.interventions import (
    Cap,
    Mixture,
    Positions,
    Steer,
    pytree_dataclass,
)
from jaxpersona.model import skinny
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.lora import AdapterStack, check_adapter
from jaxpersona.model.params import Params, activation_dtype
from jaxpersona.model.sharding import spec
from jaxpersona.model.transformer import (
    Blocked,
    Capture,
    HookContext,
    KVCache,
    forward,
    layers_as_bits,
    unembed,
)
from jaxpersona.serve.prefix import PrefixCache, actor_identity, block_keys

TOP_LOGPROBS = 20  # the most top_logprobs a request may ask for (OpenAI's limit)
POSITIONS = ("all", "prompt", "response", "assistant")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static shape of the engine: ``batch`` rows x ``max_context`` cache slots, ``max_interventions`` items,
    ``max_readout`` readout directions and a mixture of at most ``max_mixture`` directions per row.
    ``prefill_chunk``: prompts are prefilled in blocks of this many tokens (also the prefix cache's block);
    ``prefill_rows``: prompts prefilled side by side in one call; ``attn_block``: attention reads the cache in
    blocks of this many slots, over only the slots in use; ``prefix_cache_mb``: device memory for cached
    prompt blocks (0: no prefix cache); ``cpu_kernel``: float32 decode steps on one CPU device read the
    projection weights with the CPU kernel (:mod:`jaxpersona.model.skinny`) where it is available, and so do
    prefill calls when ``prefill_rows x prefill_chunk <= skinny.FEW_ROWS`` (False: XLA's dots).
    ``max_context`` must be a multiple of both block sizes."""

    batch: int = 8
    max_context: int = 1024
    max_interventions: int = 4
    max_readout: int = 4
    max_queue: int = 256
    prefill_chunk: int = 16
    prefill_rows: int = 1
    max_mixture: int = 8  # directions a request's persona mixture may hold (K <= max_mixture)
    attn_block: int = 64
    prefix_cache_mb: float = 256.0
    cpu_kernel: bool = True

    def __post_init__(self) -> None:
        for f in ("batch", "max_context", "max_interventions", "max_readout", "max_queue", "prefill_chunk",
                  "prefill_rows", "max_mixture", "attn_block"):
            v = getattr(self, f)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise errors.InputError(f"serve: {f} must be an integer >= 1, got {v}")
        if self.max_mixture < 2:
            raise errors.InputError(f"serve: max_mixture must be >= 2 (a mixture mixes >= 2 directions), got "
                                    f"{self.max_mixture}")
        if self.prefill_rows > self.batch:
            raise errors.InputError(f"serve: prefill_rows {self.prefill_rows} exceeds the batch {self.batch}")
        if self.max_context < 2 * self.prefill_chunk:
            raise errors.InputError(f"serve: max_context {self.max_context} is too small (>= 2 x prefill_chunk = "
                                    f"{2 * self.prefill_chunk})")
        for f in ("prefill_chunk", "attn_block"):
            if self.max_context % getattr(self, f):
                raise errors.InputError(f"serve: max_context {self.max_context} must be a multiple of {f} "
                                        f"({getattr(self, f)})")
        if not (isinstance(self.prefix_cache_mb, (int, float)) and self.prefix_cache_mb >= 0
                and self.prefix_cache_mb < float("inf")):
            raise errors.InputError(f"serve: prefix_cache_mb must be a number >= 0, got {self.prefix_cache_mb!r}")

    def prompt_slots(self, n: int) -> int:
        """Slots an ``n``-token prompt's prefill writes: whole blocks of ``prefill_chunk``."""
        return -(-max(n, 1) // self.prefill_chunk) * self.prefill_chunk

    def span(self, used: int) -> int:
        """Slots attention covers when the rows use slots ``0 .. used-1``: ``attn_block`` times the next power
        of two blocks, at most ``max_context``."""
        blocks = -(-max(used, 1) // self.attn_block)
        return min(self.max_context, self.attn_block * (1 << (blocks - 1).bit_length()))

    def prefill_buckets(self) -> list[int]:
        """The row counts a prefill call is compiled for: 1 and ``prefill_rows``. A call computes one row when
        only the first prefill row is in use (rows are taken lowest first), else all of them: a lone arrival
        pays for one row, and a burst is prefilled side by side (on a CPU a call of a few rows x ``C`` tokens
        still reads every weight once, so it costs little more than one row)."""
        return sorted({1, self.prefill_rows})

    def prefill_bucket(self, rows_in_use: int) -> int:
        """The smallest of :meth:`prefill_buckets` >= ``rows_in_use``."""
        return min(n for n in self.prefill_buckets() if n >= rows_in_use)

    def spans(self) -> list[int]:
        """Every span :meth:`span` can return (the decode and prefill programs there are)."""
        out, sp = [], self.attn_block
        while sp < self.max_context:
            out.append(sp)
            sp *= 2
        return [*out, self.max_context]


# --- interventions as per-row data --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """One resolved intervention of a request (numpy, host side). An inactive part has zero layer weights."""

    vector: np.ndarray  # [N, D] (steer: already in coefficient units)
    coeff: float = 0.0
    steer_w: np.ndarray | None = None  # [N]
    lo: np.ndarray | None = None  # [N] cap floor (-inf = none)
    hi: np.ndarray | None = None  # [N] cap ceiling (+inf = none)
    cap_w: np.ndarray | None = None  # [N]
    positions: str = "all"


@dataclasses.dataclass(frozen=True)
class MixSpec:
    """A request's persona mixture (numpy, host side): ``h + alpha * sum_k w_k v_k[l]`` at the resid points
    ``l`` with ``layers[l] != 0``; ``w = softmax(<h, v̂_k[l]> / tau)`` (context-conditional) or the fixed
    ``weights``. ``vectors [K, N, D]``: each direction at every resid point (relative units: already scaled to
    the residual norm there)."""

    vectors: np.ndarray  # [K, N, D]
    alpha: float
    layers: np.ndarray  # [N] layer weights (0 = off)
    tau: float = 1.0
    weights: np.ndarray | None = None  # [K] fixed mix; None = context-conditional
    positions: str = "all"


@dataclasses.dataclass(frozen=True)
class PaddedMixture(Mixture):
    """The library's :class:`~jaxpersona.edit.interventions.Mixture` over a padded bank: ``present [K]`` marks
    the real entries; padding (zero vectors, zero fixed weights) is left out of the context-conditional
    softmax (``softmax(<h, v̂_k>/tau)`` over the present ``k`` only), so the weights are the unpadded
    mixture's. Everything else is :class:`Mixture` itself."""

    present: jax.Array | None = None  # [K] bool

    def mix(self, h: jax.Array) -> jax.Array:
        if not self.conditional or self.present is None:
            return super().mix(h)
        v = self.vectors.astype(jnp.float32)
        u = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        return jax.nn.softmax(jnp.einsum("btd,kd->btk", h.astype(jnp.float32), u) / self.tau, axis=-1,
                              where=self.present)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class RowMixture:
    """One persona mixture per row over ``M`` direction slots (a row's ``K <= M`` entries first, the rest
    padding). All ``[B, ...]``; a row without a mixture has ``alpha = 0`` and changes nothing."""

    vectors: jax.Array  # [B, M, N, D] each entry's direction at every resid point
    present: jax.Array  # [B, M] bool: the row's real entries
    alpha: jax.Array  # [B]
    tau: jax.Array  # [B] (> 0; 1 on rows without a mixture)
    weights: jax.Array  # [B, M] fixed mix (used where conditional is False)
    layers: jax.Array  # [B, N] layer weights
    conditional: jax.Array  # [B] bool
    mask: jax.Array  # [B, S] bool: the row's cache slots the mixture acts on

    def apply_row(self, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
        """One row's mixture (this pytree sliced to one row, as inside a ``vmap``) on ``h [1, T, D]``:
        :class:`Mixture` (context-conditional, padding masked) or :class:`Mixture` with fixed weights."""
        where = Positions(self.mask[None], jnp.zeros((1,), bool))
        vec = self.vectors[:, layer]  # [M, D]
        cond = PaddedMixture(vec, self.alpha, self.tau, self.weights, self.layers, where, True, self.present)
        fixed = Mixture(vec, self.alpha, self.tau, self.weights, self.layers, where, False)
        return jnp.where(self.conditional, cond(layer, h, ctx), fixed(layer, h, ctx))


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class RowInterventions:
    """``K`` intervention items per row, applied in order at every resid point: each item is a
    :class:`Cap` then a :class:`Steer` (one of them switched off by zero layer weights); then the row's
    persona mixture (``mix``; None when no row has one). All ``[B, K, ...]``."""

    vector: jax.Array  # [B, K, N, D]
    coeff: jax.Array  # [B, K]
    steer_w: jax.Array  # [B, K, N]
    lo: jax.Array  # [B, K, N]
    hi: jax.Array  # [B, K, N]
    cap_w: jax.Array  # [B, K, N]
    mask: jax.Array  # [B, K, S] bool: the row's cache slots the item acts on
    mix: RowMixture | None = None

    def __call__(self, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
        def row(iv: RowInterventions, h1: jax.Array, pos: jax.Array, slots: jax.Array, valid: jax.Array) -> jax.Array:
            c1 = HookContext(pos[None], slots[None], valid[None])
            out = h1[None]
            for k in range(iv.coeff.shape[0]):
                where = Positions(iv.mask[k][None], jnp.zeros((1,), bool))
                out = Cap(iv.vector[k], iv.lo[k], iv.hi[k], iv.cap_w[k], where)(layer, out, c1)
                out = Steer(iv.vector[k], iv.coeff[k], iv.steer_w[k], where)(layer, out, c1)
            if iv.mix is not None:  # after the row's items
                out = iv.mix.apply_row(layer, out, c1)
            return out[0]

        return jax.vmap(row)(self, h, ctx.positions, ctx.slots, ctx.valid)


class RowTable:
    """Host copy of every row's interventions, mixture and readout directions; shipped to the device when
    changed. The mixture arrays (``[B, M, N, D]``) are allocated at the first mixture request."""

    def __init__(self, cfg: ModelConfig, ecfg: EngineConfig) -> None:
        b, k, n, d, s, r = ecfg.batch, ecfg.max_interventions, cfg.n_resid, cfg.d_model, ecfg.max_context, ecfg.max_readout
        self.mix_shape = (b, ecfg.max_mixture, n, d, s)
        self.mix: dict[str, np.ndarray] | None = None
        self.has_mix = np.zeros(b, bool)
        self.vector = np.zeros((b, k, n, d), np.float32)
        self.coeff = np.zeros((b, k), np.float32)
        self.steer_w = np.zeros((b, k, n), np.float32)
        self.lo = np.full((b, k, n), -np.inf, np.float32)
        self.hi = np.full((b, k, n), np.inf, np.float32)
        self.cap_w = np.zeros((b, k, n), np.float32)
        self.mask = np.zeros((b, k, s), bool)
        self.units = np.zeros((b, r, d), np.float32)
        self.layers = np.zeros((b, r), np.int32)
        self._device: tuple[Any, Any, Any] | None = None

    def _mix_arrays(self) -> dict[str, np.ndarray]:
        if self.mix is None:
            b, m, n, d, s = self.mix_shape
            self.mix = {"vectors": np.zeros((b, m, n, d), np.float32), "present": np.zeros((b, m), bool),
                        "alpha": np.zeros(b, np.float32), "tau": np.ones(b, np.float32),
                        "weights": np.zeros((b, m), np.float32), "layers": np.zeros((b, n), np.float32),
                        "conditional": np.zeros(b, bool), "mask": np.zeros((b, s), bool)}
        return self.mix

    def clear(self, row: int) -> None:
        for a, v in ((self.vector, 0), (self.coeff, 0), (self.steer_w, 0), (self.lo, -np.inf), (self.hi, np.inf),
                     (self.cap_w, 0), (self.mask, False), (self.units, 0), (self.layers, 0)):
            a[row] = v
        if self.has_mix[row]:
            for key, a in self._mix_arrays().items():
                a[row] = 1 if key == "tau" else 0
            self.has_mix[row] = False
        self._device = None

    def set(self, row: int, items: list[Item], masks: list[np.ndarray], units: np.ndarray, layers: np.ndarray,
            mix: MixSpec | None = None, mix_mask: np.ndarray | None = None) -> None:
        """Row ``row``'s items (with their ``[S]`` slot masks), readout ``units [R, D]`` / ``layers [R]`` and
        mixture (with its ``[S]`` slot mask)."""
        self.clear(row)
        if mix is not None:
            t, k = self._mix_arrays(), len(mix.vectors)
            t["vectors"][row, :k] = mix.vectors
            t["present"][row, :k] = True
            t["alpha"][row], t["tau"][row], t["layers"][row] = mix.alpha, mix.tau, mix.layers
            t["conditional"][row] = mix.weights is None
            if mix.weights is not None:
                t["weights"][row, :k] = mix.weights
            t["mask"][row] = mix_mask
            self.has_mix[row] = True
        for k, (it, m) in enumerate(zip(items, masks)):
            self.vector[row, k] = it.vector
            self.coeff[row, k] = it.coeff
            if it.steer_w is not None:
                self.steer_w[row, k] = it.steer_w
            if it.cap_w is not None:
                self.cap_w[row, k], self.lo[row, k], self.hi[row, k] = it.cap_w, it.lo, it.hi
            self.mask[row, k] = m
        self.units[row, : len(units)] = units
        self.layers[row, : len(layers)] = layers

    def any_mix(self) -> bool:
        return bool(self.has_mix.any())

    def rows(self, sl: slice | np.ndarray | None = None) -> RowInterventions:
        """The device pytree of all rows, or of the rows ``sl`` selects (a slice or an index array); its
        ``mix`` is None unless one of those rows has a mixture."""
        sl = slice(None) if sl is None else sl
        mix = None
        if self.mix is not None and self.has_mix[sl].any():
            t = self.mix
            mix = RowMixture(*(jnp.asarray(t[f][sl]) for f in ("vectors", "present", "alpha", "tau", "weights",
                                                                "layers", "conditional", "mask")))
        return RowInterventions(*(jnp.asarray(a[sl]) for a in (self.vector, self.coeff, self.steer_w, self.lo, self.hi,
                                                               self.cap_w, self.mask)), mix=mix)

    def device(self) -> tuple[RowInterventions, jax.Array, jax.Array]:
        if self._device is None:
            self._device = (self.rows(), jnp.asarray(self.units), jnp.asarray(self.layers))
        return self._device


def position_mask(kind: str, prompt_len: int, size: int, assistant: np.ndarray | None) -> np.ndarray:
    """``[S]`` bool over a row's cache slots for a positions name. The prompt sits at ``0 .. prompt_len-1``,
    generated tokens from ``prompt_len`` on. ``assistant``: the prompt's assistant-content tokens."""
    m = np.zeros(size, bool)
    n = prompt_len
    if kind == "all":
        m[:] = True
    elif kind == "prompt":
        m[:n] = True
    elif kind == "response":  # persona_vectors' "response": the last prompt token and every generated token
        m[n - 1:] = True
    elif kind == "assistant":  # earlier assistant turns' content and everything generated
        if assistant is not None:
            m[:n] = assistant
        m[n:] = True
    else:
        raise errors.InputError(f"positions {kind!r}; use one of {', '.join(POSITIONS)}")
    return m


# --- device functions -----------------------------------------------------------------------------------
class StepOut(NamedTuple):
    tokens: jax.Array  # [B]
    logprobs: jax.Array  # [B] log p(token) under the model's (unscaled) distribution
    top_ids: jax.Array  # [B, TOP_LOGPROBS]
    top_logprobs: jax.Array  # [B, TOP_LOGPROBS]
    readout: jax.Array  # [B, R] projection of this token's residual (after the row's interventions) at each
    # readout layer on its unit direction (or [0] when no row asks for a readout)


def pick_tokens(logits: jax.Array, keys: jax.Array, counts: jax.Array, temps: jax.Array, top_ps: jax.Array) -> jax.Array:
    """One token per row: argmax where ``temps == 0``, else a sample with the row's temperature, top-p and
    key ``fold_in(keys[b], counts[b])`` (so a row's draws depend only on its own seed and step;
    :func:`~jaxpersona.compute.generate.sample_rows`)."""
    greedy = greedy_ids(logits)

    def sampled() -> jax.Array:
        rows = jax.vmap(lambda kd, c: jax.random.fold_in(jax.random.wrap_key_data(kd), c))(keys, counts)
        return sample_rows(logits, rows, temps, top_ps).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(temps > 0), sampled, lambda: greedy)
    return jnp.where(temps > 0, drawn, greedy)


def read_logits(logits: jax.Array, tok: jax.Array, wanted: jax.Array | bool = True
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From ``logits [B, V]`` and the picked tokens ``tok [B]``: their log-probs ``[B]`` and the ``TOP_LOGPROBS``
    most likely ids and their log-probs ``[B, TOP_LOGPROBS]``: log_softmax's own arithmetic,
    ``(x - max) - log(sum(exp(x - max)))``, on the entries read, with no ``[B, V]`` log-softmax written. Where
    ``wanted`` (traced) is False they are zeros and cost nothing (no row asked for them).

    The top ids are not sliced again (e.g. for the greedy token): on XLA:CPU a ``top_k`` whose outputs are sliced
    again is left a full sort of the vocabulary (measured: 142 ms instead of 0.9 ms for ``[16, 49152]``)."""
    lg = logits.astype(jnp.float32)

    def read() -> tuple[jax.Array, jax.Array, jax.Array]:
        top_v, top_id = jax.lax.top_k(lg, TOP_LOGPROBS)
        peak = jnp.max(lg, axis=-1, keepdims=True)
        log_sum = jnp.log(jnp.sum(jnp.exp(lg - peak), axis=-1, keepdims=True))
        lp = ((jnp.take_along_axis(lg, tok[:, None], axis=-1) - peak) - log_sum)[:, 0]
        return lp, top_id.astype(jnp.int32), (top_v - peak) - log_sum

    def skip() -> tuple[jax.Array, jax.Array, jax.Array]:
        b = lg.shape[0]
        return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, TOP_LOGPROBS), jnp.int32),
                jnp.zeros((b, TOP_LOGPROBS), jnp.float32))

    return jax.lax.cond(jnp.asarray(wanted), read, skip)


@functools.partial(jax.jit, static_argnames=("cfg", "readout", "blocked", "cpu_kernel"), donate_argnames=("cache",))
def decode_step(params: Params, cfg: ModelConfig, cache: KVCache, logits: jax.Array, index: jax.Array,
                active: jax.Array, keys: jax.Array, counts: jax.Array, temps: jax.Array, top_ps: jax.Array,
                hook: RowInterventions | None, units: jax.Array, layers: jax.Array,
                adapter: AdapterStack | None = None, adapter_select: jax.Array | None = None,
                logprobs: jax.Array | bool = True, *, readout: bool,
                blocked: Blocked, cpu_kernel: bool = False) -> tuple[KVCache, jax.Array, StepOut]:
    """Pick each row's next token from ``logits [B, V]`` and run it through the model at the row's slot
    ``index [B]`` (inactive rows write nothing valid), each row under its own interventions (``hook``) and
    adapter (``adapter_select [B]`` into the stack ``adapter``; both None: no adapter); attention over the
    first ``blocked.span`` slots. ``units [B, R, D]`` / ``layers [B, R]``: the readout directions;
    ``logprobs`` (traced bool): whether any row asked for log-probs (else the step's are zeros);
    ``cpu_kernel``: see :func:`jaxpersona.model.transformer.run_layers`. Returns the cache, the next logits
    ``[B, V]`` and the step's outputs."""
    tok = pick_tokens(logits, keys, counts, temps, top_ps)
    lp, top_id, top_lp = read_logits(logits, tok, logprobs)
    capture = Capture(tuple(range(cfg.n_resid)), "tokens") if readout else None
    out = forward(params, cfg, tok[:, None], valid=active[:, None], cache=cache, cache_index=index, hook=hook,
                  logits="last", capture=capture, adapter=adapter, adapter_select=adapter_select, blocked=blocked,
                  cpu_kernel=cpu_kernel)
    proj = jnp.zeros((0,), jnp.float32)
    if readout:  # captured [N, B, 1, D]: each row's readout layers, projected on its unit directions
        h = jnp.swapaxes(out.captured[:, :, 0], 0, 1).astype(jnp.float32)  # [B, N, D]
        at = jnp.take_along_axis(h, layers[:, :, None], axis=1)  # [B, R, D]
        proj = jnp.einsum("brd,brd->br", at, units)
    return out.cache, out.logits[:, 0], StepOut(tok, lp, top_id, top_lp, proj)


@functools.partial(jax.jit, static_argnames=("cfg", "blocked", "cpu_kernel"), donate_argnames=("cache",))
def prefill_chunk(params: Params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array, valid: jax.Array,
                  index: jax.Array, last: jax.Array, hook: RowInterventions | None, adapter: AdapterStack | None = None,
                  adapter_select: jax.Array | None = None, *, blocked: Blocked,
                  cpu_kernel: bool = False) -> tuple[KVCache, jax.Array]:
    """One prompt block per prefill row: ``tokens [n, C]`` (``valid`` False past a prompt's end) written at
    slots ``index [n] ..`` of the first ``n`` rows of the prefill buffer ``cache [L, R, KV, S, hd]`` (``n <= R``:
    a call computes only the rows in use, see :meth:`EngineConfig.prefill_buckets`), each row under its
    interventions and adapter; returns the buffer and the logits ``[n, V]`` at each row's position ``last [n]``.
    Only the first ``blocked.span`` slots of those rows are read and written back."""
    n, sp = tokens.shape[0], blocked.span
    sub = KVCache(cache.k[:, :n, :, :sp], cache.v[:, :n, :, :sp], cache.valid[:n, :sp])
    out = forward(params, cfg, tokens, valid=valid, cache=sub, cache_index=index, hook=hook, logits=False,
                  capture=Capture((cfg.n_layers,), "tokens"), adapter=adapter, adapter_select=adapter_select,
                  blocked=blocked, cpu_kernel=cpu_kernel)
    assert out.cache is not None
    cache = KVCache(cache.k.at[:, :n, :, :sp].set(out.cache.k), cache.v.at[:, :n, :, :sp].set(out.cache.v),
                    cache.valid.at[:n, :sp].set(out.cache.valid))
    h = jnp.take_along_axis(out.captured[0], last[:, None, None], axis=1)  # [n, 1, D] resid[L] at `last`
    return cache, unembed(params, cfg, h)[:, 0]


@functools.partial(jax.jit, donate_argnames=("cache",))
def clear_row(cache: KVCache, row: jax.Array) -> KVCache:
    """Mark every slot of prefill row ``row`` empty (its stale keys and values are never attended to)."""
    return cache._replace(valid=cache.valid.at[row].set(False))


@functools.partial(jax.jit, donate_argnames=("cache",))
def put_block(cache: KVCache, row: jax.Array, start: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
    """Write a cached prompt block ``k``/``v [L, KV, C, hd]`` at slots ``start ..`` of row ``row``."""
    c = k.shape[2]
    at = (0, row, 0, start, 0)
    return KVCache(jax.lax.dynamic_update_slice(cache.k, k[:, None], at),
                   jax.lax.dynamic_update_slice(cache.v, v[:, None], at),
                   jax.lax.dynamic_update_slice(cache.valid, jnp.ones((1, c), bool), (row, start)))


@functools.partial(jax.jit, static_argnames=("size",))
def get_block(cache: KVCache, row: jax.Array, start: jax.Array, *, size: int) -> tuple[jax.Array, jax.Array]:
    """The keys and values ``[L, KV, size, hd]`` of row ``row`` at slots ``start .. start+size-1``."""
    l, _, kv, _, hd = cache.k.shape
    at = (0, row, 0, start, 0)
    return (jax.lax.dynamic_slice(cache.k, at, (l, 1, kv, size, hd))[:, 0],
            jax.lax.dynamic_slice(cache.v, at, (l, 1, kv, size, hd))[:, 0])


@functools.partial(jax.jit, donate_argnames=("cache", "logits"))
def insert_row(cache: KVCache, logits: jax.Array, new: KVCache, new_logits: jax.Array, src: jax.Array,
               row: jax.Array) -> tuple[KVCache, jax.Array]:
    """Put prefilled row ``src`` of ``new`` / ``new_logits [R, V]`` into row ``row`` of the batch cache and logits."""
    return (KVCache(cache.k.at[:, row].set(new.k[:, src]), cache.v.at[:, row].set(new.v[:, src]),
                    cache.valid.at[row].set(new.valid[src])), logits.at[row].set(new_logits[src]))


# --- host side: sequences and the loop ------------------------------------------------------------------
@dataclasses.dataclass
class Sequence:
    """One choice of one request: what to generate, under what, and where its results go.

    Events put on ``events`` (shared by a request's choices):

    * ``("delta", index, text, entry, projections)``, one per generated token (``text`` may be empty while
      text is held back): ``entry`` = ``(token, logprob, [(id, logprob), ...])``
      or None (no logprobs asked); ``projections`` = None when no readout was asked, else the per-token
      readout of the tokens whose text this delta releases, in order: a list of ``[R]`` float lists (empty
      while text is held back for an incomplete character or a possible stop string);
    * ``("done", index, finish_reason, {"completion_tokens", "readout", "projection_rest"})``: ``readout`` =
      ``{name: {"layer", "mean_projection", "tokens", "per_token"}}`` (``per_token``: one float per generated
      token); ``projection_rest``: the per-token readout not yet sent on a delta (``[R]`` lists).
    """

    index: int
    prompt: list[int]
    max_tokens: int
    events: queue.Queue
    temperature: float = 0.0
    top_p: float = 1.0
    key: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.uint32))
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = no logprobs; else the number of top alternatives (0..20)
    items: list[Item] = dataclasses.field(default_factory=list)
    assistant_mask: np.ndarray | None = None  # [len(prompt)] the prompt's assistant-content tokens
    readout: list[tuple[str, int, np.ndarray]] = dataclasses.field(default_factory=list)  # (name, layer, unit [D])
    ignore_eos: bool = False  # generate max_tokens whatever comes (vLLM's ignore_eos; for benchmarks)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    adapter: str | None = None  # the adapter's name (None = the base model)
    adapter_id: int = 0  # its index in the engine's AdapterStack (0 = base)
    mixture: MixSpec | None = None
    # filled in by the engine
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    readout_sum: np.ndarray | None = None
    projections: list[list[float]] = dataclasses.field(default_factory=list)  # [tokens][R] per-token readout
    projections_sent: int = 0  # tokens whose projections went out on a delta


@dataclasses.dataclass
class Prefilling:
    """A prompt being prefilled: its sequence, the batch row it will join, the next slot to fill and the prefix
    cache keys of its full blocks."""

    seq: Sequence
    row: int
    pos: int
    keys: list[bytes]


class Engine:
    """Owns the model, the batch cache and the decode loop (run it on one thread: :meth:`start`)."""

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Any, eos_ids: tuple[int, ...], pad_id: int,
                 ecfg: EngineConfig, mesh: jax.sharding.Mesh | None = None, *,
                 adapters: AdapterStack | None = None) -> None:
        """``mesh``: a ``(data, model)`` mesh (params already placed on it, see :mod:`jaxpersona.model.sharding`):
        the cache's rows go over ``data`` and its kv heads over ``model``; the jitted steps follow.
        ``adapters``: LoRA adapters requests may select (member 0 the base model, a zero adapter; see
        :func:`~jaxpersona.model.lora.stack_adapters`); a sequence's ``adapter_id`` indexes it."""
        self.cfg, self.tokenizer, self.ecfg = cfg, tokenizer, ecfg
        # mixed precision on a CPU: the bfloat16 layer weights are viewed as their uint16 bits once here, not in
        # every jitted step (a copy of every weight per call on XLA:CPU; the numbers are the same bit for bit)
        self.params = layers_as_bits(params)
        # the steps trace under the mesh, so the forward's activation constraints act (batch over data, heads and
        # MLP over model: jaxpersona.model.sharding.constrain)
        self.on_mesh: Callable[[], Any] = (lambda: jax.set_mesh(mesh)) if mesh is not None else contextlib.nullcontext
        # the decode step's projections by the CPU kernel: one CPU device only (a mesh shards the weights); the
        # prefill's too while its calls are few-row ([prefill_rows, prefill_chunk] tokens at most), where the
        # kernel is at least as fast as XLA's dot. Fixed per engine: every prefill call takes the same path, so
        # a prompt's numbers do not depend on the rows prefilled beside it.
        self.cpu_kernel = bool(ecfg.cpu_kernel and mesh is None and jax.default_backend() == "cpu"
                               and skinny.available())
        self.prefill_kernel = self.cpu_kernel and ecfg.prefill_rows * ecfg.prefill_chunk <= skinny.FEW_ROWS
        if adapters is not None:
            if not isinstance(adapters, AdapterStack):
                raise errors.InputError(f"serve: adapters must be an AdapterStack (stack_adapters([None, ...])), "
                                        f"got {type(adapters).__name__}")
            check_adapter(adapters, cfg)
            if mesh is not None:
                adapters = shard_adapter(adapters, cfg, mesh)
        self.adapters = adapters
        self.eos = set(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        b, s = ecfg.batch, ecfg.max_context
        self.cache = KVCache.empty(cfg, b, s, activation_dtype(params))
        self.logits = jnp.zeros((b, cfg.vocab_size), jnp.float32)
        if mesh is not None:
            if b % mesh.shape["data"]:
                raise errors.MeshError(f"serve: batch {b} is not a multiple of the mesh's data axis "
                                       f"({mesh.shape['data']})")
            kv = spec(mesh, "layers", "batch", "kv_heads", None, "head_dim")
            self.cache = jax.device_put(self.cache, KVCache(kv, kv, spec(mesh, "batch", None)))
            self.logits = jax.device_put(self.logits, spec(mesh, "batch", None))
        self.table = RowTable(cfg, ecfg)
        self.rows: list[Sequence | None] = [None] * b
        self.index = np.zeros(b, np.int32)
        self.keys = np.zeros((b, 2), np.uint32)
        self.temps = np.zeros(b, np.float32)
        self.top_ps = np.ones(b, np.float32)
        self.adapter_select = np.zeros(b, np.int32)  # each row's adapter (0 = base)
        r = ecfg.prefill_rows
        self.pcache = KVCache.empty(cfg, r, s, activation_dtype(params))  # the prefill buffer (one row per slot)
        if mesh is not None:
            pkv = spec(mesh, "layers", None, "kv_heads", None, "head_dim")
            self.pcache = jax.device_put(self.pcache, KVCache(pkv, pkv, spec(mesh, None, None)))
        self.pslots: list[Prefilling | None] = [None] * r  # what each prefill row is filling
        self.reserved: set[int] = set()  # batch rows held for a prompt being prefilled
        self.prefix = PrefixCache(int(ecfg.prefix_cache_mb * (1 << 20)))
        self._last_step = 0.0  # seconds the last decode step took: the prefill time allowed between two steps
        self._blocks_this_call = 0
        self.waiting: queue.Queue[Sequence] = queue.Queue()  # submitted (any thread)
        self._submitting = threading.Lock()  # a request's choices are queued together: drained together
        self.backlog: list[Sequence] = []  # taken from `waiting` by the engine thread, not yet admitted
        self.pending = 0  # sequences submitted and not finished (guarded by _lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "tokens": 0, "admitted": 0, "joined_running": 0, "prefills": 0,
                      "prefill_rows": 0, "step_seconds": 0.0, "prefill_seconds": 0.0, "prefix_queries": 0,
                      "prefix_hits": 0}
        self.failure: BaseException | None = None

    # --- submission (any thread) ----------------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int, prompt_param: str = "messages") -> None:
        """A 400 unless the prompt (in whole prefill blocks) and ``max_tokens`` new tokens fit a row; its
        ``param`` is ``prompt_param`` when the prompt alone leaves no room for a token, else ``max_tokens``."""
        limit = min(self.ecfg.max_context, self.cfg.max_position) if self.cfg.max_position else self.ecfg.max_context
        prompt_too_long = prompt_len + 1 > limit or self.ecfg.prompt_slots(prompt_len) > self.ecfg.max_context
        if prompt_too_long or prompt_len + max_tokens > limit:
            raise errors.RequestError(
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}; this server holds at most "
                f"{limit} tokens per sequence (prompt + new tokens). "
                + ("Shorten the prompt" if prompt_too_long else "Lower max_tokens or shorten the prompt"),
                param=prompt_param if prompt_too_long else "max_tokens", code="context_length_exceeded")

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's choices; raises a 429 :class:`~jaxpersona.errors.RequestError` when the queue is full."""
        if self.failure is not None:
            raise errors.RequestError(f"the engine stopped: {type(self.failure).__name__}", status=503,
                                      kind="server_error", code="engine_failed")
        if self._stop.is_set():
            raise errors.RequestError("the server is shutting down", status=503, kind="server_error",
                                      code="shutting_down")
        with self._lock:
            if self.pending + len(seqs) > self.ecfg.max_queue:
                raise errors.RequestError(f"the server has {self.pending} sequences queued or running (limit "
                                          f"{self.ecfg.max_queue}); retry later", status=429,
                                          kind="rate_limit_error", code="queue_full")
            self.pending += len(seqs)
        with self._submitting:
            for s in seqs:
                self.waiting.put(s)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Run the loop on its own thread (a second call does nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="jaxpersona-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; sequences still running or queued end with an error event (nothing hangs)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                self._fail_all("the server is shutting down")  # anything submitted while it stopped

    # --- the loop (engine thread) ----------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stop.is_set():
                self._admit()
                prefilling = any(p is not None for p in self.pslots)
                decoding = any(r is not None for r in self.rows)
                if not prefilling and not decoding:
                    try:
                        self.backlog.append(self.waiting.get(timeout=0.05))
                    except queue.Empty:
                        pass
                    continue
                if prefilling:  # prompt blocks for about one decode step's time, then a step of the running rows
                    self._prefill_for(self._last_step if decoding else 0.0)
                if any(r is not None for r in self.rows):
                    self._step()
        except BaseException as e:  # noqa: BLE001 - fail every waiter loudly rather than hang them
            self.failure = e
            self._fail_all(f"engine failure: {type(e).__name__}: {e}")
            raise
        self._fail_all("the server is shutting down")  # stopped: nobody waits forever

    def _fail_all(self, message: str) -> None:
        """End every running and queued sequence with an ``("error", ...)`` event and free its row."""
        seqs = ([r for r in self.rows if r is not None] + [p.seq for p in self.pslots if p is not None]
                + self.backlog + self._drain())
        self.rows = [None] * len(self.rows)
        self.pslots = [None] * len(self.pslots)
        self.reserved = set()
        self.backlog = []
        for row in range(len(self.rows)):
            self.table.clear(row)
        for r in seqs:
            with self._lock:
                self.pending -= 1
            r.events.put(("error", r.index, message))

    def _drain(self) -> list[Sequence]:
        """Everything submitted so far; never half of a request's choices (they are queued under one lock)."""
        out = []
        with self._submitting:
            while True:
                try:
                    out.append(self.waiting.get_nowait())
                except queue.Empty:
                    return out

    def _admit(self) -> None:
        """Start prefilling waiting requests: each takes a free prefill row and reserves a free batch row;
        a request that left before it got one is finished as cancelled."""
        while True:
            self.backlog.extend(self._drain())
            for gone in [q for q in self.backlog if q.cancelled.is_set()]:
                self.backlog.remove(gone)
                self._finish(gone, "cancelled")
            free = [r for r, occ in enumerate(self.rows) if occ is None and r not in self.reserved]
            slots = [i for i, p in enumerate(self.pslots) if p is None]
            if not free or not slots or not self.backlog:
                return
            self._start_prefill(slots[0], free[0], self.backlog.pop(0))

    def _start_prefill(self, slot: int, row: int, seq: Sequence) -> None:
        """Set row ``row``'s interventions, adapter and readout, and clear prefill row ``slot`` (its cached blocks are
        copied in at its first prefill call)."""
        n, s, c = len(seq.prompt), self.ecfg.max_context, self.ecfg.prefill_chunk
        masks = [position_mask(it.positions, n, s, seq.assistant_mask) for it in seq.items]
        units = np.asarray([u for _, _, u in seq.readout], np.float32).reshape(len(seq.readout), self.cfg.d_model)
        mix = seq.mixture
        mix_mask = position_mask(mix.positions, n, s, seq.assistant_mask) if mix is not None else None
        self.table.set(row, seq.items, masks, units, np.asarray([l for _, l, _ in seq.readout], np.int32),
                       mix, mix_mask)
        self.adapter_select[row] = seq.adapter_id if self.adapters is not None else 0
        self.reserved.add(row)
        keys: list[bytes] = []
        if self.prefix.budget > 0:
            actors = [(actor_identity(it.vector, it.coeff, it.steer_w, it.lo, it.hi, it.cap_w), m)
                      for it, m in zip(seq.items, masks)]
            if mix is not None:
                actors.append((actor_identity(mix.vectors, mix.alpha, mix.layers, mix.tau, mix.weights), mix_mask))
            # full blocks before the one holding the last prompt token (its logits start the generation)
            keys = block_keys(seq.prompt, c, int(self.adapter_select[row]), actors, (n - 1) // c)
        self.pcache = clear_row(self.pcache, jnp.int32(slot))
        self.stats["prefix_queries"] += n
        self.pslots[slot] = Prefilling(seq, row, 0, keys)  # its cached blocks are copied in by _share_blocks

    def _release(self, slot: int) -> None:
        p = self.pslots[slot]
        assert p is not None
        self.pslots[slot] = None
        self.reserved.discard(p.row)
        self.table.clear(p.row)

    def _prefill_for(self, budget: float) -> None:
        """Prefill blocks until about ``budget`` seconds have gone (at least one block; new arrivals are
        admitted in between): running streams wait at most about one more decode step for each token."""
        t0 = time.perf_counter()
        while True:
            self._prefill_step()
            self._admit()
            spent = time.perf_counter() - t0
            per_block = spent / max(1, self._blocks_this_call)
            if not any(p is not None for p in self.pslots) or spent + per_block > budget:
                self._blocks_this_call = 0
                return

    def _prefill_step(self) -> None:
        """One block of every prompt being prefilled (one call of shape ``[n, C]``, ``n`` the bucket of the
        highest prefill row in use); rows whose prompt is done join the batch."""
        t0 = time.perf_counter()
        c = self.ecfg.prefill_chunk
        for i, p in enumerate(self.pslots):
            if p is not None and p.seq.cancelled.is_set():
                self._release(i)
                self._finish(p.seq, "cancelled")
        held = self._share_blocks()
        active = [i for i, p in enumerate(self.pslots) if p is not None and i not in held]
        if not active:
            return
        r = self.ecfg.prefill_bucket(active[-1] + 1)  # the rows this call computes
        tokens = np.full((r, c), self.pad_id, np.int32)
        valid = np.zeros((r, c), bool)
        index = np.zeros(r, np.int32)
        last = np.zeros(r, np.int32)
        rows = [self.pslots[active[0]].row] * r  # type: ignore[union-attr]  # idle prefill rows: copies, unused
        for i in held:  # in the call, computes nothing (no valid token) at slots not filled yet: nothing is lost
            if i < r:
                index[i] = self.pslots[i].pos  # type: ignore[union-attr]
        for i in active:
            p = self.pslots[i]
            assert p is not None
            lo, hi = p.pos, min(p.pos + c, len(p.seq.prompt))
            tokens[i, : hi - lo], valid[i, : hi - lo] = p.seq.prompt[lo:hi], True
            index[i], last[i], rows[i] = lo, hi - lo - 1, p.row
        span = self.ecfg.span(int(index.max()) + c)
        any_items = any(self.pslots[i].seq.items or self.pslots[i].seq.mixture is not None for i in active)  # type: ignore[union-attr]
        hook = self.table.rows(np.asarray(rows)) if any_items else None
        self._blocks_this_call += 1
        with self.on_mesh():
            self.pcache, logits = prefill_chunk(
                self.params, self.cfg, self.pcache, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(index),
                jnp.asarray(last), hook, *self._adapter_args(rows), blocked=Blocked(self.ecfg.attn_block, span),
                cpu_kernel=self.prefill_kernel)
        logits.block_until_ready()  # the time budget counts work done, not work dispatched
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += r  # rows computed (a lone prompt: 1)
        for i in active:
            p = self.pslots[i]
            assert p is not None
            j = p.pos // c
            if j < len(p.keys):  # a full block before the last: keep it for later requests
                k, v = get_block(self.pcache, jnp.int32(i), jnp.int32(p.pos), size=c)
                self.prefix.store(p.keys[j], k, v)
            p.pos += c
            if p.pos >= len(p.seq.prompt):
                self._join(i, p, logits)
        self.stats["prefill_seconds"] += time.perf_counter() - t0

    def _share_blocks(self) -> set[int]:
        """Prompts being prefilled share their blocks through the prefix cache. Each copies in (does not compute)
        the cached blocks that come next in it: at its first call, those of earlier requests; later, those another
        prompt prefilled beside it has stored since. Of prompts whose next block is the same (same key: tokens,
        adapter and prompt-acting interventions), only the first computes it; the others are returned, to be held
        for this call and take the block from the cache at the next."""
        c = self.ecfg.prefill_chunk
        held: set[int] = set()
        leaders: set[bytes] = set()
        for i, p in enumerate(self.pslots):
            if p is None:
                continue
            while p.pos // c < len(p.keys) and (got := self.prefix.lookup([p.keys[p.pos // c]])):
                (k, v), = got
                self.pcache = put_block(self.pcache, jnp.int32(i), jnp.int32(p.pos), k, v)
                self.stats["prefix_hits"] += c
                p.pos += c
            if p.pos // c < len(p.keys):
                key = p.keys[p.pos // c]
                if key in leaders:
                    held.add(i)
                leaders.add(key)
        return held

    def _join(self, slot: int, p: Prefilling, logits: jax.Array) -> None:
        """A prompt is prefilled: its row moves into the batch cache and starts decoding."""
        row, seq = p.row, p.seq
        self.cache, self.logits = insert_row(self.cache, self.logits, self.pcache, logits, jnp.int32(slot),
                                             jnp.int32(row))
        self.pslots[slot] = None
        self.reserved.discard(row)
        self.stats["joined_running"] += any(x is not None and x.tokens for x in self.rows)  # joined mid-decode
        self.rows[row] = seq
        self.index[row], self.keys[row] = len(seq.prompt), seq.key
        self.temps[row], self.top_ps[row] = seq.temperature, seq.top_p
        seq.readout_sum = np.zeros(len(seq.readout), np.float64)
        seq.projections, seq.projections_sent = [], 0
        self.stats["admitted"] += 1

    def _adapter_args(self, rows: list[int] | None = None) -> tuple[AdapterStack | None, jax.Array | None]:
        """``(adapter stack, adapter_select)`` for the rows ``rows`` (all rows: None); ``(None, None)`` without a
        stack, so no adapter array is traced."""
        if self.adapters is None:
            return None, None
        sel = self.adapter_select if rows is None else self.adapter_select[np.asarray(rows, np.int64)]
        return self.adapters, jnp.asarray(sel)

    def compile_shapes(self, decode: bool = False) -> None:
        """Compile the prefill block at every attention span and row bucket (on a scratch buffer: safe while the
        engine runs) and, with ``decode`` (only before :meth:`start`: it steps the idle batch), the plain decode
        step at every span, so first requests do not wait for the compiler."""
        c = self.ecfg.prefill_chunk
        scratch = jax.tree.map(jnp.zeros_like, self.pcache)
        for r in self.ecfg.prefill_buckets():
            ad = (None, None) if self.adapters is None else (self.adapters, jnp.zeros((r,), jnp.int32))
            zeros = np.zeros(r, np.int32)
            for span in self.ecfg.spans():
                with self.on_mesh():
                    scratch, _ = prefill_chunk(self.params, self.cfg, scratch,
                                               jnp.full((r, c), self.pad_id, jnp.int32), jnp.zeros((r, c), bool),
                                               jnp.asarray(zeros), jnp.asarray(zeros), None, *ad,
                                               blocked=Blocked(self.ecfg.attn_block, span),
                                               cpu_kernel=self.prefill_kernel)
        if decode and not self.started:
            b = self.ecfg.batch
            units, layers = self.table.device()[1:]
            for span in self.ecfg.spans():
                with self.on_mesh():
                    self.cache, self.logits, _ = decode_step(
                        self.params, self.cfg, self.cache, self.logits, jnp.zeros(b, jnp.int32), jnp.zeros(b, bool),
                        jnp.asarray(self.keys), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.float32),
                        jnp.ones(b, jnp.float32), None, units, layers, *self._adapter_args(), jnp.asarray(False),
                        readout=False, blocked=Blocked(self.ecfg.attn_block, span), cpu_kernel=self.cpu_kernel)
            self.cache = self.cache._replace(valid=jnp.zeros_like(self.cache.valid))
            self.logits = jnp.zeros_like(self.logits)

    def _step(self) -> None:
        t0 = time.perf_counter()
        active = np.array([r is not None for r in self.rows])
        counts = np.array([len(r.tokens) if r is not None else 0 for r in self.rows], np.int32)
        any_items = any(r is not None and (r.items or r.mixture is not None) for r in self.rows)
        readout = any(r is not None and r.readout for r in self.rows)
        logprobs = any(r is not None and r.logprobs is not None for r in self.rows)
        rows, units, layers = self.table.device()
        index = np.where(active, self.index, 0).astype(np.int32)  # idle rows write (nothing valid) at slot 0
        span = self.ecfg.span(int(index.max()) + 1)
        with self.on_mesh():
            self.cache, self.logits, out = decode_step(
                self.params, self.cfg, self.cache, self.logits, jnp.asarray(index), jnp.asarray(active),
                jnp.asarray(self.keys), jnp.asarray(counts), jnp.asarray(self.temps), jnp.asarray(self.top_ps),
                rows if any_items else None, units, layers, *self._adapter_args(), jnp.asarray(logprobs),
                readout=readout, blocked=Blocked(self.ecfg.attn_block, span), cpu_kernel=self.cpu_kernel)
        out = jax.device_get(out)
        self.stats["steps"] += 1
        self._last_step = time.perf_counter() - t0
        self.stats["step_seconds"] += self._last_step
        for row, seq in enumerate(self.rows):
            if seq is None:
                continue
            self.index[row] += 1
            self.stats["tokens"] += 1
            self._advance(row, seq, out)

    def _advance(self, row: int, seq: Sequence, out: StepOut) -> None:
        tok = int(out.tokens[row])
        if seq.readout:
            vals = out.readout[row, : len(seq.readout)]
            seq.readout_sum += vals
            seq.projections.append([float(x) for x in vals])
        seq.tokens.append(tok)
        entry = None
        if seq.logprobs is not None:
            k = seq.logprobs
            entry = (tok, float(out.logprobs[row]),
                     [(int(i), float(v)) for i, v in zip(out.top_ids[row, :k], out.top_logprobs[row, :k])])
        finish = None
        if tok in self.eos and not seq.ignore_eos:
            finish = "stop"
        text = self.tokenizer.decode([t for t in seq.tokens if t not in self.eos], skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in seq.stop) if i >= 0), default=-1) if seq.stop else -1
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if finish is None and (len(seq.tokens) >= seq.max_tokens or self.index[row] >= self.ecfg.max_context):
            finish = "length"
        if finish is None and seq.cancelled.is_set():
            finish = "cancelled"
        if finish is None:  # hold back an incomplete character and anything a stop string might still claim
            hold = max((len(s) - 1 for s in seq.stop), default=0)
            safe = len(text) - hold
            while safe > seq.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            delta = text[seq.sent:safe] if safe > seq.sent else ""
        else:
            delta = text[seq.sent:]
        seq.sent += len(delta)
        proj = None  # one event per generated token, so latency metrics count tokens, not text pieces
        if seq.readout:  # the tokens whose text this delta carries (held-back ones go with later text)
            proj = seq.projections[seq.projections_sent:] if delta else []
            seq.projections_sent += len(proj)
        seq.events.put(("delta", seq.index, delta, entry, proj))
        if finish is not None:
            self.rows[row] = None
            self.table.clear(row)
            self._finish(seq, finish)

    def _finish(self, seq: Sequence, reason: str) -> None:
        n = len(seq.tokens)
        readout = {}
        for j, (name, layer, _) in enumerate(seq.readout):
            mean = float(seq.readout_sum[j] / n) if n and seq.readout_sum is not None else None
            readout[name] = {"layer": layer, "mean_projection": mean, "tokens": n,
                             "per_token": [p[j] for p in seq.projections]}
        rest = seq.projections[seq.projections_sent:]
        seq.projections_sent = len(seq.projections)
        with self._lock:
            self.pending -= 1
        seq.events.put(("done", seq.index, reason, {"completion_tokens": n, "readout": readout,
                                                    "projection_rest": rest}))

    def busy(self) -> dict[str, int]:
        """``running`` (rows in use), ``queued`` (waiting for a row), ``pending`` (submitted, not finished:
        0 when nothing leaks), ``batch``."""
        prefilling = sum(p is not None for p in self.pslots)
        return {"running": sum(r is not None for r in self.rows) + prefilling, "prefilling": prefilling,
                "queued": self.waiting.qsize() + len(self.backlog), "pending": self.pending, "batch": self.ecfg.batch}

    def cache_usage(self) -> float:
        """Cache slots in use (prompt + tokens so far of every running row, prompt blocks written of every
        prefilling one) over all slots, 0..1."""
        used = sum(int(self.index[row]) for row, r in enumerate(self.rows) if r is not None)
        used += sum(p.pos for p in self.pslots if p is not None)
        return used / float(self.ecfg.batch * self.ecfg.max_context)
