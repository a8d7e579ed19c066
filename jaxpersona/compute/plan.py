"""Memory plans: per-device bytes of a model on a ``(data, model)`` mesh, before any weight is loaded.

* **params**: every parameter's local shard (its logical axes through the sharding rules: tensor-parallel
  dimensions divided by the ``model`` axis, with FSDP the ``embed`` dimension by ``data``);
* **KV cache**: ``2 x L x rows x kv_heads/model x positions x head_dim`` per device;
* **activations**: from the *compiled* computation — the per-device program of tensor parallelism is the
  forward of the local shapes (heads, kv heads, MLP width and vocabulary divided by ``model``, rows by
  ``data``), so that forward (a prefill into the KV cache, last-position logits) is lowered and compiled
  from abstract shapes on this machine's CPU and XLA's ``memory_analysis`` gives its temporary buffers
  (compiled in float32 — the CPU backend would upcast bf16 weights for its matmuls — and scaled to the
  model dtype: an estimate, exact for fp32).
  No weights are read or allocated; a 70B plan runs on a laptop.

A sweep of ``grid`` points shards the points over ``data``: each device runs ``ceil(grid / data)`` points
of ``batch`` rows. The plan fits when the total is at most ``headroom`` of the accelerator's memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.compute.accelerators import ACCELERATORS as SPECS
from jaxpersona.compute.accelerators import GIB
from jaxpersona.compute.handle import load
from jaxpersona.model import registry
from jaxpersona.model.config import ModelConfig, from_hf_config, parse_dtype
from jaxpersona.model.params import LAYER_AXES, TOP_AXES, param_shapes
from jaxpersona.model.sharding import FSDP, TENSOR_PARALLEL, layout_for_mesh, parse_mesh
from jaxpersona.model.transformer import KVCache, forward

ACCELERATORS = {k: a.memory for k, a in SPECS.items()}  # memory per device, bytes
PAPER_MODELS = registry.PAPER_CONFIGS


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    mesh: tuple[int, int]
    rows_per_device: int
    positions: int
    dtype: str
    fsdp: bool
    params: int
    kv_cache: int
    activations: int
    fsdp_gather: int
    accelerator: str | None
    capacity: int | None
    headroom: float

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.activations + self.fsdp_gather

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.headroom * self.capacity

    def table(self) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        lines = [f"plan: {self.model} on a {self.mesh[0]}x{self.mesh[1]} (data x model) mesh, {self.dtype}"
                 f"{', FSDP' if self.fsdp else ''}; per device: {self.rows_per_device} rows x {self.positions} positions",
                 f"  params       {g(self.params)}", f"  KV cache     {g(self.kv_cache)}",
                 f"  activations  {g(self.activations)}   (compiled prefill of the local shapes, XLA memory analysis)"]
        if self.fsdp:
            lines.append(f"  FSDP gather  {g(self.fsdp_gather)}   (the largest group of one layer's weights gathered together)")
        lines.append(f"  total        {g(self.total)}")
        if self.capacity is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} on {self.accelerator} ({self.capacity / GIB:.1f} GiB per device, "
                         f"{self.headroom:.0%} usable)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total, "fits": self.fits}


def read_config(spec: str | Path) -> tuple[str, ModelConfig]:
    """A model's config from an HF directory, a ``config.json`` file, a shipped paper-model name
    (``configs/models/NAME.json``) or a registered model name."""
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "config.json"
    elif not p.exists() and (PAPER_MODELS / f"{spec}.json").exists():
        p = PAPER_MODELS / f"{spec}.json"
    elif not p.exists() and str(spec) in registry.REGISTRY:
        m = load(str(spec))
        return str(spec), m.cfg
    if not p.is_file():
        known = sorted(x.stem for x in PAPER_MODELS.glob("*.json"))
        raise errors.ModelNotFoundError(f"no config for {spec!r}: give an HF directory, a config.json, a registered "
                                        f"model or one of {known}")
    try:
        return p.parent.name if p.name == "config.json" else p.stem, from_hf_config(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise errors.CorruptCheckpointError(f"{p} is not valid JSON ({e})") from e


def local_config(cfg: ModelConfig, model_axis: int) -> ModelConfig:
    """The per-device shapes of tensor parallelism: heads, kv heads, MLP width and vocabulary / ``model_axis``."""
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // model_axis, n_kv_heads=cfg.n_kv_heads // model_axis,
                               d_ff=cfg.d_ff // model_axis, vocab_size=cfg.vocab_size // model_axis)


def _activation_bytes(cfg: ModelConfig, rows: int, seq: int, positions: int, dtype: Any) -> int:
    import jax
    import jax.numpy as jnp

    shapes = param_shapes(cfg)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    kv = (cfg.n_layers, rows, cfg.n_kv_heads, positions, cfg.head_dim)
    cache = KVCache(jax.ShapeDtypeStruct(kv, dtype), jax.ShapeDtypeStruct(kv, dtype),
                    jax.ShapeDtypeStruct((rows, positions), jnp.bool_))
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32)

    def prefill(p, t, c):
        out = forward(p, cfg, t, cache=c, logits="last")
        return out.logits, out.cache

    compiled = jax.jit(prefill, donate_argnums=(2,)).lower(params, tokens, cache).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def param_bytes(cfg: ModelConfig, data: int, model: int, fsdp: bool, itemsize: int) -> int:
    """Bytes of one device's shards of every parameter on a ``data x model`` mesh (tensor-parallel dimensions
    divided by ``model``; with FSDP the ``embed`` dimension by ``data``)."""
    rules = dict(FSDP if fsdp else TENSOR_PARALLEL)
    split = {"model": model, "data": data, None: 1}

    def local(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> int:
        return int(np.prod([math.ceil(n / split[rules.get(a)]) for n, a in zip(shape, axes)]))

    shapes = param_shapes(cfg)
    total = sum(local(s, TOP_AXES[k]) for k, s in shapes.items() if k != "layers")
    return (total + sum(local(s, LAYER_AXES[k]) for k, s in shapes["layers"].items())) * itemsize


def kv_bytes(cfg: ModelConfig, rows: int, slots: int, data: int, model: int, itemsize: int) -> int:
    """Bytes of one device's shard of a KV cache (keys and values) of ``rows x slots`` on a ``data x model`` mesh:
    ``2 x L x ceil(rows / data) x ceil(kv_heads / model) x slots x head_dim``."""
    return (2 * cfg.n_layers * math.ceil(rows / data) * math.ceil(cfg.n_kv_heads / model) * slots * cfg.head_dim
            * itemsize)


def make_plan(spec: str | Path, mesh: Any, *, batch: int, seq: int, new_tokens: int = 0, grid: int = 1,
              dtype: Any = "bfloat16", fsdp: bool = False, accelerator: str | None = None,
              headroom: float = 0.9) -> Plan:
    """Per-device memory of a forward / sweep of ``batch`` rows x ``seq`` tokens (+ ``new_tokens`` cache
    positions) on ``mesh`` (``"8x8"`` or ``(8, 8)``); see the module docstring."""
    name, cfg = read_config(spec)
    data, model = parse_mesh(mesh)
    if min(batch, seq, grid) < 1 or new_tokens < 0:
        raise errors.InputError("plan: batch, seq and grid must be >= 1, new_tokens >= 0")
    cfg, _ = layout_for_mesh(cfg, (data, model), fsdp)  # KV heads repeated when the model axis exceeds them
    if accelerator is not None and accelerator not in ACCELERATORS:
        raise errors.InputError(f"unknown accelerator {accelerator!r}; known: {sorted(ACCELERATORS)}")
    jdt = parse_dtype(dtype)
    item = np.dtype(jdt).itemsize
    rules = dict(FSDP if fsdp else TENSOR_PARALLEL)
    shapes = param_shapes(cfg)
    p_bytes = param_bytes(cfg, data, model, fsdp, item)
    gather = 0
    if fsdp:  # inside the scan each weight is gathered just before its matmul: the matrices that read one input
        # together (q, k, v; gate, up), then the output projections on their own; the largest group is the peak
        def gathered(k: str) -> int:
            local = int(np.prod(shapes["layers"][k][1:]))
            return local // (model if any(rules.get(a) == "model" for a in LAYER_AXES[k]) else 1)

        groups = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))
        gather = max(sum(gathered(k) for k in g) for g in groups) * item
    rows = math.ceil(grid / data) * batch if grid > 1 else math.ceil(batch / data)
    positions = seq + new_tokens
    kv = kv_bytes(cfg, rows, positions, 1, model, item)  # rows are this device's already
    # compiled in float32: XLA's CPU backend upcasts bf16 weights to f32 for its matmuls, which would count
    # a copy of the weights as "activations"; the f32 temporaries are scaled to the model dtype
    act = _activation_bytes(local_config(cfg, model), rows, seq, positions, np.float32) * item // 4
    cap = ACCELERATORS.get(accelerator) if accelerator else None
    return Plan(name, (data, model), rows, positions, str(np.dtype(jdt)), fsdp, p_bytes, kv, act, gather,
                accelerator, cap, headroom)
