"""Continuous batching with a different intervention, adapter and readout on every row.

The engine keeps ``batch`` rows of one KV cache ``[L, B, KV, S, hd]``. A request (one *choice*) owns a row
from admission to its last token, and its tokens always sit at the same slots of that row: the prompt,
left-padded to a power-of-two bucket, at ``0 .. P-1``, generated tokens from ``P`` on. Each row is written
at its own slot (``forward(..., cache_index=[B])``), so a request's computation never depends on when it
joined or on what the other rows hold: interleaved requests give the tokens they give alone.

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

The host loop (:meth:`Engine.run`) admits waiting requests into free rows between decode steps
(arrivals with the same prompt bucket prefilled together, in a call of fixed shape), steps, and hands each
request its tokens, log-probs, text deltas and a persona readout: each generated token's residual (after
the interventions) at the readout layers projected on named unit directions — per token, on the delta that
carries the token's text, and their mean at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.generate import sample_token
from jaxpersona.edit.interventions import Cap, Mixture, Positions, Steer, pytree_dataclass
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.lora import AdapterStack, check_adapter
from jaxpersona.model.params import Params
from jaxpersona.model.sharding import spec
from jaxpersona.model.transformer import Capture, HookContext, KVCache, forward

TOP_LOGPROBS = 20  # the most top_logprobs a request may ask for (OpenAI's limit)
POSITIONS = ("all", "prompt", "response", "assistant")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static shape of the engine: ``batch`` rows x ``max_context`` cache slots, ``max_interventions`` items,
    ``max_readout`` readout directions and a mixture of at most ``max_mixture`` directions per row."""

    batch: int = 8
    max_context: int = 1024
    max_interventions: int = 4
    max_readout: int = 4
    max_queue: int = 256
    min_bucket: int = 32
    prefill_rows: int = 1  # arrivals with the same prompt bucket prefilled together (always this many rows)
    max_mixture: int = 8  # directions a request's persona mixture may hold (K <= max_mixture)

    def __post_init__(self) -> None:
        for f in ("batch", "max_context", "max_interventions", "max_readout", "max_queue", "min_bucket",
                  "prefill_rows", "max_mixture"):
            v = getattr(self, f)
            if int(v) != v or v < 1:
                raise errors.InputError(f"serve: {f} must be an integer >= 1, got {v}")
        if self.max_mixture < 2:
            raise errors.InputError(f"serve: max_mixture must be >= 2 (a mixture mixes >= 2 directions), got "
                                    f"{self.max_mixture}")
        if self.prefill_rows > self.batch:
            raise errors.InputError(f"serve: prefill_rows {self.prefill_rows} exceeds the batch {self.batch}")
        if self.max_context < 2 * self.min_bucket:
            raise errors.InputError(f"serve: max_context {self.max_context} is too small (>= {2 * self.min_bucket})")

    def bucket(self, n: int) -> int:
        """Prompt slots for an ``n``-token prompt: the next power of two >= ``min_bucket``."""
        return max(self.min_bucket, 1 << (max(n, 1) - 1).bit_length())


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


