"""Interventions on the residual stream as data: steer, ablate, cap — composed, jitted, vmapped.

Each intervention is a small pytree of arrays applied at ``resid[l]`` (``resid[0]`` = embeddings,
``resid[l]`` = output of block ``l-1``) inside the compiled forward:

* :class:`Steer`  — ``h + c * w[l] * v``  (``v`` raw, or unit with ``unit=True``)
* :class:`Ablate` — ``h - <h, v̂> v̂ + m * v̂``  (``m = 0``: directional ablation; ``m`` = a mean:
  mean-ablation), optionally followed by ``+ c * v``
* :class:`Cap`    — clamp ``<h, v̂>`` to ``[lo, hi]``: ``h - max(0, <h,v̂> - hi) v̂ + max(0, lo - <h,v̂>) v̂``.
  Tokens already inside the range come out bit-identical (a ``where``, not an arithmetic no-op).

*Where*: ``layers`` is a weight per resid point ``[L+1]`` (0 = off; a steer scales by it), and a
:class:`Positions` selector says which tokens: a ``[B, P]`` mask over the prompt's slots plus a
flag ``after`` for every slot ``>= P`` (generated tokens). ``Positions.prompt()`` applies at
prefill only, which edits the KV cache of past positions and leaves later generation untouched.

*Per layer*: a ``vector`` may be ``[D]`` (one direction everywhere) or ``[L+1, D]`` (its own direction
at each resid point, e.g. the Assistant Axis); a cap's ``lo``/``hi`` may be scalars or ``[L+1]``.

*Composition*: :class:`Chain` applies its items in order at each resid point (steer-then-cap is
not cap-then-steer). Every numeric field is an array, so new values never recompile, and
``jax.vmap`` over any of them gives a batch of differently-intervened forwards. The *kind* and
*order* of interventions are structure (static).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.model.transformer import HookContext


def pytree_dataclass(cls: type) -> type:
    """Register a dataclass as a pytree: array fields are data, ``static_*`` fields are metadata."""
    fields = [f.name for f in dataclasses.fields(cls)]
    meta = [f for f in fields if f in getattr(cls, "_static", ())]
    return jax.tree_util.register_dataclass(cls, data_fields=[f for f in fields if f not in meta], meta_fields=meta)


# --- where: positions ---------------------------------------------------------------------
@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Positions:
    """Token selector. ``mask [B, P]`` over prompt slots; ``after [B]`` for slots ``>= P``."""

    mask: jax.Array
    after: jax.Array

    def at(self, ctx: HookContext) -> jax.Array:
        """Boolean ``[B, T]`` for the tokens the hook sees (by absolute slot)."""
        p = self.mask.shape[-1]
        inside = jnp.take_along_axis(self.mask, jnp.clip(ctx.slots, 0, p - 1), axis=-1)
        return jnp.where(ctx.slots < p, inside, self.after[..., None]) & ctx.valid

    # Constructors. ``valid [B, P]`` is the prompt batch's padding mask.
    @staticmethod
    def all(valid: Any) -> Positions:
        valid = jnp.asarray(valid, bool)
        return Positions(valid, jnp.ones(valid.shape[:1], bool))

    @staticmethod
    def prompt(valid: Any) -> Positions:
        """Prompt tokens only (prefill): with a KV cache this edits past positions only."""
        valid = jnp.asarray(valid, bool)
        return Positions(valid, jnp.zeros(valid.shape[:1], bool))

    @staticmethod
    def response(valid: Any) -> Positions:
        """The last prompt token and every generated token (persona_vectors' "response")."""
        valid = jnp.asarray(valid, bool)
        last = jnp.zeros_like(valid).at[:, -1].set(True)
        return Positions(last, jnp.ones(valid.shape[:1], bool))

    @staticmethod
    def explicit(mask: Any, after: Any = False) -> Positions:
        mask = jnp.asarray(mask, bool)
        if mask.ndim != 2:
            raise errors.InputError(f"Positions.explicit: mask must be [B, P] (batch, prompt slots), got shape "
                                    f"{tuple(mask.shape)}")
        return Positions(mask, jnp.broadcast_to(jnp.asarray(after, bool), mask.shape[:1]))


def whole_indices(layers: Any, what: str = "layers") -> np.ndarray:
    """``layers`` (an int, list or range) as an int64 array, or :class:`~jaxpersona.errors.InputError` when empty,
    not numbers, or not whole (``1.5``; a bool is not an index either). No range check."""
    raw = np.atleast_1d(np.asarray(list(layers) if isinstance(layers, range) else layers))
    if raw.size == 0 or not np.issubdtype(raw.dtype, np.number) or np.any(raw != np.round(raw)):
        raise errors.InputError(f"{what} must be whole resid indices, got {layers!r}")
    return raw.astype(np.int64)


def layer_weights(n_resid: int, layers: Any, weight: float = 1.0) -> jax.Array:
    """``[L+1]`` weights: ``weight`` at each resid index in ``layers`` (an int, list or range)."""
    idx = whole_indices(layers)
    bad = idx[(idx < 0) | (idx >= n_resid)]
    if bad.size:
        raise errors.InputError(
            f"layers {bad.tolist()} are outside resid[0..{n_resid - 1}] "
            "(resid[0] = embeddings, resid[l] = output of block l-1)"
        )
    return jnp.zeros((n_resid,), jnp.float32).at[idx].set(weight)


def _unit(v: jax.Array) -> jax.Array:
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _at(x: jax.Array, layer: jax.Array, per_layer_ndim: int) -> jax.Array:
    """``x[layer]`` when ``x`` has a leading per-resid-point axis (``ndim == per_layer_ndim``), else ``x``."""
    return x[layer] if x.ndim == per_layer_ndim else x


def _proj(h: jax.Array, u: jax.Array) -> jax.Array:
    """``<h, u>`` in float32: ``[B, T]``."""
    return jnp.einsum("btd,d->bt", h.astype(jnp.float32), u)


# --- what: the three interventions --------------------------------------------------------
@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Steer:
    """``h + coeff * layers[l] * v`` at the selected positions."""

    vector: jax.Array  # [D] or [L+1, D]
    coeff: jax.Array  # []
    layers: jax.Array  # [L+1]
    positions: Positions
    unit: bool = False
    _static = ("unit",)

    def __call__(self, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
        v = _at(self.vector, layer, 2)
        v = _unit(v) if self.unit else v
        w = self.layers[layer]
        on = self.positions.at(ctx) & (self.coeff * w != 0)  # c*w == 0 leaves h bit-identical
        add = (self.coeff * w) * v.astype(jnp.float32)
        return jnp.where(on[..., None], (h.astype(jnp.float32) + add).astype(h.dtype), h)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Ablate:
    """Project ``v̂`` out: ``h - <h,v̂> v̂ + mean * v̂ (+ coeff * v)`` where ``layers[l] != 0``."""

    vector: jax.Array  # [D] or [L+1, D]
    layers: jax.Array  # [L+1]
    positions: Positions
    mean: jax.Array  # [] projection value to restore (0 = plain ablation)
    coeff: jax.Array  # [] optional re-add of coeff * v

    def __call__(self, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
        v = _at(self.vector, layer, 2).astype(jnp.float32)
        u = _unit(v)
        on = self.positions.at(ctx) & (self.layers[layer] != 0)
        hf = h.astype(jnp.float32)
        new = hf + (self.mean - _proj(h, u))[..., None] * u + self.coeff * v
        return jnp.where(on[..., None], new.astype(h.dtype), h)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Cap:
    """Clamp ``<h, v̂>`` into ``[lo, hi]`` (use ``-inf`` / ``inf`` for a one-sided cap)."""

    vector: jax.Array  # [D] or [L+1, D]
    lo: jax.Array  # [] or [L+1]
    hi: jax.Array  # [] or [L+1]
    layers: jax.Array  # [L+1]
    positions: Positions

    def __call__(self, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
        u = _unit(_at(self.vector, layer, 2).astype(jnp.float32))
        lo, hi = _at(self.lo, layer, 1), _at(self.hi, layer, 1)
        p = _proj(h, u)
        shift = jnp.maximum(0.0, lo - p) - jnp.maximum(0.0, p - hi)
        outside = (p > hi) | (p < lo)
        on = self.positions.at(ctx) & (self.layers[layer] != 0) & outside
        new = h.astype(jnp.float32) + shift[..., None] * u
        return jnp.where(on[..., None], new.astype(h.dtype), h)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Chain:
    """An ordered composition: ``items[0]`` first, at every resid point."""

    items: tuple

    def __call__(self, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
        for it in self.items:
            h = it(layer, h, ctx)
        return h


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Mixture:
    """A mix of persona directions: ``h + alpha * sum_k w_k v_k`` where ``layers[l] != 0``.

    ``conditional`` (static): ``w = softmax(<h, v̂_k> / tau)`` over the bank, from the current residual
    at each token (context-conditional); otherwise the fixed ``weights``. ``vectors [K, D]``."""

    vectors: jax.Array  # [K, D]
    alpha: jax.Array  # []
    tau: jax.Array  # []
    weights: jax.Array  # [K], or [B, K] per row (used when not conditional)
    layers: jax.Array  # [L+1]
    positions: Positions
    conditional: bool = True
    _static = ("conditional",)

    def mix(self, h: jax.Array) -> jax.Array:
        """The weights ``[B, T, K]`` at residual ``h [B, T, D]``."""
        if not self.conditional:
            w = self.weights.astype(jnp.float32)
            w = w[:, None, :] if w.ndim == 2 else w
            return jnp.broadcast_to(w, (*h.shape[:-1], self.vectors.shape[0]))
        u = _unit(self.vectors.astype(jnp.float32))
        return jax.nn.softmax(jnp.einsum("btd,kd->btk", h.astype(jnp.float32), u) / self.tau, axis=-1)

    def __call__(self, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
        add = self.alpha * jnp.einsum("btk,kd->btd", self.mix(h), self.vectors.astype(jnp.float32))
        on = self.positions.at(ctx) & (self.layers[layer] != 0) & (self.alpha != 0)
        return jnp.where(on[..., None], (h.astype(jnp.float32) + add).astype(h.dtype), h)


# --- friendly constructors with validation ------------------------------------------------
def _vector(v: Any, d_model: int, what: str) -> jax.Array:
    v = np.asarray(v, np.float32)
    if v.ndim == 0:
        raise errors.InputError(f"{what}: expected a vector of shape [d_model], got a scalar")
    if v.shape[-1:] != (d_model,) or v.ndim > 2:
        raise errors.InputError(f"{what}: vector has shape {v.shape}, expected [d_model={d_model}] or [L+1, d_model]")
    if not np.all(np.isfinite(v)):
        raise errors.InputError(f"{what}: vector contains NaN or inf")
    if what != "steer" and np.any(np.linalg.norm(v, axis=-1) == 0):
        raise errors.InputError(f"{what}: zero vector has no direction")
    return jnp.asarray(v)


def _scalar(x: Any, what: str, allow_inf: bool = False, per_layer: bool = False) -> jax.Array:
    """A float32 scalar (``per_layer``: or an ``[L+1]`` vector, checked against the model later)."""
    try:
        a = np.asarray(x, np.float32)
    except (TypeError, ValueError) as e:
        raise errors.InputError(f"{what} must be a number, got {x!r:.60}") from e
    if a.ndim > (1 if per_layer else 0):
        raise errors.InputError(f"{what} must be a number{' (or one per resid point)' if per_layer else ''}, got "
                                f"shape {a.shape}")
    if np.any(np.isnan(a)) or (not allow_inf and not np.all(np.isfinite(a))):
        raise errors.InputError(f"{what} must be finite, got {x}")
    return jnp.asarray(a)


def steer(n_resid: int, vector: Any, coeff: Any, layers: Any, positions: Positions, unit: bool = False) -> Steer:
    """A validated :class:`Steer`: ``h + coeff * v`` at resid points ``layers`` (an int, list or range of
    ``0..n_resid-1``) and ``positions``. ``vector``: ``[D]`` or ``[L+1, D]`` (``unit``: normalised first)."""
    v = _vector(vector, np.shape(vector)[-1] if np.ndim(vector) else 0, "steer")
    return Steer(v, _scalar(coeff, "steer coeff"), layer_weights(n_resid, layers), positions, unit)


def ablate(n_resid: int, vector: Any, layers: Any, positions: Positions, mean: Any = 0.0, coeff: Any = 0.0) -> Ablate:
    """A validated :class:`Ablate`: project ``v̂`` out at ``layers``/``positions``, put back ``mean * v̂``
    (0: directional ablation) and add ``coeff * v``. ``vector``: ``[D]`` or ``[L+1, D]``, non-zero."""
    v = _vector(vector, np.shape(vector)[-1] if np.ndim(vector) else 0, "ablate")
    return Ablate(v, layer_weights(n_resid, layers), positions, _scalar(mean, "ablate mean"),
                  _scalar(coeff, "ablate coeff"))


def cap(n_resid: int, vector: Any, layers: Any, positions: Positions, lo: Any = -np.inf, hi: Any = np.inf) -> Cap:
    """A validated :class:`Cap`: clamp ``<h, v̂>`` to ``[lo, hi]`` at ``layers``/``positions`` (bounds scalars
    or ``[L+1]``; ``-inf``/``inf`` leave that side open). ``vector``: ``[D]`` or ``[L+1, D]``, non-zero."""
    v = _vector(vector, np.shape(vector)[-1] if np.ndim(vector) else 0, "cap")
    lo_a, hi_a = (_scalar(lo, "cap floor", allow_inf=True, per_layer=True),
                  _scalar(hi, "cap ceiling", allow_inf=True, per_layer=True))
    if np.any(np.asarray(lo_a) > np.asarray(hi_a)):
        raise errors.InputError(f"cap floor {lo} is above the ceiling {hi}")
    if np.any(np.asarray(hi_a) == -np.inf) or np.any(np.asarray(lo_a) == np.inf):
        raise errors.InputError(f"cap range [{lo}, {hi}] is empty (a ceiling of -inf or a floor of +inf)")
    return Cap(v, lo_a, hi_a, layer_weights(n_resid, layers), positions)


def mixture(n_resid: int, vectors: Any, layers: Any, positions: Positions, alpha: Any, tau: Any = 1.0,
            weights: Any = None) -> Mixture:
    """A :class:`Mixture` over ``vectors [K, D]`` (K >= 2): context-conditional with temperature ``tau > 0``,
    or fixed ``weights`` when given (``[K]``, or ``[B, K]``: one mix per batch row)."""
    raw = np.asarray(vectors, np.float32)
    if raw.ndim != 2 or raw.shape[0] < 2:
        raise errors.InputError(f"a mixture needs a bank of >= 2 vectors [K, D], got shape {raw.shape}")
    v = _vector(raw, raw.shape[-1], "mixture")
    t = np.asarray(tau, np.float32)
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise errors.InputError(f"mixture temperature tau must be > 0, got {tau}")
    if weights is None:
        w, cond = np.full(v.shape[0], 1.0 / v.shape[0], np.float32), True
    else:
        w, cond = np.asarray(weights, np.float32), False
        if w.shape[-1:] != (v.shape[0],) or w.ndim > 2 or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise errors.InputError(f"mixture weights must be {v.shape[0]} finite non-negative numbers, got {weights}")
    return Mixture(v, _scalar(alpha, "mixture alpha"), jnp.asarray(t), jnp.asarray(w), layer_weights(n_resid, layers),
                   positions, cond)


def check_for_model(hook: Any, d_model: int, n_resid: int, batch: tuple[int, int] | None = None) -> None:
    """Raise :class:`~jaxpersona.errors.InputError` if an intervention (or any item of a possibly
    nested :class:`Chain`) does not fit the model — or, with ``batch = (B, T)``, the batch it is applied to: its
    :class:`Positions` (and a mixture's per-row weights) must have ``B`` rows or one. Their width is not checked:
    a mask narrower than the batch is meaningful (slots past it are ``after``; ``[B, 1]`` all True with ``after``
    is "every token"), so positions from a shorter batch of the same rows cannot be told from it — build them from
    the batch they run on. Other hooks pass through unchecked."""
    def flat(h: Any) -> list[Any]:
        return [x for it in h.items for x in flat(it)] if isinstance(h, Chain) else [h]

    for it in flat(hook):
        if not isinstance(it, (Steer, Ablate, Cap, Mixture)):
            continue  # a user-defined hook: its own business
        pos = getattr(it, "positions", None)
        if batch is not None and isinstance(pos, Positions):
            b = batch[0]
            if pos.mask.ndim != 2 or pos.mask.shape[0] not in (1, b) or pos.after.shape[-1:] != pos.mask.shape[:1]:
                raise errors.InputError(
                    f"{type(it).__name__}: its positions were made for a prompt batch of shape "
                    f"{tuple(pos.mask.shape)}, this batch has {b} rows: build them from this batch's `valid` "
                    "(Positions.all/prompt/response(batch.valid))")
        if batch is not None and isinstance(it, Mixture) and it.weights.ndim == 2 and \
                it.weights.shape[0] not in (1, batch[0]):
            raise errors.InputError(f"Mixture: per-row weights for {it.weights.shape[0]} rows; this batch has "
                                    f"{batch[0]}")
        vec = it.vectors if isinstance(it, Mixture) else it.vector
        if vec.shape[-1] != d_model:
            raise errors.InputError(
                f"{type(it).__name__}: vector dimension {vec.shape[-1]} != model d_model {d_model}"
            )
        if not isinstance(it, Mixture) and it.vector.ndim == 2 and it.vector.shape[0] != n_resid:
            raise errors.InputError(
                f"{type(it).__name__}: per-layer vectors cover {it.vector.shape[0]} resid points; this model has "
                f"resid[0..{n_resid - 1}] ({n_resid} points): vectors from another model?"
            )
        if isinstance(it, Cap) and any(b.ndim == 1 and b.shape[0] != n_resid for b in (it.lo, it.hi)):
            raise errors.InputError(f"Cap: per-layer bounds have {it.lo.shape}/{it.hi.shape} entries; this model has "
                                    f"{n_resid} resid points")
        if it.layers.shape[-1] != n_resid:
            raise errors.InputError(
                f"{type(it).__name__}: layer weights have {it.layers.shape[-1]} entries; this model has "
                f"resid[0..{n_resid - 1}] ({n_resid} points)"
            )


# --- interventions as arguments of a compiled function (training's prevention) --------------------
INTERVENTION_KINDS = "Steer, Ablate, Cap, Mixture, a Chain of them, or a pytree-registered hook(layer, h, ctx) " \
                     "whose leaves are arrays"


def at_positions(hook: Any, positions: Positions) -> Any:
    """``hook`` acting at ``positions``: every intervention with a ``positions`` field (also inside a
    possibly nested :class:`Chain`) gets ``positions``; a user-defined hook without one is returned as is."""
    if isinstance(hook, Chain):
        return Chain(tuple(at_positions(h, positions) for h in hook.items))
    if dataclasses.is_dataclass(hook) and not isinstance(hook, type) and \
            any(f.name == "positions" for f in dataclasses.fields(hook)):
        return dataclasses.replace(hook, positions=positions)
    return hook


def check_hook_argument(hook: Any, what: str) -> None:
    """Raise :class:`~jaxpersona.errors.InputError` unless ``hook`` can be an *argument* of a compiled forward
    (as training's prevention is): a callable ``hook(layer, h, ctx)`` that is a pytree of arrays, a
    :class:`Chain` included (each of its items callable). The message names what is accepted."""
    def bad(detail: str) -> errors.InputError:
        return errors.InputError(f"{what}: {detail}; accepted: {INTERVENTION_KINDS} (the hooks the forward takes)")

    def walk(h: Any) -> None:
        if isinstance(h, Chain):
            if not isinstance(h.items, tuple) or not h.items:
                raise bad("a Chain needs a non-empty tuple of interventions")
            for it in h.items:
                walk(it)
        elif isinstance(h, (list, tuple)):
            raise bad(f"got a {type(h).__name__} of {len(h)} hooks; compose them with Chain((...))")
        elif not callable(h):
            raise bad(f"got a {type(h).__name__}, which is not a hook(layer, h, ctx)")

    walk(hook)
    for leaf in jax.tree.leaves(hook):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, bool, int, float)):
            raise bad(f"{type(hook).__name__} holds a {type(leaf).__name__} leaf ({leaf!r:.60}), not an array "
                      "(register the hook as a pytree dataclass with array fields)")
