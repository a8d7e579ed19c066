"""Low-rank adapters (LoRA) as data: a small pytree of factors stacked over layers like the weights.

An :class:`Adapter` holds, per target matrix ``W [in, out]`` (``q k v o gate up down``), factors
``a [L, in, r]`` and ``b [L, r, out]`` and a scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
The adapter travels *beside* the params, never inside them (the params pytree is always the plain
weights): ``forward(params, cfg, tokens, adapter=..)`` lays it out per layer with :func:`layer_factors`
and scans those factors alongside the stacked weights, each block adding ``(x @ a) @ b * scale`` beside
``x @ W``; merged weights are never formed.

An :class:`AdapterStack` is several adapters on a leading ``K`` axis (different ranks are padded with
zero columns, which changes nothing); with ``adapter_select [B]`` example ``b`` uses adapter
``select[b]``, so one batched forward evaluates base (a zero adapter), several fine-tunes and their
combinations with prompts and interventions, as multi-adapter servers do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.params import param_shapes

TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
ALL_TARGETS = tuple(TARGETS)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Shape of an adapter. ``targets``: short names of :data:`TARGETS`; ``rslora``: scale ``alpha/sqrt(r)``."""

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = ALL_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise errors.InputError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise errors.InputError(f"LoRA targets {bad or '(none)'} unknown; choose from {list(TARGETS)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """Factors per target: ``a[t] [L, in, r]``, ``b[t] [L, r, out]``; ``scale []``."""

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: jax.Array

    @property
    def rank(self) -> int:
        return int(next(iter(self.a.values())).shape[-1])

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in ALL_TARGETS if t in self.a)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterStack:
    """``K`` adapters on a leading axis: ``a[t] [L, K, in, r]``, ``b[t] [L, K, r, out]``, ``scale [K]``."""

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: jax.Array

    def __len__(self) -> int:
        return int(self.scale.shape[0])


def init_adapter(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array, dtype: Any = jnp.float32) -> Adapter:
    """peft's initialisation: ``a`` uniform(+-1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), ``b`` zeros, so the
    adapted model starts as the base model."""
    lcfg.validate()
    shapes = param_shapes(cfg)["layers"]
    a, b = {}, {}
    for t, k in zip(lcfg.targets, jax.random.split(key, len(lcfg.targets))):
        n_layers, d_in, d_out = shapes[TARGETS[t]]
        bound = 1.0 / np.sqrt(d_in)
        a[t] = jax.random.uniform(k, (n_layers, d_in, lcfg.rank), jnp.float32, -bound, bound).astype(dtype)
        b[t] = jnp.zeros((n_layers, lcfg.rank, d_out), dtype)
    return Adapter(a, b, jnp.asarray(lcfg.scale, jnp.float32))


def zero_adapter(cfg: ModelConfig, lcfg: LoraConfig) -> Adapter:
    """An adapter that changes nothing (scale 0): the base model as a member of a stack."""
    ad = init_adapter(cfg, lcfg, jax.random.key(0))
    return Adapter(ad.a, ad.b, jnp.zeros((), jnp.float32))


def check_adapter(adapter: Adapter | AdapterStack, cfg: ModelConfig) -> None:
    """Raise :class:`~jaxpersona.errors.AdapterMismatchError` unless every factor fits ``cfg``'s weights."""
    shapes = param_shapes(cfg)["layers"]
    k = len(adapter) if isinstance(adapter, AdapterStack) else None  # adapters in a stack
    problems = []
    if set(adapter.a) != set(adapter.b):
        problems.append(f"factor a has targets {sorted(adapter.a)} but b has {sorted(adapter.b)}")
    for t in adapter.a:
        if t not in TARGETS:
            problems.append(f"unknown target {t!r}")
            continue
        n_layers, d_in, d_out = shapes[TARGETS[t]]
        a, b = np.shape(adapter.a[t]), np.shape(adapter.b.get(t, ()))
        lead = (n_layers,) if k is None else (n_layers, k)
        r = a[-1] if a else None
        if a != (*lead, d_in, r) or b != (*lead, r, d_out):
            problems.append(f"{t}: factors {a} / {b} do not fit this model's {TARGETS[t]} "
                            f"[{n_layers} layers, {d_in} -> {d_out}]")
    if problems:
        raise errors.AdapterMismatchError("adapter does not fit the model (trained for another model, or another "
                                          "rank/targets?):\n  " + "\n  ".join(problems))


def stack_adapters(adapters: Sequence[Adapter | None], cfg: ModelConfig) -> AdapterStack:
    """Stack adapters on a leading axis; ``None`` is the base model (a zero adapter). Targets are the union
    (a member without a target gets zero factors there); ranks are padded with zero columns to the largest."""
    live = [a for a in adapters if a is not None]
    if not adapters:
        raise errors.InputError("stack_adapters: give at least one adapter (None = the base model)")
    for a in live:
        check_adapter(a, cfg)
    targets = [t for t in ALL_TARGETS if any(t in a.a for a in live)] or ["q"]
    rank = max([a.rank for a in live] or [1])
    shapes = param_shapes(cfg)["layers"]
    a_out, b_out = {}, {}
    for t in targets:
        n_layers, d_in, d_out = shapes[TARGETS[t]]
        fa, fb = [], []
        for ad in adapters:
            if ad is None or t not in ad.a:
                fa.append(jnp.zeros((n_layers, d_in, rank), jnp.float32))
                fb.append(jnp.zeros((n_layers, rank, d_out), jnp.float32))
            else:
                pad = rank - ad.rank
                fa.append(jnp.pad(ad.a[t].astype(jnp.float32), ((0, 0), (0, 0), (0, pad))))
                fb.append(jnp.pad(ad.b[t].astype(jnp.float32), ((0, 0), (0, pad), (0, 0))))
        a_out[t], b_out[t] = jnp.stack(fa, axis=1), jnp.stack(fb, axis=1)
    scale = jnp.asarray([0.0 if ad is None else float(ad.scale) for ad in adapters], jnp.float32)
    return AdapterStack(a_out, b_out, scale)


LayerFactors = dict[str, dict[str, jax.Array]]


def layer_factors(adapter: Adapter | AdapterStack | None, select: Any = None) -> LayerFactors:
    """The adapter laid out for the layer scan, keyed by weight name (``wq``, ``w_down``, ...), every leaf
    stacked on a leading ``[L]`` axis: ``{"a": [L, in, r], "b": [L, r, out]}`` with the scale folded into
    ``b``; for a stack ``{"a": [L, K, in, r], "b": [L, K, r, out], "select": [L, B]}`` (``select [B]``,
    int: the adapter each example uses). ``None`` gives ``{}`` (no adapter). No weight is copied;
    gradients flow to the factors."""
    if adapter is None:
        return {}
    lora: LayerFactors = {}
    if isinstance(adapter, AdapterStack):
        if select is None:
            raise errors.InputError("an AdapterStack needs select=[B] (which adapter each example uses)")
        select = jnp.asarray(select, jnp.int32)
        n_layers = next(iter(adapter.a.values())).shape[0]
        sel = jnp.broadcast_to(select, (n_layers, *select.shape))
        for t in adapter.a:
            b = adapter.b[t] * adapter.scale[None, :, None, None].astype(adapter.b[t].dtype)
            lora[TARGETS[t]] = {"a": adapter.a[t], "b": b, "select": sel}
    elif isinstance(adapter, Adapter):
        for t in adapter.a:
            lora[TARGETS[t]] = {"a": adapter.a[t], "b": adapter.b[t] * adapter.scale.astype(adapter.b[t].dtype)}
    else:
        raise errors.InputError(f"adapter must be an Adapter or an AdapterStack, got {type(adapter).__name__}")
    return lora
