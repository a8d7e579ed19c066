"""LoRA adapters on disk (Orbax): save, load, digest, and the shardings they load (or are placed) with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.checkpoint import load_orbax, quiet_absl
from jaxpersona.artifacts.records import digest
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.lora import (
    TARGETS,
    Adapter,
    AdapterStack,
    LoraConfig,
    check_adapter,
)
from jaxpersona.model.params import LAYER_AXES, param_shapes
from jaxpersona.model.sharding import TENSOR_PARALLEL


def adapter_digest(adapter: Adapter) -> str:
    return digest(*[np.asarray(x, np.float32).tobytes().hex()[:4096] for x in jax.tree.leaves(adapter)],
                  *[float(np.abs(np.asarray(x, np.float32)).sum()) for x in jax.tree.leaves(adapter)])


# --- persistence (Orbax) --------------------------------------------------------------------------
def save_adapter(path: str | Path, adapter: Adapter, cfg: ModelConfig, lcfg: LoraConfig, meta: dict[str, Any] | None = None) -> Path:
    """Write the adapter as an Orbax checkpoint plus ``adapter.json`` (model shape, rank, targets, alpha)."""
    path = Path(path).expanduser().absolute()
    ocp = load_orbax()
    info = {"family": cfg.family, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "rank": adapter.rank,
            "targets": list(adapter.targets), "alpha": lcfg.alpha, "rslora": lcfg.rslora, **(meta or {})}
    with quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(path, args=ocp.args.Composite(factors=ocp.args.StandardSave(
            {"a": {t: np.asarray(x) for t, x in adapter.a.items()}, "b": {t: np.asarray(x) for t, x in adapter.b.items()},
             "scale": np.asarray(adapter.scale)}), info=ocp.args.JsonSave(info)), force=True)
    return path


def adapter_shardings(cfg: ModelConfig, targets: Sequence[str], mesh: Any, rules: Any = None, *,
                      stacked: bool = False) -> dict[str, dict]:
    """Per factor, the ``NamedSharding`` that matches its weight's: ``a [L, in, r]`` takes the weight's input
    axis, ``b [L, r, out]`` its output axis (so ``x @ a`` and ``(x @ a) @ b`` need no extra collective).
    ``stacked``: for an :class:`~jaxpersona.model.lora.AdapterStack` (``a [L, K, in, r]``, ``b [L, K, r, out]``;
    the ``K`` axis replicated)."""
    import flax.linen as nn

    rules = rules or TENSOR_PARALLEL
    k = (None,) if stacked else ()
    out: dict[str, dict] = {"a": {}, "b": {}}
    for t in targets:
        layers, d_in, d_out = LAYER_AXES[TARGETS[t]]
        out["a"][t] = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec(layers, *k, d_in, None), mesh, rules)
        out["b"][t] = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec(layers, *k, None, d_out), mesh, rules)
    return out


def shard_adapter(adapter: Adapter | AdapterStack | None, cfg: ModelConfig, mesh: Any, rules: Any = None
                  ) -> Adapter | AdapterStack | None:
    """Place an in-memory adapter (or stack) on a ``(data, model)`` mesh with :func:`adapter_shardings`
    (the scale replicated); ``None`` stays ``None``. Use the params' ``rules`` (FSDP or tensor parallel)."""
    if adapter is None:
        return None
    check_adapter(adapter, cfg)
    stacked = isinstance(adapter, AdapterStack)
    sh = adapter_shardings(cfg, list(adapter.a), mesh, rules, stacked=stacked)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = jax.device_put((adapter.a, adapter.b, adapter.scale), (sh["a"], sh["b"], rep))
    return type(adapter)(*placed)


def load_adapter(path: str | Path, cfg: ModelConfig, mesh: Any = None) -> tuple[Adapter, dict[str, Any]]:
    """Read an adapter written by :func:`save_adapter`; raises AdapterMismatchError if it does not fit ``cfg``.
    With ``mesh`` (see :mod:`jaxpersona.model.sharding`) Orbax restores each factor straight into its shards."""
    path = Path(path).expanduser().absolute()
    if not (path / "factors").is_dir():
        raise errors.ModelNotFoundError(f"{path} is not an adapter directory (no 'factors' item); "
                                        "pass a directory written by save_adapter / jaxpersona regimes")
    ocp = load_orbax()
    with quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
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
