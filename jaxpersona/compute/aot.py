"""Ahead-of-time dry runs: a pipeline stage's real jitted function, compiled for a ``(data, model)`` mesh from
abstract, sharded inputs (``jax.ShapeDtypeStruct`` with ``NamedSharding``; no weights exist anywhere).

* **TPU targets** compile *deviceless* for the named topology with libtpu (``jax.experimental.topologies``,
  as MaxText's ``train_compile.py``): the TPU compiler's own memory analysis and collectives.
* **GPU targets** compile on a GPU machine's own GPUs ("gpu-compiled"); elsewhere (and TPU targets without
  libtpu) on this machine's CPU devices (``jax_num_cpu_devices``), labelled "CPU-backend estimate": XLA:CPU's
  buffer assignment and partitioner, not the GPU's. XLA:CPU upcasts bf16 matmul operands to f32, so a narrower
  dtype is compiled in f32 there and its temporaries scaled to the dtype; arguments, outputs and donated bytes are
  counted exactly from the shardings.

Each stage is the function the pipeline runs (``score_chunk`` of the sweep, ``reduced_resid`` of the
persona-vector and role activations, ``continue_turn`` under a cap for capped multi-turn generation, the LoRA
``train_step`` with its AdamW state and rematerialisation, a serve decode step, a prefill), at sizes given by
:class:`Sizes`. The report (:class:`DryRun`) holds per device: arguments, outputs, temporaries and aliased bytes
(compiled ``memory_analysis``), the collectives of the compiled HLO with their bytes (those inside the layer
loop counted once per layer), FLOPs and HBM bytes (the analytic model below: XLA's ``cost_analysis`` counts a
``while`` body once, not once per layer), and a roofline: compute, memory and interconnect time from the
accelerator's specs, the bounding term, and the MFU and MBU a run at that bound would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpersona import errors
from jaxpersona.compute.accelerators import (GIB, Accelerator, accelerator, host_bounds, libtpu_available,
                                             topology_name)
from jaxpersona.compute.activations import reduced_resid
from jaxpersona.compute.compiling import persistent_cache_off
from jaxpersona.compute.generate import continue_turn, greedy_ids
from jaxpersona.compute.plan import kv_bytes, param_bytes, read_config
from jaxpersona.compute.sweep import score_chunk
from jaxpersona.compute.train import TrainConfig, make_optimizer, train_step
from jaxpersona.edit import interventions as iv
from jaxpersona.model import sharding as shd
from jaxpersona.model.config import ModelConfig, parse_dtype
from jaxpersona.model.lora import init_adapter
from jaxpersona.model.params import param_shapes
from jaxpersona.model.transformer import KVCache, forward

STAGES = ("prefill", "activations", "sweep", "roles", "capped", "train", "decode")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """A stage's sizes (global, before sharding). ``batch``: rows (sequences; conversations; micro-batch);
    ``seq``: tokens per row (prompt + response; a turn's chunk for ``capped``); ``context``: KV-cache slots
    (``capped``/``decode``/``prefill``; 0 = ``seq + new_tokens``); ``new_tokens``: generated per row
    (``capped``); ``grid``: sweep points in one chunk; ``targets``: scored response tokens (``sweep``/``train``);
    ``rank``: LoRA rank (``train``)."""

    batch: int = 8
    seq: int = 512
    context: int = 0
    new_tokens: int = 0
    grid: int = 8
    targets: int = 64
    rank: int = 32

    def validate(self, stage: str) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < (0 if f.name in ("context", "new_tokens") else 1):
                raise errors.InputError(f"dry run: {f.name} must be a whole number >= "
                                        f"{0 if f.name in ('context', 'new_tokens') else 1}, got {v!r}")
        if stage in ("sweep", "train") and self.targets > self.seq:
            raise errors.InputError(f"dry run: targets ({self.targets}) cannot exceed seq ({self.seq})")

    @property
    def slots(self) -> int:
        return self.context or self.seq + self.new_tokens


# the papers' sizes per stage (Chen et al. 2025: persona vectors, 7-8B; Lu et al. 2026: the Assistant Axis)
DEFAULT_SIZES: dict[str, Sizes] = {
    "prefill": Sizes(batch=8, seq=2048),
    "activations": Sizes(batch=32, seq=512),
    "sweep": Sizes(batch=8, seq=256, grid=8, targets=128),
    "roles": Sizes(batch=32, seq=1024),
    "capped": Sizes(batch=8, seq=256, context=4096, new_tokens=256),
    "train": Sizes(batch=8, seq=512, targets=256, rank=32),
    "decode": Sizes(batch=64, seq=1, context=4096, targets=1),
}


# the sizes each stage reads
USED = {"prefill": ("batch", "seq", "context"), "activations": ("batch", "seq"), "roles": ("batch", "seq"),
        "sweep": ("batch", "seq", "grid", "targets"), "capped": ("batch", "seq", "context", "new_tokens"),
        "train": ("batch", "seq", "targets", "rank"), "decode": ("batch", "context")}


# --- meshes ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def libtpu_starting_quietly() -> Iterator[None]:
    """libtpu, started on a machine that is no TPU host (a deviceless compile), writes its probes of the host
    (accelerator type, worker hostnames) to the process's stderr: warnings and an ``E0000 ... INVALID_ARGUMENT``
    line with a source trace, although nothing is wrong. Hold file descriptor 2 while it starts; what it wrote is
    shown only if starting fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            except BaseException:
                os.dup2(saved, 2)
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def target_mesh(acc: Accelerator, data: int, model: int) -> tuple[jax.sharding.Mesh, str]:
    """The mesh the program is compiled for, and how: ``"tpu-deviceless"`` (libtpu, the named topology),
    ``"gpu-compiled"`` (a GPU target on a machine with that many GPUs) or ``"cpu-estimate"`` (this machine's CPU
    devices)."""
    chips = data * model
    if acc.platform == "tpu" and libtpu_available():
        from jax.experimental import topologies

        # several processes may compile for TPU at once (tests, a planner beside a server): libtpu's lockfile is
        # for processes that own TPU chips, and a deviceless compile owns none
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        bounds = host_bounds(acc, chips)
        with libtpu_starting_quietly():
            topo = topologies.get_topology_desc(topology_name=topology_name(acc, chips), platform="tpu",
                                                **({"chips_per_host_bounds": bounds} if bounds else {}))
        if len(topo.devices) != chips:  # v4 reports each TensorCore of a megacore chip
            raise errors.MeshError(f"{topology_name(acc, chips)} has {len(topo.devices)} devices, not {chips}")
        from jax.experimental import mesh_utils

        # a 4x16 mesh on an 8x8 torus splits a physical axis: allowed (ICI still connects the devices)
        grid = mesh_utils.create_device_mesh((data, model), list(topo.devices), allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, ("data", "model")), "tpu-deviceless"
    if acc.platform == "gpu" and jax.default_backend() == "gpu" and jax.device_count() >= chips:
        return shd.make_mesh((data, model)), "gpu-compiled"  # this machine's GPUs: their compiler's own numbers
    cpus = jax.devices("cpu")
    if len(cpus) < chips:
        raise errors.MeshError(
            f"a CPU-backend estimate of a {data}x{model} mesh needs {chips} CPU devices, {len(cpus)} present: run "
            f"`jaxpersona plan` (it sets them), or set jax.config.update('jax_num_cpu_devices', {chips}) "
            f"(or XLA_FLAGS=--xla_force_host_platform_device_count={chips}) before JAX starts")
    return shd.make_mesh((data, model), cpus), "cpu-estimate"


# --- abstract inputs -------------------------------------------------------------------------------
def _abstract(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    def one(x: Any, s: Any) -> jax.ShapeDtypeStruct:
        shape = tuple(x) if isinstance(x, tuple) else x.shape
        return jax.ShapeDtypeStruct(shape, dtype or x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, tuple))


def _array(mesh: Any, shape: tuple[int, ...], dtype: Any, spec: P) -> jax.ShapeDtypeStruct:
    """An abstract array; a mesh axis that does not divide its dimension is dropped (replicated)."""
    axes = []
    for n, a in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes.append(a if a is not None and n % mesh.shape[a] == 0 else None)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))


