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

Activations sharded on purpose: the forward calls :func:`constrain` on the residual ``[batch, seq, embed]`` at
block boundaries (and after the attention's residual add), on q ``[batch, seq, heads, head_dim]``, k / v
``[batch, kv_heads, seq, head_dim]``, the MLP hidden ``[batch, seq, mlp]`` and the logits ``[batch, seq, vocab]``.
The constraints act only while a caller has set a mesh with axes ``data`` and ``model`` (``with
jax.set_mesh(mesh): ...`` around the jitted call, or around its first call / ``.lower``); without one (one device,
or a caller that only shards its inputs) they are no-ops and the compiled program is unchanged. One rule set,
:data:`ACTIVATIONS`, serves both :data:`TENSOR_PARALLEL` and :data:`FSDP`: they differ only in where the
*weights'* ``embed`` dimension lives; activations are ``batch`` over ``data`` and heads / MLP width / vocabulary
over ``model`` in both. A dimension its mesh axis does not divide (an odd batch) is left to XLA's propagation.
Sequence sharding (context parallelism for long prefill) is not offered: ``seq`` is never constrained.

KV heads fewer than the model axis (Llama-3.3-70B: 8 KV heads on a 16-way model axis): :func:`layout_for_mesh`
gives the config to use, whose KV heads are each repeated ``r = model / kv`` times (:func:`replicate_kv_heads`
turns params into it; :func:`jaxpersona.model.loaders.hf.load_hf_dir_sharded` loads straight into it), so every
device holds one KV head: exact grouped-query attention, at ``r`` times the KV cache.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpersona import errors
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.params import LAYER_AXES, TOP_AXES, Params, param_shapes

Rules = tuple[tuple[str, Any], ...]
AnyMesh = jax.sharding.Mesh | jax.sharding.AbstractMesh  # an AbstractMesh: shardings planned without devices


TENSOR_PARALLEL: Rules = (("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
                          ("vocab", "model"), ("embed", None), ("layers", None), ("norm", None), ("head_dim", None),
                          ("seq", None))
FSDP: Rules = tuple((k, "data") if k == "embed" else (k, v) for k, v in TENSOR_PARALLEL)
# Activations (and KV caches) under either rule set: batch over data; heads, MLP width and vocabulary over
# model; the embedding dimension, positions and head_dim whole (FSDP shards only the weights' embed dim).
ACTIVATIONS: Rules = TENSOR_PARALLEL


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``x`` with a sharding constraint from its logical dimension ``names`` (one per dimension, mapped by
    :data:`ACTIVATIONS`), when the ambient mesh (``jax.set_mesh``) has axes ``data`` and ``model`` of type Auto;
    otherwise ``x`` unchanged (no mesh: the traced program is identical). A dimension whose size its mesh axis
    does not divide is left unconstrained (XLA's propagation decides); a dimension mapped to no axis is whole."""
    from jax.sharding import AxisType

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "model"} <= set(mesh.axis_names):
        return x
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if types["data"] != AxisType.Auto or types["model"] != AxisType.Auto:
        return x  # explicit / manual axes (shard_map): the caller owns the layout
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {names} for an array of shape {x.shape}")
    rules = dict(ACTIVATIONS)
    dims: list[Any] = []
    for name, size in zip(names, x.shape):
        axis = rules.get(name) if name is not None else None
        if axis is not None and size % mesh.shape[axis]:
            dims.append(P.UNCONSTRAINED)
        else:
            dims.append(axis)
    return jax.lax.with_sharding_constraint(x, P(*dims))


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


def mesh_option(shape: Sequence[int] | str | None) -> jax.sharding.Mesh | None:
    """A pipeline's ``mesh=`` option: None (one device) or :func:`make_mesh` of it, built before any work so a
    bad mesh fails first."""
    return make_mesh(shape) if shape is not None else None


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


def _sizes(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 256) + 1) if n % d == 0)


def fitting_model_axes(cfg: ModelConfig) -> list[int]:
    """Model-axis sizes a config fits: they divide the attention heads, MLP width and vocabulary, and either
    divide the KV heads or are a multiple of them (KV heads then replicated, :func:`kv_replication`)."""
    return [m for m in range(1, cfg.n_heads + 1)
            if not (cfg.n_heads % m or cfg.d_ff % m or cfg.vocab_size % m)
            and (cfg.n_kv_heads % m == 0 or m % cfg.n_kv_heads == 0)]