def position_mask(kind: str, prompt_len: int, bucket: int, size: int, assistant: np.ndarray | None) -> np.ndarray:
    """``[S]`` bool over a row's cache slots for a positions name. The prompt sits at ``bucket-prompt_len ..
    bucket-1``, generated tokens from ``bucket`` on. ``assistant``: the prompt's assistant-content tokens."""
    m = np.zeros(size, bool)
    first = bucket - prompt_len
    if kind == "all":
        m[first:] = True
    elif kind == "prompt":
        m[first:bucket] = True
    elif kind == "response":  # persona_vectors' "response": the last prompt token and every generated token
        m[bucket - 1:] = True
    elif kind == "assistant":  # earlier assistant turns' content and everything generated
        if assistant is not None:
            m[first:bucket] = assistant
        m[bucket:] = True
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
    key ``fold_in(keys[b], counts[b])`` (so a row's draws depend only on its own seed and step)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:
        def one(lg: jax.Array, kd: jax.Array, c: jax.Array, t: jax.Array, p: jax.Array) -> jax.Array:
            key = jax.random.fold_in(jax.random.wrap_key_data(kd), c)
            return sample_token(lg[None], key, t, p)[0].astype(jnp.int32)

        return jax.vmap(one)(logits, keys, counts, temps, top_ps)

    drawn = jax.lax.cond(jnp.any(temps > 0), sampled, lambda: greedy)
    return jnp.where(temps > 0, drawn, greedy)


@functools.partial(jax.jit, static_argnames=("cfg", "readout"), donate_argnames=("cache",))
def decode_step(params: Params, cfg: ModelConfig, cache: KVCache, logits: jax.Array, index: jax.Array,
                active: jax.Array, keys: jax.Array, counts: jax.Array, temps: jax.Array, top_ps: jax.Array,
                hook: RowInterventions | None, units: jax.Array, layers: jax.Array,
                adapter: AdapterStack | None = None, adapter_select: jax.Array | None = None, *, readout: bool
                ) -> tuple[KVCache, jax.Array, StepOut]:
    """Pick each row's next token from ``logits [B, V]`` and run it through the model at the row's slot
    ``index [B]`` (inactive rows write nothing valid), each row under its own interventions (``hook``) and
    adapter (``adapter_select [B]`` into the stack ``adapter``; both None: no adapter). ``units [B, R, D]`` /
    ``layers [B, R]``: the readout directions. Returns the cache, the next logits ``[B, V]`` and the step's
    outputs."""
    tok = pick_tokens(logits, keys, counts, temps, top_ps)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    top_lp, top_id = jax.lax.top_k(logp, TOP_LOGPROBS)
    capture = Capture(tuple(range(cfg.n_resid)), "tokens") if readout else None
    out = forward(params, cfg, tok[:, None], valid=active[:, None], cache=cache, cache_index=index, hook=hook,
                  logits="last", capture=capture, adapter=adapter, adapter_select=adapter_select)
    proj = jnp.zeros((0,), jnp.float32)
    if readout:  # captured [N, B, 1, D]: each row's readout layers, projected on its unit directions
        h = jnp.swapaxes(out.captured[:, :, 0], 0, 1).astype(jnp.float32)  # [B, N, D]
        at = jnp.take_along_axis(h, layers[:, :, None], axis=1)  # [B, R, D]
        proj = jnp.einsum("brd,brd->br", at, units)
    return out.cache, out.logits[:, 0], StepOut(tok, lp, top_id.astype(jnp.int32), top_lp, proj)


@functools.partial(jax.jit, static_argnames=("cfg", "size"))
def prefill(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array, hook: RowInterventions,
            adapter: AdapterStack | None = None, adapter_select: jax.Array | None = None, *,
            size: int) -> tuple[KVCache, jax.Array]:
    """Prompts ``tokens [R, P]`` (left-padded; R = the engine's ``prefill_rows``) into a fresh cache of ``size``
    slots, each row under its interventions and adapter (``adapter_select [R]``); returns the cache and the
    last position's logits ``[R, V]``."""
    cache = KVCache.empty(cfg, tokens.shape[0], size, params["embed"].dtype)
    out = forward(params, cfg, tokens, valid=valid, cache=cache, cache_index=0, hook=hook, logits="last",
                  adapter=adapter, adapter_select=adapter_select)
    return out.cache, out.logits[:, 0]


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

    * ``("delta", index, text, entry, projections)``: ``entry`` = ``(token, logprob, [(id, logprob), ...])``
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


class Engine:
    """Owns the model, the batch cache and the decode loop (run it on one thread: :meth:`start`)."""

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Any, eos_ids: tuple[int, ...], pad_id: int,
                 ecfg: EngineConfig, mesh: jax.sharding.Mesh | None = None, *,
                 adapters: AdapterStack | None = None) -> None:
        """``mesh``: a ``(data, model)`` mesh (params already placed on it, see :mod:`jaxpersona.model.sharding`):
        the cache's rows go over ``data`` and its kv heads over ``model``; the jitted steps follow.
        ``adapters``: LoRA adapters requests may select (member 0 the base model, a zero adapter; see
        :func:`~jaxpersona.model.lora.stack_adapters`); a sequence's ``adapter_id`` indexes it."""
        self.params, self.cfg, self.tokenizer, self.ecfg = params, cfg, tokenizer, ecfg
        if adapters is not None:
            if not isinstance(adapters, AdapterStack):
                raise errors.InputError(f"serve: adapters must be an AdapterStack (stack_adapters([None, ...])), "
                                        f"got {type(adapters).__name__}")
            check_adapter(adapters, cfg)
            if mesh is not None:
                from jaxpersona.artifacts.adapters import shard_adapter

                adapters = shard_adapter(adapters, cfg, mesh)
        self.adapters = adapters
        self.eos = set(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        b, s = ecfg.batch, ecfg.max_context
        self.cache = KVCache.empty(cfg, b, s, params["embed"].dtype)
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
        self.waiting: queue.Queue[Sequence] = queue.Queue()  # submitted (any thread)
        self.backlog: list[Sequence] = []  # taken from `waiting` by the engine thread, not yet admitted
        self.pending = 0  # sequences submitted and not finished (guarded by _lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "tokens": 0, "admitted": 0, "joined_running": 0, "prefills": 0,
                      "step_seconds": 0.0}
        self.failure: BaseException | None = None

    # --- submission (any thread) ----------------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int, param: str = "max_tokens") -> None:
        need = self.ecfg.bucket(prompt_len) + max_tokens
        limit = min(self.ecfg.max_context, self.cfg.max_position) if self.cfg.max_position else self.ecfg.max_context
        if prompt_len + max_tokens > limit or need > self.ecfg.max_context:
            raise errors.RequestError(
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}; this server holds at most "
                f"{self.ecfg.max_context} slots per sequence (prompt padded to {self.ecfg.bucket(prompt_len)} + "
                f"new tokens). Shorten the prompt or lower max_tokens", param=param, code="context_length_exceeded")

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
        for s in seqs:
            self.waiting.put(s)

    def start(self) -> None:
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
                if not any(r is not None for r in self.rows):
                    try:
                        self.backlog.append(self.waiting.get(timeout=0.05))
                    except queue.Empty:
                        pass
                    continue
                self._step()
        except BaseException as e:  # noqa: BLE001 - fail every waiter loudly rather than hang them
            self.failure = e
            self._fail_all(f"engine failure: {type(e).__name__}: {e}")
            raise
        self._fail_all("the server is shutting down")  # stopped: nobody waits forever

    def _fail_all(self, message: str) -> None:
        """End every running and queued sequence with an ``("error", ...)`` event and free its row."""
        seqs = [r for r in self.rows if r is not None] + self.backlog + self._drain()
        self.rows = [None] * len(self.rows)
        self.backlog = []
        for row in range(len(self.rows)):
            self.table.clear(row)
        for r in seqs:
            with self._lock:
                self.pending -= 1
            r.events.put(("error", r.index, message))

    def _drain(self) -> list[Sequence]:
        out = []
        while True:
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                return out

    def _admit(self) -> None:
        """Fill free rows from the queue: arrivals with the same prompt bucket (up to ``prefill_rows``) are
        prefilled together in one fixed-shape call, padded with copies of the first — no row's numbers depend
        on what else is in the call, so grouping never changes a request's tokens."""
        while True:
            self.backlog.extend(self._drain())
            free = [r for r, occ in enumerate(self.rows) if occ is None]
            for gone in [q for q in self.backlog if q.cancelled.is_set()]:  # left before they got a row
                self.backlog.remove(gone)
                self._finish(gone, "cancelled")
            if not free or not self.backlog:
                return
            bucket = self.ecfg.bucket(len(self.backlog[0].prompt))
            group = [s for s in self.backlog if self.ecfg.bucket(len(s.prompt)) == bucket and not s.cancelled.is_set()]
            group = group[: min(self.ecfg.prefill_rows, len(free))]
            for s in group:
                self.backlog.remove(s)
            self._prefill_into(free[: len(group)], group, bucket)

    def _prefill_into(self, rows: list[int], seqs: list[Sequence], p: int) -> None:
        s, r = self.ecfg.max_context, self.ecfg.prefill_rows
        tokens = np.full((r, p), self.pad_id, np.int32)
        valid = np.zeros((r, p), bool)
        for i, (row, seq) in enumerate(zip(rows, seqs)):
            n = len(seq.prompt)
            masks = [position_mask(it.positions, n, p, s, seq.assistant_mask) for it in seq.items]
            units = np.asarray([u for _, _, u in seq.readout], np.float32).reshape(len(seq.readout), self.cfg.d_model)
            mix_mask = (position_mask(seq.mixture.positions, n, p, s, seq.assistant_mask)
                        if seq.mixture is not None else None)
            self.table.set(row, seq.items, masks, units, np.asarray([l for _, l, _ in seq.readout], np.int32),
                           seq.mixture, mix_mask)
            self.adapter_select[row] = seq.adapter_id if self.adapters is not None else 0
            tokens[i, p - n:], valid[i, p - n:] = seq.prompt, True
        tokens[len(seqs):], valid[len(seqs):] = tokens[0], valid[0]  # padding rows: copies, never used
        table_rows = rows + [rows[0]] * (r - len(rows))
        self.stats["prefills"] += 1
        new, new_logits = prefill(self.params, self.cfg, jnp.asarray(tokens), jnp.asarray(valid),
                                  self.table.rows(np.asarray(table_rows)), *self._adapter_args(table_rows), size=s)
        for i, (row, seq) in enumerate(zip(rows, seqs)):
            self.cache, self.logits = insert_row(self.cache, self.logits, new, new_logits, jnp.int32(i), jnp.int32(row))
            self.stats["joined_running"] += any(x is not None and x.tokens for x in self.rows)  # joined mid-decode
            self.rows[row] = seq
            self.index[row], self.keys[row] = p, seq.key
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

    def compile_prefills(self, limit: int) -> None:
        """Compile the prefill of each prompt bucket up to ``limit`` tokens (and half the context)."""
        p = self.ecfg.min_bucket
        while p <= min(limit, self.ecfg.max_context // 2):
            r = self.ecfg.prefill_rows
            ad = (None, None) if self.adapters is None else (self.adapters, jnp.zeros((r,), jnp.int32))
            prefill(self.params, self.cfg, jnp.full((r, p), self.pad_id, jnp.int32), jnp.ones((r, p), bool),
                    self.table.rows(np.zeros(r, np.int64)), *ad, size=self.ecfg.max_context)
            p *= 2

    def _step(self) -> None:
        t0 = time.perf_counter()
        active = np.array([r is not None for r in self.rows])
        counts = np.array([len(r.tokens) if r is not None else 0 for r in self.rows], np.int32)
        any_items = any(r is not None and (r.items or r.mixture is not None) for r in self.rows)
        readout = any(r is not None and r.readout for r in self.rows)
        rows, units, layers = self.table.device()
        self.cache, self.logits, out = decode_step(
            self.params, self.cfg, self.cache, self.logits, jnp.asarray(self.index), jnp.asarray(active),
            jnp.asarray(self.keys), jnp.asarray(counts), jnp.asarray(self.temps), jnp.asarray(self.top_ps),
            rows if any_items else None, units, layers, *self._adapter_args(), readout=readout)
        out = jax.device_get(out)
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - t0
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
        if delta or entry is not None:
            proj = None
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
        return {"running": sum(r is not None for r in self.rows), "queued": self.waiting.qsize() + len(self.backlog),
                "pending": self.pending, "batch": self.ecfg.batch}

    def cache_usage(self) -> float:
        """Cache slots in use (prompt bucket + tokens so far of every running row) over all slots, 0..1."""
        used = sum(int(self.index[row]) for row, r in enumerate(self.rows) if r is not None)
        return used / float(self.ecfg.batch * self.ecfg.max_context)