def abstract_params(cfg: ModelConfig, mesh: Any, dtype: Any, fsdp: bool) -> Any:
    rules = shd.FSDP if fsdp else shd.TENSOR_PARALLEL
    import flax.linen as nn  # lazy: flax's logical partitioning, only where shardings are made

    shardings = nn.logical_to_mesh_sharding(shd.logical_axes(cfg), mesh, rules)
    return _abstract(param_shapes(cfg), shardings, dtype)


def abstract_cache(cfg: ModelConfig, mesh: Any, rows: int, slots: int, dtype: Any) -> KVCache:
    kv = (cfg.n_layers, rows, cfg.n_kv_heads, slots, cfg.head_dim)
    spec = shd.kv_cache_sharding(mesh).spec
    return KVCache(_array(mesh, kv, dtype, spec), _array(mesh, kv, dtype, spec),
                   _array(mesh, (rows, slots), jnp.bool_, P("data", None)))


def _rows(mesh: Any, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    """An input whose first dimension is batch rows (over ``data``)."""
    return _array(mesh, shape, dtype, P("data"))


def _targets(mesh: Any, b: int, r: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"pred_idx": _rows(mesh, (b, r), jnp.int32), "pred_tok": _rows(mesh, (b, r), jnp.int32),
            "pred_ok": _rows(mesh, (b, r), jnp.bool_)}


def _stacked_steer(cfg: ModelConfig, mesh: Any, g: int, b: int, t: int) -> iv.Steer:
    """``g`` grid points of a steering hook, the grid axis over ``data`` (as the sweep shards its points)."""
    def pts(*shape: int, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
        return _array(mesh, (g, *shape), dtype, P("data"))

    return iv.Steer(pts(cfg.d_model), pts(), pts(cfg.n_resid), iv.Positions(pts(b, t, dtype=jnp.bool_),
                                                                             pts(b, dtype=jnp.bool_)), unit=True)


@dataclasses.dataclass(frozen=True)
class Program:
    """A stage's function, its abstract inputs and what it computes (for the analytic FLOPs)."""

    fn: Any  # jitted
    args: tuple[Any, ...]
    work: tuple[tuple[str, int, int, int, int], ...]  # (kind, rows, tokens per row, attended slots, logit rows)
    weight_passes: int  # times the weights are read from HBM (a vmapped grid shares one read per layer)
    kv_read: bool  # a decode: the KV cache is read every step
    steps: int = 1  # decode steps inside (capped generation)
    note: str = ""
    # traced under jax.set_mesh, so the forward's activation constraints act (as the server's steps are); not the
    # sweep, whose grid points are sharded over data: constraining its rows to data too would reshard them
    on_mesh: bool = True
    donate: tuple[int, ...] = ()  # argument positions donated to the outputs (caches, optimiser state)


def build_program(stage: str, cfg: ModelConfig, mesh: Any, sizes: Sizes, dtype: Any, fsdp: bool) -> Program:
    """The stage's jitted function with abstract sharded inputs on ``mesh`` (see the module docstring)."""
    sizes.validate(stage)
    params = abstract_params(cfg, mesh, dtype, fsdp)
    b, t = sizes.batch, sizes.seq
    tokens, valid = _rows(mesh, (b, t), jnp.int32), _rows(mesh, (b, t), jnp.bool_)
    if stage == "prefill":
        cache = abstract_cache(cfg, mesh, b, sizes.slots, dtype)
        fn = jax.jit(lambda p, tk, c: forward(p, cfg, tk, cache=c, logits="last")[0::2], donate_argnums=(2,))
        return Program(fn, (params, tokens, cache), (("fwd", b, t, t // 2, b),), 1, False, donate=(2,))
    if stage in ("activations", "roles"):
        views = 2 if stage == "activations" else 1  # persona vectors: response and prompt means; roles: response
        weights = _array(mesh, (views, b, t), jnp.float32, P(None, "data"))
        fn = jax.jit(lambda p, tk, v, w: reduced_resid(p, cfg, tk, v, w))
        return Program(fn, (params, tokens, valid, weights), (("fwd", b, t, t // 2, 0),), 1, False,
                       note="weighted means of every resid point (reduced_resid)")
    if stage == "sweep":
        data = {"tokens": _array(mesh, (b, t), jnp.int32, P()), "valid": _array(mesh, (b, t), jnp.bool_, P()),
                "resp": _array(mesh, (b, t), jnp.bool_, P()),
                **{k: _array(mesh, v.shape, v.dtype, P()) for k, v in _targets(mesh, b, sizes.targets).items()}}
        hooks = _stacked_steer(cfg, mesh, sizes.grid, b, t)
        start = jax.ShapeDtypeStruct((), jnp.int32)
        units = jax.ShapeDtypeStruct((1, cfg.d_model), jnp.float32)
        fn = jax.jit(lambda p, d, h, s, u: score_chunk(p, cfg, d, h, s, u, capture=None))
        return Program(fn, (params, data, hooks, start, units),
                       (("fwd", sizes.grid * b, t, t // 2, sizes.grid * b * sizes.targets),), 1, False,
                       note=f"{sizes.grid} grid points per chunk (score_chunk), the trunk from resid[0]", on_mesh=False)
    if stage == "capped":
        cache = abstract_cache(cfg, mesh, b, sizes.slots, dtype)
        cap = iv.Cap(jax.ShapeDtypeStruct((cfg.n_resid, cfg.d_model), jnp.float32),
                     jax.ShapeDtypeStruct((cfg.n_resid,), jnp.float32), jax.ShapeDtypeStruct((cfg.n_resid,), jnp.float32),
                     jax.ShapeDtypeStruct((cfg.n_resid,), jnp.float32),
                     iv.Positions(_rows(mesh, (b, 1), jnp.bool_), _rows(mesh, (b,), jnp.bool_)))
        units = jax.ShapeDtypeStruct((1, cfg.d_model), jnp.float32)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        monitor = (cfg.n_resid // 2,)

        def turn(p: Any, c: Any, tk: Any, v: Any, at: Any, key: Any, temp: Any, top: Any, hook: Any, u: Any) -> Any:
            return continue_turn(p, cfg, c, tk, v, at, key, temp, top, hook, u, max_new_tokens=sizes.new_tokens,
                                 greedy=False, eos_ids=(0,), pad_id=0, monitor=monitor)

        fn = jax.jit(turn, donate_argnums=(1,))
        key = jax.eval_shape(lambda: jax.random.key(0))
        args = (params, cache, tokens, valid, jax.ShapeDtypeStruct((), jnp.int32), key, scalar, scalar, cap, units)
        n = max(sizes.new_tokens, 1)
        return Program(fn, args, (("fwd", b, t, sizes.slots, b), ("fwd", b * sizes.new_tokens, 1, sizes.slots, b * sizes.new_tokens)),
                       1 + sizes.new_tokens, True, steps=n,
                       note=f"one turn: a {t}-token chunk into a {sizes.slots}-slot cache, {sizes.new_tokens} sampled "
                            "tokens under a cap (continue_turn), one resid point monitored", donate=(1,))
    if stage == "train":
        tc = TrainConfig(rank=sizes.rank, alpha=2.0 * sizes.rank, batch_size=b, max_len=t)
        tx, _ = make_optimizer(tc, 100)
        init = jax.eval_shape(lambda: init_adapter(cfg, tc.lora, jax.random.key(0)))
        from jaxpersona.artifacts.adapters import adapter_shardings  # lazy: artifacts sits above compute

        ash = adapter_shardings(cfg, list(init.a), mesh, shd.FSDP if fsdp else shd.TENSOR_PARALLEL)
        factors = {"a": _abstract(init.a, ash["a"]), "b": _abstract(init.b, ash["b"])}
        opt_state = jax.eval_shape(tx.init, factors)
        opt_state = jax.tree.map(lambda s, r: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=r.sharding)
                                 if s.shape == r.shape else jax.ShapeDtypeStruct(s.shape, s.dtype), opt_state,
                                 _like_factors(opt_state, factors))
        batch = {"tokens": tokens, "valid": valid, **_targets(mesh, b, sizes.targets),
                 "row_ok": _rows(mesh, (b,), jnp.bool_)}
        step = train_step(tx, jnp.float32(tc.lora.scale), cfg, 0.0)
        fn = jax.jit(lambda f, o, p, bt: step(f, o, p, None, bt, None, None), donate_argnums=(0, 1))
        return Program(fn, (factors, opt_state, params, batch), (("train", b, t, t // 2, b * sizes.targets),), 2, False,
                       note=f"LoRA rank {sizes.rank} on all 7 projections, AdamW state, remat (dots saved)", donate=(0, 1))
    if stage == "decode":
        cache = abstract_cache(cfg, mesh, b, sizes.slots, dtype)
        tok = _rows(mesh, (b, 1), jnp.int32)
        index = _rows(mesh, (b,), jnp.int32)

        def step(p: Any, tk: Any, c: Any, at: Any) -> Any:
            out = forward(p, cfg, tk, cache=c, cache_index=at, logits="last")
            return greedy_ids(out.logits[:, -1]), out.cache

        fn = jax.jit(step, donate_argnums=(2,))
        return Program(fn, (params, tok, cache, index), (("fwd", b, 1, sizes.slots, b),), 1, True,
                       note=f"one token per row at its own slot of a {sizes.slots}-slot cache (the server's step)",
                       donate=(2,))
    raise errors.InputError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def materialise(args: Any, key: jax.Array) -> Any:
    """Concrete arrays for a program's abstract ``args``, made on their devices with their shardings by one jitted
    program (for a device check of a plan: run the program, read the peak memory): floats small normal, integers 0,
    booleans True, PRNG keys from ``key``."""
    leaves, treedef = jax.tree.flatten(args)

    def make_all(key: jax.Array) -> list[jax.Array]:
        out = []
        for a, k in zip(leaves, jax.random.split(key, len(leaves))):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                out.append(k)
            elif jnp.issubdtype(a.dtype, jnp.floating):
                out.append((0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype))
            elif a.dtype == jnp.bool_:
                out.append(jnp.ones(a.shape, bool))
            else:
                out.append(jnp.zeros(a.shape, a.dtype))
        return out

    shardings = [getattr(a, "sharding", None) for a in leaves]
    return jax.tree.unflatten(treedef, jax.jit(make_all, out_shardings=shardings)(key))


def _like_factors(opt_state: Any, factors: Any) -> Any:
    """For each optimiser-state leaf, the factor leaf of the same shape (AdamW's mu / nu mirror the factors),
    else the leaf itself (counts, schedules: replicated)."""
    by_shape = {tuple(x.shape): x for x in jax.tree.leaves(factors)}
    return jax.tree.map(lambda s: by_shape.get(tuple(s.shape), s), opt_state)


# --- analysis ---------------------------------------------------------------------------------------
def _shard_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes of one device's shards of abstract arrays (their own shardings, or ``shardings`` leaf by leaf)."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings) if shardings is not None else [getattr(a, "sharding", None) for a in leaves]
    total = 0
    for a, sh in zip(leaves, shs):
        shape = sh.shard_shape(a.shape) if sh is not None else a.shape
        size = 8 if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else np.dtype(a.dtype).itemsize  # threefry
        total += int(np.prod(shape, dtype=np.int64)) * size
    return total


def _times(c: shd.Collective, layers: int, steps: int = 1) -> int:
    """How often a collective runs per step: the product of its enclosing loops' trip counts (read from the HLO);
    a loop of unknown length counts as the stage's ``steps`` (a decode loop, which may stop early at end of
    sequence: counted at its full length), or ``layers`` where the stage has no decode loop."""
    return c.times(unknown=steps if steps > 1 else layers)


def wire_bytes(c: shd.Collective, default_group: int) -> float:
    """Bytes one device sends for a collective on a ring of ``g`` devices (its replica group, else
    ``default_group``): all-reduce ``2 (g-1)/g x size``, all-gather / all-to-all ``(g-1)/g x result``,
    reduce-scatter ``(g-1) x result`` (its input is ``g`` results), collective-permute the whole result."""
    g = c.group_size or default_group
    if g <= 1 and c.kind != "collective-permute":
        return 0.0
    factor = {"all-reduce": 2 * (g - 1) / g, "all-gather": (g - 1) / g, "all-to-all": (g - 1) / g,
              "reduce-scatter": float(g - 1)}.get(c.kind, 1.0)
    return factor * c.bytes


def model_flops(cfg: ModelConfig, kind: str, rows: int, tokens: int, attended: int, logit_rows: int) -> float:
    """FLOPs of ``rows x tokens`` through every block (matmuls ``2 x params``, attention ``4 x heads x head_dim x
    attended`` per token) plus the unembedding at ``logit_rows`` positions. ``train``: a LoRA step, whose frozen
    weights need activation gradients only (2x the matmuls) and whose remat recomputes attention (3x)."""
    d, hd = cfg.d_model, cfg.head_dim
    proj = 2 * d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + 2 * cfg.n_heads * hd * d + 6 * d * cfg.d_ff
    attn = 4 * cfg.n_heads * hd * attended
    n = rows * tokens
    head = 2 * d * cfg.vocab_size * logit_rows
    if kind == "train":
        return float(cfg.n_layers * n * (2 * proj + 3 * attn) + 2 * head)
    return float(cfg.n_layers * n * (proj + attn) + head)


@dataclasses.dataclass(frozen=True)
class DryRun:
    model: str
    stage: str
    mesh: tuple[int, int]
    fsdp: bool
    accelerator: str
    backend: str  # "tpu-deviceless" or "cpu-estimate"
    dtype: str
    sizes: dict[str, int]
    kv_replication: int
    layers: int
    steps: int
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    collectives: tuple[shd.Collective, ...]
    flops: float  # per device
    hbm_bytes: float  # per device
    comm_bytes: float  # per device sent over the interconnect per step (ring algorithms, see wire_bytes)
    capacity: int
    seconds: dict[str, float]  # compute, memory, interconnect
    compile_s: float
    note: str

    @property
    def total(self) -> int:
        """Peak per-device bytes as JAX's docs total them: arguments + outputs + temporaries - aliased."""
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @property
    def bound(self) -> str:
        return max(self.seconds, key=lambda k: self.seconds[k])

    @property
    def time(self) -> float:
        return max(self.seconds.values())

    @property
    def utilisation(self) -> dict[str, float]:
        """MFU and MBU at the roofline time: the shares of peak FLOP/s and of HBM bandwidth the stage would use
        if it ran exactly at its bound (the best a real run can reach; measure on the device for the truth)."""
        return {"MFU": self.seconds["compute"] / self.time, "MBU": self.seconds["memory"] / self.time}

    def fits(self, headroom: float = 0.9) -> bool:
        return self.total <= headroom * self.capacity

    def collective_summary(self) -> dict[str, tuple[int, int]]:
        """kind -> (count per step with loop bodies counted once per layer, bytes per step)."""
        out: dict[str, tuple[int, int]] = {}
        for c in self.collectives:
            k = _times(c, self.layers, self.steps)
            n, b = out.get(c.kind, (0, 0))
            out[c.kind] = (n + k, b + k * c.bytes)
        return out

    def table(self) -> str:
        g = lambda b: f"{b / GIB:9.3f} GiB"  # noqa: E731
        label = {"tpu-deviceless": "compiled deviceless for the TPU topology (libtpu)",
                 "gpu-compiled": "compiled for this machine's GPUs"}.get(
            self.backend, "CPU-backend estimate (XLA:CPU compile of the sharded program)")
        sz = ", ".join(f"{k} {v}" for k, v in self.sizes.items())
        util = self.utilisation
        lines = [f"dry run: {self.model}, stage {self.stage} ({sz}) on {self.mesh[0]}x{self.mesh[1]} (data x model)"
                 f"{', FSDP' if self.fsdp else ''}, {self.dtype}, {self.accelerator}; {label}"
                 + (f"; KV heads replicated {self.kv_replication}x" if self.kv_replication > 1 else ""),
                 f"  {self.note}" if self.note else "",
                 "  per device (compiled memory analysis):",
                 f"    arguments    {g(self.arguments)}", f"    outputs      {g(self.outputs)}",
                 f"    temporaries  {g(self.temporaries)}", f"    aliased     -{g(self.aliased)}",
                 f"    total        {g(self.total)}   ({'fits' if self.fits() else 'does NOT fit'} in 90% of "
                 f"{self.capacity / GIB:.1f} GiB)",
                 "  collectives per step (compiled HLO; in the layer loop x layers):"]
        summary = self.collective_summary()
        lines += [f"    {k:18s} x{n:<5d} {b / 2**20:10.1f} MiB" for k, (n, b) in sorted(summary.items())] or ["    none"]
        lines += [f"  FLOPs {self.flops:.3e}, HBM bytes {self.hbm_bytes:.3e}, interconnect bytes {self.comm_bytes:.3e} "
                  "per device (analytic)",
                  "  roofline: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.seconds.items())
                  + f" -> {self.bound}-bound, {self.time * 1e3:.2f} ms per step; at that time MFU {util['MFU']:.0%}, "
                  f"MBU {util['MBU']:.0%}",
                  f"  compile {self.compile_s:.1f} s"]
        return "\n".join(x for x in lines if x)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["collectives"] = {k: {"count": n, "bytes": b} for k, (n, b) in self.collective_summary().items()}
        d.update(total=self.total, bound=self.bound, time=self.time, fits=self.fits(), utilisation=self.utilisation)
        return d


def dry_run(spec: str, stage: str, mesh: Any = "1x1", accelerator_name: str = "v5e", *, sizes: Sizes | None = None,
            dtype: Any = "bfloat16", fsdp: bool = False) -> DryRun:
    """Compile ``stage`` of the model ``spec`` (see :func:`jaxpersona.compute.plan.read_config`) for ``mesh``
    (``"8x8"``) on ``accelerator_name`` from abstract inputs; see the module docstring."""
    if stage not in STAGES:
        raise errors.InputError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    name, cfg0 = read_config(spec)
    data, model = shd.parse_mesh(mesh)
    acc = accelerator(accelerator_name)
    sizes = sizes or DEFAULT_SIZES[stage]
    sizes.validate(stage)  # before any compiler starts
    cfg, _ = shd.layout_for_mesh(cfg0, (data, model), fsdp)
    jmesh, backend = target_mesh(acc, data, model)
    jdt = parse_dtype(dtype)
    item = np.dtype(jdt).itemsize
    # XLA:CPU upcasts bf16 matmul operands to f32 (a temporary f32 copy of every weight): a CPU estimate of a
    # narrower dtype compiles in f32 and scales its temporaries to the dtype (arguments / outputs are counted exactly)
    upcast = backend == "cpu-estimate" and item < 4
    prog = build_program(stage, cfg, jmesh, sizes, jnp.float32 if upcast else jdt, fsdp)
    t0 = time.perf_counter()
    # a deviceless TPU executable can be written to the persistent compile cache but not read back (no TPU client
    # to load it: every later read warned "PjRtCompiler must be constructed with a Client"): keep it out
    no_cache = persistent_cache_off() if backend == "tpu-deviceless" else contextlib.nullcontext()
    try:
        with jax.set_mesh(jmesh) if prog.on_mesh else contextlib.nullcontext(), no_cache:
            compiled = prog.fn.lower(*prog.args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit its HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise errors.MemoryPlanError(f"{stage} of {name} on {data}x{model}{' FSDP' if fsdp else ''} ({acc.name}) "
                                     f"does not fit: the compiler says {str(e).split(':', 1)[-1].strip()[:300]}") from e
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arguments, outputs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temporaries, aliased = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    if upcast:
        real = build_program(stage, cfg, jmesh, sizes, jdt, fsdp)
        arguments = _shard_bytes(real.args)
        outputs = _shard_bytes(jax.eval_shape(real.fn, *real.args), compiled.output_shardings)
        aliased = _shard_bytes(tuple(real.args[i] for i in real.donate)) if aliased else 0
        temporaries = temporaries * item // 4
    colls = tuple(shd.collectives(compiled.as_text()))
    chips = data * model
    flops = sum(model_flops(cfg, *w) for w in prog.work) / chips
    param_dev = param_bytes(cfg, data, model, fsdp, item)
    kv_dev = kv_bytes(cfg, sizes.batch, sizes.slots, data, model, item) if prog.kv_read else 0
    hbm = prog.weight_passes * param_dev + prog.steps * kv_dev + 2 * temporaries
    layers = cfg.n_layers
    comm = sum(wire_bytes(c, model) * _times(c, layers, prog.steps) for c in colls)
    seconds = {"compute": flops / acc.bf16_flops, "memory": hbm / acc.hbm_bytes_per_s,
               "interconnect": comm / acc.link_bytes_per_s}
    sz = {k: v for k, v in dataclasses.asdict(sizes).items() if v and k in USED[stage]}
    return DryRun(name, stage, (data, model), fsdp, acc.name, backend, str(np.dtype(jdt)), sz,
                  cfg.n_kv_heads // cfg0.n_kv_heads, layers, prog.steps, arguments, outputs, temporaries, aliased,
                  colls, flops, float(hbm), float(comm),
                  acc.memory, seconds, compile_s, prog.note)