def check_divisible(cfg: ModelConfig, model_axis: int, data_axis: int = 1, fsdp: bool = False) -> None:
    """Refuse a mesh whose ``model`` axis does not divide the heads, MLP width or vocabulary, or neither divides
    nor is a multiple of the KV heads (and, with FSDP, whose ``data`` axis does not divide ``d_model``), naming
    what would fit. A multiple of the KV heads is accepted: see :func:`layout_for_mesh`."""
    fits = ", ".join(str(m) for m in fitting_model_axes(cfg))
    dims = {"attention heads": cfg.n_heads, "MLP width": cfg.d_ff, "vocabulary": cfg.vocab_size}
    for what, n in dims.items():
        if n % model_axis:
            raise errors.MeshError(f"the mesh's model axis ({model_axis}) does not divide the {what} ({n}); "
                                   f"model-axis sizes that fit heads, kv heads, MLP width and vocabulary: {fits}")
    if cfg.n_kv_heads % model_axis and model_axis % cfg.n_kv_heads:
        raise errors.MeshError(f"the mesh's model axis ({model_axis}) neither divides the kv heads "
                               f"({cfg.n_kv_heads}) nor is a multiple of them (to replicate them); "
                               f"model-axis sizes that fit heads, kv heads, MLP width and vocabulary: {fits}")
    if fsdp and cfg.d_model % data_axis:
        raise errors.MeshError(f"FSDP: the mesh's data axis ({data_axis}) does not divide d_model ({cfg.d_model}); "
                               f"data-axis sizes that fit: {_sizes(cfg.d_model)}")


def kv_replication(cfg: ModelConfig, model_axis: int) -> int:
    """How many times each KV head must be repeated for ``model_axis``-way tensor parallelism: 1 when the
    axis divides the KV heads, ``model_axis // n_kv_heads`` when it is a multiple of them (and divides the
    query heads); a :class:`~jaxpersona.errors.MeshError` naming the sizes that fit otherwise."""
    check_divisible(cfg, model_axis)
    return 1 if cfg.n_kv_heads % model_axis == 0 else model_axis // cfg.n_kv_heads


def replicated_config(cfg: ModelConfig, r: int) -> ModelConfig:
    """``cfg`` with each KV head repeated ``r`` times (``n_kv_heads * r``); the query heads are unchanged."""
    if r < 1 or cfg.n_heads % (cfg.n_kv_heads * r):
        raise errors.MeshError(f"cannot repeat {cfg.n_kv_heads} kv heads {r} times: {cfg.n_heads} query heads "
                               f"must be a multiple of {cfg.n_kv_heads * r}")
    return cfg if r == 1 else dataclasses.replace(cfg, n_kv_heads=cfg.n_kv_heads * r)


KV_WEIGHTS = ("wk", "wv", "bk", "bv")  # per-layer weights whose last dim is kv_heads * head_dim


