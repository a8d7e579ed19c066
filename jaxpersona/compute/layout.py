"""A layout planner: for a model, a stage and an accelerator slice, the ``(data, model)`` split, FSDP or not and the
rows per data shard (sweep grid points, micro-batch) that fit with headroom, confirmed by an AOT compile.

Candidates, in order of preference: data parallel with the smallest model axis first (least interconnect
traffic: the two all-reduces per layer grow with the model axis), then the same with FSDP (weights' embed
dimension over ``data`` too). A model axis must divide the query heads and divide or be a multiple of the KV
heads (KV heads are then replicated, :func:`jaxpersona.model.sharding.layout_for_mesh`); others are skipped with
the reason. A candidate whose weights and KV cache alone exceed the headroom is skipped without compiling; the
first that remains is compiled (:func:`jaxpersona.compute.aot.dry_run`) and its rows per shard halved until the
compiled program fits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.compute.accelerators import parse_slice
from jaxpersona.compute.aot import DEFAULT_SIZES, DryRun, Sizes, dry_run
from jaxpersona.compute.plan import kv_bytes, param_bytes, read_config
from jaxpersona.model import sharding as shd
from jaxpersona.model.config import parse_dtype

# which size a data shard splits, per stage (the sweep shards its grid points, the rest their rows)
SPLIT = {"sweep": "grid"}
CACHED = ("capped", "decode", "prefill")  # stages that hold a KV cache


@dataclasses.dataclass(frozen=True)
class Choice:
    run: DryRun
    skipped: tuple[str, ...]  # candidates passed over, with why
    slice: str

    def command(self, model: str) -> str:
        r = self.run
        mesh = f"{r.mesh[0]}x{r.mesh[1]}"
        sizes = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r.sizes.items())
        return (f"jaxpersona plan --model {model} --stage {r.stage} --mesh {mesh}{' --fsdp' if r.fsdp else ''} "
                f"--accelerator {r.accelerator} {sizes}")

    def table(self, model: str) -> str:
        r = self.run
        lines = [f"layout for {model}, stage {r.stage}, on {self.slice}: mesh {r.mesh[0]}x{r.mesh[1]} (data x model)"
                 f"{', FSDP' if r.fsdp else ''}"]
        lines += [f"  passed over: {s}" for s in self.skipped]
        lines += [r.table(), f"  confirm it: {self.command(model)}"]
        if r.stage == "decode":
            lines.append(f"  serve it:   jaxpersona serve --model DIR --mesh {r.mesh[0]}x{r.mesh[1]} "
                         f"--batch {r.sizes['batch']} --max-context {r.sizes.get('context', 0)}")
        else:
            lines.append(f"  in Python:  model = jaxpersona.load(DIR, mesh=make_mesh('{r.mesh[0]}x{r.mesh[1]}'))"
                         + ("  (FSDP rules: jaxpersona.model.sharding.FSDP)" if r.fsdp else ""))
        return "\n".join(lines)


def static_bytes(cfg: Any, stage: str, sizes: Sizes, data: int, model: int, fsdp: bool, itemsize: int) -> int:
    """Weights (their shards) and, where the stage holds one, the KV cache per device: what no smaller batch can
    shrink."""
    total = param_bytes(cfg, data, model, fsdp, itemsize)
    if stage in CACHED:
        total += kv_bytes(cfg, sizes.batch, sizes.slots, data, model, itemsize)
    return total


def choose_layout(spec: str, stage: str, slice_name: str, *, sizes: Sizes | None = None, dtype: Any = "bfloat16",
                  headroom: float = 0.9, log: Any = None) -> Choice:
    """The first layout (see the module docstring) whose compiled program fits ``headroom`` of the device memory.
    Raises :class:`~jaxpersona.errors.MemoryPlanError` when none does, naming the smallest it tried."""
    acc, chips = parse_slice(slice_name)
    _, cfg0 = read_config(spec)
    sizes = sizes or DEFAULT_SIZES.get(stage)
    if sizes is None:
        raise errors.InputError(f"unknown stage {stage!r}")
    item = np.dtype(parse_dtype(dtype)).itemsize
    field = SPLIT.get(stage, "batch")
    skipped: list[str] = []
    smallest: tuple[int, str] | None = None
    for fsdp in (False, True):
        for model in [m for m in range(1, chips + 1) if chips % m == 0]:
            data = chips // model
            where = f"{data}x{model}{' FSDP' if fsdp else ''}"
            try:
                cfg, _ = shd.layout_for_mesh(cfg0, (data, model), fsdp)
            except errors.MeshError as e:
                if not fsdp:
                    skipped.append(f"{where}: {str(e).split(';')[0]}")
                continue
            # at least one row (grid point) per data shard, a whole number of them
            want = max(getattr(sizes, field), data)
            per = math.ceil(want / data)
            trial = dataclasses.replace(sizes, **{field: per * data})
            static = static_bytes(cfg, stage, dataclasses.replace(trial, **{field: data}), data, model, fsdp, item)
            if static > headroom * acc.memory:
                skipped.append(f"{where}: weights{' + KV cache' if stage in CACHED else ''} "
                               f"{static / 2**30:.1f} GiB per device before any activation")
                continue
            while per >= 1:
                trial = dataclasses.replace(sizes, **{field: per * data})
                if log:
                    log(f"compiling {stage} on {where}, {field} {per * data} ...")
                try:
                    run = dry_run(spec, stage, (data, model), acc.name, sizes=trial, dtype=dtype, fsdp=fsdp)
                except errors.MemoryPlanError:  # the TPU compiler itself found it over the HBM
                    per //= 2
                    continue
                if run.fits(headroom):
                    return Choice(run, tuple(skipped), slice_name)
                if smallest is None or run.total < smallest[0]:
                    smallest = (run.total, f"{where} with {field} {per * data}")
                per //= 2
            skipped.append(f"{where}: does not fit even at one {field.rstrip('s')} per data shard")
    raise errors.MemoryPlanError(
        f"no layout of {stage} fits {slice_name} ({acc.memory / 2**30:.0f} GiB per device, {headroom:.0%} usable)"
        + (f"; the smallest compiled: {smallest[1]} at {smallest[0] / 2**30:.1f} GiB" if smallest else "")
        + "; tried: " + "; ".join(skipped))
