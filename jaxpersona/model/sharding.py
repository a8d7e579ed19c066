"""Parameters, activations and KV caches on a 2-D device mesh ``(data, model)``.

Every parameter dimension has a *logical* axis name (``vocab embed heads kv_heads head_dim mlp layers
norm``); rules map logical names to mesh axes, and flax's ``logical_to_mesh_sharding`` turns the logical
specs into ``NamedSharding`` s. The forward itself is unchanged: ``jit`` with sharded inputs lets XLA's
partitioner place the collectives (tensor parallelism: attention heads and the MLP width split over
``model``, one all-reduce after the attention output and one after the MLP down-projection).

Rules:
* :data:`TENSOR_PARALLEL` — heads / kv_heads / mlp / vocab over ``model``; weights replicated over ``data``;
* :data:`FSDP` — as above, plus the ``embed`` dimension of every weight over ``data`` (gathered per layer
  by the partitioner);
* activations and token batches: ``batch`` over ``data`` (a sweep shards its grid points over the mesh's
  ``data`` axis directly, see :mod:`jaxpersona.compute.sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpersona import errors
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.params import LAYER_AXES, TOP_AXES, Params, param_shapes

Rules = tuple[tuple[str, Any], ...]


TENSOR_PARALLEL: Rules = (("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
                          ("vocab", "model"), ("embed", None), ("layers", None), ("norm", None), ("head_dim", None),
                          ("seq", None))
FSDP: Rules = tuple((k, "data") if k == "embed" else (k, v) for k, v in TENSOR_PARALLEL)


def logical_axes(cfg: ModelConfig) -> Params:
    """The params pytree's structure with a ``PartitionSpec`` of *logical* names as each leaf."""
    shapes = param_shapes(cfg)
    out: Params = {k: P(*TOP_AXES[k]) for k in shapes if k != "layers"}
    out["layers"] = {k: P(*LAYER_AXES[k]) for k in shapes["layers"]}
    return out


def make_mesh(shape: Sequence[int] | str, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A ``(data, model)`` mesh, e.g. ``(2, 4)`` or ``"2x4"``, over the first ``data * model`` devices."""
    from jax.sharding import AxisType

    dims = parse_mesh(shape)
    devices = list(devices if devices is not None else jax.devices())
    need = dims[0] * dims[1]
    if need > len(devices):
        raise errors.MeshError(f"mesh {dims[0]}x{dims[1]} needs {need} devices; {len(devices)} present "
                               f"({jax.default_backend()}). Use a smaller mesh, or for a test on CPU set "
                               f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts")
    return jax.make_mesh(dims, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[:need])


def parse_mesh(shape: Sequence[int] | str) -> tuple[int, int]:
    if isinstance(shape, str):
        try:
            dims = tuple(int(x) for x in shape.lower().split("x"))
        except ValueError as e:
            raise errors.MeshError(f"mesh {shape!r}: write it as DATAxMODEL, e.g. 2x4") from e
    else:
        dims = tuple(int(x) for x in shape)
    if len(dims) != 2 or min(dims) < 1:
        raise errors.MeshError(f"mesh {shape!r}: need two positive sizes (data, model), e.g. 2x4")
    return dims  # type: ignore[return-value]


def check_divisible(cfg: ModelConfig, model_axis: int, data_axis: int = 1, fsdp: bool = False) -> None:
    """Refuse a mesh whose ``model`` axis does not divide the heads, kv heads, MLP width or vocabulary
    (and, with FSDP, whose ``data`` axis does not divide ``d_model``), naming what would fit."""
    import math

    def fits(n: int) -> str:
        return ", ".join(str(d) for d in range(1, min(n, 256) + 1) if n % d == 0)

    dims = {"attention heads": cfg.n_heads, "kv heads": cfg.n_kv_heads, "MLP width": cfg.d_ff,
            "vocabulary": cfg.vocab_size}
    every = math.gcd(*dims.values())
    for what, n in dims.items():
        if n % model_axis:
            raise errors.MeshError(f"the mesh's model axis ({model_axis}) does not divide the {what} ({n}); "
                                   f"model-axis sizes that divide heads, kv heads, MLP width and vocabulary: {fits(every)}")
    if fsdp and cfg.d_model % data_axis:
        raise errors.MeshError(f"FSDP: the mesh's data axis ({data_axis}) does not divide d_model ({cfg.d_model}); "
                               f"data-axis sizes that fit: {fits(cfg.d_model)}")


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules = TENSOR_PARALLEL) -> Params:
    """``NamedSharding`` per parameter from the logical axes and ``rules`` (flax's logical partitioning)."""
    import flax.linen as nn

    check_divisible(cfg, mesh.shape["model"], mesh.shape["data"], fsdp=any(k == "embed" and v for k, v in rules))
    return nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)


def spec(mesh: jax.sharding.Mesh, *names: str | None, rules: Rules = TENSOR_PARALLEL) -> NamedSharding:
    """The sharding of an activation / cache array with these logical dimension names."""
    import flax.linen as nn

    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


def shard_params(params: Params, cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules = TENSOR_PARALLEL) -> Params:
    """Place an in-memory params pytree on the mesh (for weights already on the host; see
    :func:`jaxpersona.model.loaders.hf.load_hf_dir_sharded` to load straight into shards)."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def per_device_bytes(shapes: Params, shardings: Params, itemsize: int) -> int:
    """Bytes of one device's shards of every array (shapes: tuples; shardings: NamedShardings)."""
    total = 0
    for shape, sh in zip(jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shardings)):
        local = sh.shard_shape(tuple(shape))
        total += int(np.prod(local)) * itemsize
    return total


def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run (several hosts, or several processes on one host) before anything touches
    the devices: ``jax.devices()`` then spans every process and the same mesh / sweep code runs unchanged.
    On CPU the cross-process collectives go through gloo."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise errors.InputError(f"process id {process_id} must be in 0..{num_processes - 1}")
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly multi-process, sharded) arrays: gathered across processes when needed."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                            if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x), tree)
    return jax.tree.map(np.asarray, tree)