def kv_source_columns(cfg: ModelConfig, r: int, start: int, stop: int) -> np.ndarray:
    """Columns of the original ``[..., KV * hd]`` k/v weights that columns ``start..stop-1`` of the replicated
    ``[..., KV * r * hd]`` ones copy: new head ``j`` is original head ``j // r``."""
    cols = np.arange(start, stop)
    hd = cfg.head_dim
    return (cols // hd // r) * hd + cols % hd


def replicate_kv_heads(cfg: ModelConfig, params: Params, r: int) -> tuple[ModelConfig, Params]:
    """``(replicated_config(cfg, r), params)`` with each KV head of ``wk wv bk bv`` repeated ``r`` times in a
    row (new head ``j`` = original head ``j // r``), so query head ``i`` still attends with original KV head
    ``i // (H / KV)``: exact grouped-query attention. Works on numpy or jax arrays (not sharded on purpose:
    ``jax.device_put`` the result with :func:`param_shardings` of the new config)."""
    new_cfg = replicated_config(cfg, r)
    if r == 1:
        return cfg, params
    import jax.numpy as jnp

    def rep(a: Any) -> Any:
        lead = a.shape[:-1]
        xp = np if isinstance(a, np.ndarray) else jnp
        heads = a.reshape(*lead, cfg.n_kv_heads, cfg.head_dim)
        return xp.repeat(heads, r, axis=-2).reshape(*lead, cfg.n_kv_heads * r * cfg.head_dim)

    layers = {k: rep(v) if k in KV_WEIGHTS else v for k, v in params["layers"].items()}
    return new_cfg, {**params, "layers": layers}


def layout_for_mesh(cfg: ModelConfig, mesh_shape: Sequence[int] | str | AnyMesh,
                    fsdp: bool = False) -> tuple[ModelConfig, int]:
    """``(cfg to use on this mesh, r)``: checks the mesh fits (:func:`check_divisible`) and repeats each KV
    head ``r`` times when the model axis exceeds them (``r = 1``: ``cfg`` itself). Build params, shardings and
    KV caches from the returned config: ``param_shapes(cfg_used)``, ``param_shardings(cfg_used, mesh, rules)``,
    ``kv_cache_sharding(mesh)``; turn loaded params into it with :func:`replicate_kv_heads`."""
    if isinstance(mesh_shape, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        data, model = mesh_shape.shape["data"], mesh_shape.shape["model"]
    else:
        data, model = parse_mesh(mesh_shape)
    check_divisible(cfg, model, data, fsdp)
    r = kv_replication(cfg, model)
    return replicated_config(cfg, r), r


def kv_cache_sharding(mesh: AnyMesh) -> NamedSharding:
    """The sharding of a KV cache's ``k`` / ``v`` ``[L, B, KV, S, hd]``: batch over data, KV heads over model
    (use the config of :func:`layout_for_mesh`, whose KV heads the model axis divides)."""
    return spec(mesh, "layers", "batch", "kv_heads", None, "head_dim")


def param_shardings(cfg: ModelConfig, mesh: AnyMesh, rules: Rules = TENSOR_PARALLEL) -> Params:
    """``NamedSharding`` per parameter from the logical axes and ``rules`` (flax's logical partitioning).
    ``mesh`` may be a ``jax.sharding.AbstractMesh`` (plan shardings for a mesh this host does not have). A model
    axis larger than the KV heads is refused: use the config of :func:`layout_for_mesh`."""
    import flax.linen as nn

    model = mesh.shape["model"]
    check_divisible(cfg, model, mesh.shape["data"], fsdp=any(k == "embed" and v for k, v in rules))
    if cfg.n_kv_heads % model:
        raise errors.MeshError(f"the mesh's model axis ({model}) exceeds the {cfg.n_kv_heads} kv heads: repeat "
                               f"them first: cfg, r = layout_for_mesh(cfg, mesh); cfg, params = "
                               f"replicate_kv_heads(cfg, params, r) (load_hf_dir_sharded does it itself)")
    return nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)  # type: ignore[arg-type]


def spec(mesh: AnyMesh, *names: str | None, rules: Rules = TENSOR_PARALLEL) -> NamedSharding:
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
    if num_processes < 1:
        raise errors.InputError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise errors.InputError(f"process id {process_id} must be in 0..{num_processes - 1}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise errors.InputError(f"--coordinator {coordinator!r}: give HOST:PORT (e.g. 10.0.0.1:1234)")
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


# --- collectives of a compiled program --------------------------------------------------------------------
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                  "collective-broadcast", "ragged-all-to-all")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*(?:->.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


class Collective(NamedTuple):
    """One collective of a compiled HLO module (async ``-start``/``-done`` pairs counted once, at ``-done``).

    ``kind``: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``, ``collective-permute``...;
    ``shapes``: the result arrays as ``(dtype, dims)``; ``bytes``: their total size (per device, per execution);
    ``in_loop``: inside a while loop's body (a ``lax.scan``: the layer scan) or something it calls; ``loop``:
    the outermost such body's name (None outside loops); ``trips``: that loop's trip count (XLA's
    ``known_trip_count``, else the constant its condition compares the counter with; None when neither says);
    ``trip_counts``: the counts of every enclosing loop, outermost first (a decode loop around the layer scan);
    ``group_size``: devices per replica group (None when not stated); ``computation``: the computation it sits
    in."""

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bytes: int
    in_loop: bool
    loop: str | None
    trips: int | None
    group_size: int | None
    computation: str
    name: str
    trip_counts: tuple[int | None, ...] = ()  # every enclosing loop's trip count, outermost first

    def times(self, unknown: int = 1) -> int:
        """How often it runs per execution of the program: the product of its enclosing loops' trip counts
        (``unknown`` for a loop whose count neither XLA records nor its condition states)."""
        return int(np.prod([n if n is not None else unknown for n in self.trip_counts], dtype=np.int64))


def _group_size(attrs: str) -> int | None:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:  # replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'}: the named axes' product
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return int(np.prod([sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2))]))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
    if m:
        return len(m.group(1).split(",")) if m.group(1) else None
    return None


