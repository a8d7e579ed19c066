"""Low-rank adapters (LoRA) as data: a small pytree of factors stacked over layers like the weights.

An :class:`Adapter` holds, per target matrix ``W [in, out]`` (``q k v o gate up down``), factors
``a [L, in, r]`` and ``b [L, r, out]`` and a scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
The forward adds ``(x @ a) @ b * scale`` beside ``x @ W`` inside the layer scan; merged weights are
never formed. :func:`attach` places an adapter into a params pytree (no weight is copied), so every
pure function of ``params`` — forward, generation, capture, sweeps — runs under it unchanged.

An :class:`AdapterStack` is several adapters on a leading ``K`` axis (different ranks are padded with
zero columns, which changes nothing); ``attach(params, stack, select)`` picks adapter ``select[b]`` for
example ``b``, so one batched forward evaluates base (a zero adapter), several fine-tunes and their
combinations with prompts and interventions, as multi-adapter servers do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.config import ModelConfig
from jaxpersona.models.transformer import Params, param_shapes

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
    stacked = isinstance(adapter, AdapterStack)
    problems = []
    if set(adapter.a) != set(adapter.b):
        problems.append(f"factor a has targets {sorted(adapter.a)} but b has {sorted(adapter.b)}")
    for t in adapter.a:
        if t not in TARGETS:
            problems.append(f"unknown target {t!r}")
            continue
        n_layers, d_in, d_out = shapes[TARGETS[t]]
        a, b = np.shape(adapter.a[t]), np.shape(adapter.b.get(t, ()))
        lead = (n_layers, len(adapter)) if stacked else (n_layers,)
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


def attach(params: Params, adapter: Adapter | AdapterStack | None, select: Any = None) -> Params:
    """Params with the adapter placed at ``params["layers"]["lora"]`` (scale folded into ``b``). No weight is
    copied; gradients flow to the adapter's factors. A stack needs ``select [B]`` (int, adapter per example)."""
    if adapter is None:
        return params
    layers = dict(params["layers"])
    lora = {}
    if isinstance(adapter, AdapterStack):
        if select is None:
            raise errors.InputError("an AdapterStack needs select=[B] (which adapter each example uses)")
        select = jnp.asarray(select, jnp.int32)
        n_layers = next(iter(adapter.a.values())).shape[0]
        sel = jnp.broadcast_to(select, (n_layers, *select.shape))
        for t in adapter.a:
            b = adapter.b[t] * adapter.scale[None, :, None, None].astype(adapter.b[t].dtype)
            lora[TARGETS[t]] = {"a": adapter.a[t], "b": b, "select": sel}
    else:
        for t in adapter.a:
            lora[TARGETS[t]] = {"a": adapter.a[t], "b": adapter.b[t] * adapter.scale.astype(adapter.b[t].dtype)}
    layers["lora"] = lora
    return {**params, "layers": layers}


def adapter_digest(adapter: Adapter) -> str:
    from jaxpersona.store import digest

    return digest(*[np.asarray(x, np.float32).tobytes().hex()[:4096] for x in jax.tree.leaves(adapter)],
                  *[float(np.abs(np.asarray(x, np.float32)).sum()) for x in jax.tree.leaves(adapter)])


# --- persistence (Orbax) --------------------------------------------------------------------------
def save_adapter(path: str | Path, adapter: Adapter, cfg: ModelConfig, lcfg: LoraConfig, meta: dict[str, Any] | None = None) -> Path:
    """Write the adapter as an Orbax checkpoint plus ``adapter.json`` (model shape, rank, targets, alpha)."""
    from jaxpersona.bank import _orbax, _quiet_absl

    path = Path(path).expanduser().absolute()
    ocp = _orbax()
    info = {"family": cfg.family, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "rank": adapter.rank,
            "targets": list(adapter.targets), "alpha": lcfg.alpha, "rslora": lcfg.rslora, **(meta or {})}
    with _quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(path, args=ocp.args.Composite(factors=ocp.args.StandardSave(
            {"a": {t: np.asarray(x) for t, x in adapter.a.items()}, "b": {t: np.asarray(x) for t, x in adapter.b.items()},
             "scale": np.asarray(adapter.scale)}), info=ocp.args.JsonSave(info)), force=True)
    return path


def adapter_shardings(cfg: ModelConfig, targets: Sequence[str], mesh: Any, rules: Any = None) -> dict[str, dict]:
    """Per factor, the ``NamedSharding`` that matches its weight's: ``a [L, in, r]`` takes the weight's input
    axis, ``b [L, r, out]`` its output axis (so ``x @ a`` and ``(x @ a) @ b`` need no extra collective)."""
    import flax.linen as nn

    from jaxpersona.sharding import _LAYER_AXES, TENSOR_PARALLEL

    rules = rules or TENSOR_PARALLEL
    out: dict[str, dict] = {"a": {}, "b": {}}
    for t in targets:
        layers, d_in, d_out = _LAYER_AXES[TARGETS[t]]
        out["a"][t] = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec(layers, d_in, None), mesh, rules)
        out["b"][t] = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec(layers, None, d_out), mesh, rules)
    return out


def load_adapter(path: str | Path, cfg: ModelConfig, mesh: Any = None) -> tuple[Adapter, dict[str, Any]]:
    """Read an adapter written by :func:`save_adapter`; raises AdapterMismatchError if it does not fit ``cfg``.
    With ``mesh`` (see :mod:`jaxpersona.sharding`) Orbax restores each factor straight into its shards."""
    from jaxpersona.bank import _orbax, _quiet_absl

    path = Path(path).expanduser().absolute()
    if not (path / "factors").is_dir():
        raise errors.ModelNotFoundError(f"{path} is not an adapter directory (no 'factors' item); "
                                        "pass a directory written by save_adapter / jaxpersona regimes")
    ocp = _orbax()
    with _quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        info = dict(ck.restore(path, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"])
        target = None
        if mesh is not None and info.get("n_layers") == cfg.n_layers and info.get("d_model") == cfg.d_model:
            shapes = param_shapes(cfg)["layers"]
            sh = adapter_shardings(cfg, info["targets"], mesh)
            r = int(info["rank"])
            target = {"a": {t: jax.ShapeDtypeStruct((*shapes[TARGETS[t]][:2], r), jnp.float32, sharding=sh["a"][t])
                            for t in info["targets"]},
                      "b": {t: jax.ShapeDtypeStruct((shapes[TARGETS[t]][0], r, shapes[TARGETS[t]][2]), jnp.float32,
                                                    sharding=sh["b"][t]) for t in info["targets"]},
                      "scale": jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.sharding.NamedSharding(
                          mesh, jax.sharding.PartitionSpec()))}
        got = ck.restore(path, args=ocp.args.Composite(factors=ocp.args.StandardRestore(target)))
    f = got["factors"]
    if info.get("n_layers") != cfg.n_layers or info.get("d_model") != cfg.d_model:
        raise errors.AdapterMismatchError(
            f"adapter at {path} was trained for a {info.get('family')} model with {info.get('n_layers')} layers, "
            f"d_model {info.get('d_model')}; this model has {cfg.n_layers} layers, d_model {cfg.d_model}")
    ad = Adapter({t: jnp.asarray(x) for t, x in f["a"].items()}, {t: jnp.asarray(x) for t, x in f["b"].items()},
                 jnp.asarray(f["scale"], jnp.float32))
    check_adapter(ad, cfg)
    return ad, info