def _condition_bound(comps: dict[str, list[tuple[str, str, str, str]]], cond: str) -> int | None:
    """A loop condition's trip count when it compares a counter with one integer constant (``i < N``, as
    ``lax.scan`` and ``fori_loop`` lower, on backends that record no ``known_trip_count``; the compare may sit in a
    fusion the condition calls), else None."""
    todo, seen = [cond], set()
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        instrs = comps[c]
        consts = {n: r for n, _, op, r in instrs if op == "constant"}
        for _, _, op, rest in instrs:
            if op == "compare" and "direction=LT" in rest:
                for operand in re.findall(r"%?([\w.\-]+)", rest.split(")")[0]):
                    m = re.match(r"\s*(-?\d+)\s*\)?", consts.get(operand, ""))
                    if m:
                        return int(m.group(1))
            todo += re.findall(r"\bcalls=%?([\w.\-]+)", rest)
    return None


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of an HLO module's text (``jax.jit(f).lower(...).compile().as_text()``), in program
    order, each with its kind, result shapes, bytes and whether it runs inside a loop body (a scan)."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}  # computation -> [(name, type, opcode, rest)]
    order: list[str] = []
    current: str | None = None
    entry: str | None = None
    for line in hlo_text.splitlines():
        if current is None or line.rstrip() == "}":
            m = _HEADER.match(line) if current is None else None
            if m:
                current = m.group(1)
                comps[current] = []
                order.append(current)
                if line.lstrip().startswith("ENTRY"):
                    entry = current
            elif line.rstrip() == "}":
                current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append((m.group(1), m.group(2), m.group(3), m.group(4)))

    called: dict[str, list[str]] = {c: [] for c in comps}
    bodies: dict[str, int | None] = {}  # while body -> trip count
    for c, instrs in comps.items():
        for _, _, op, rest in instrs:
            for m in re.finditer(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)="
                                 r"%?([\w.\-]+)", rest):
                called[c].append(m.group(1))
            for m in re.finditer(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}", rest):
                called[c] += [x.strip().lstrip("%") for x in m.group(1).split(",") if x.strip()]
            if op == "while":
                b = re.search(r"\bbody=%?([\w.\-]+)", rest)
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
                if b:
                    bodies[b.group(1)] = int(n.group(1)) if n else (cond and _condition_bound(comps, cond.group(1)))

    chain_of: dict[str, tuple[str, ...]] = {}  # computation -> the loop bodies around it, outermost first

    def walk(c: str, chain: tuple[str, ...]) -> None:
        if c not in comps or (c in chain_of and len(chain_of[c]) >= len(chain)):
            return
        chain_of[c] = chain
        for d in called.get(c, []):
            walk(d, chain + (d,) if d in bodies else chain)

    if entry is not None:
        walk(entry, ())
    for body in bodies:  # bodies not reached from the entry (should not happen)
        if body not in chain_of:
            walk(body, (body,))

    out = []
    for c in order:
        for name, typ, op, rest in comps[c]:
            base = op[:-5] if op.endswith("-done") else op
            if base not in COLLECTIVE_OPS or op.endswith("-start"):
                continue
            shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(typ)
                           if dt in _ITEMSIZE)
            size = sum(_ITEMSIZE[dt] * int(np.prod(dims, dtype=np.int64)) for dt, dims in shapes)
            if op.endswith("-done"):  # the attributes sit on the start: find it by the operand name
                start = re.match(r"\s*%?([\w.\-]+)", rest)
                attrs = next((r for n, _, o, r in comps[c] if start and n == start.group(1)), rest)
            else:
                attrs = rest
            chain = chain_of.get(c, ())
            loop = chain[0] if chain else None
            out.append(Collective(base, shapes, size, loop is not None, loop, bodies.get(loop) if loop else None,
                                  _group_size(attrs), c, name, tuple(bodies.get(b) for b in chain)))
    return out
