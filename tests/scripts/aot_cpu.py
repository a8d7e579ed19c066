"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: every stage of a small config compiled as a
CPU-backend estimate for a GPU target on a 2x4 mesh, and the fast memory plan (`make_plan`: shard arithmetic +
a compile of the local shapes) against the sharded program's own memory analysis. Prints one JSON line."""

import json
import sys

import jax

from jaxpersona.compute.aot import STAGES, Sizes, dry_run
from jaxpersona.compute.plan import make_plan

assert jax.device_count() == 8, jax.device_count()
config = sys.argv[1]
small = {"prefill": Sizes(batch=8, seq=64), "activations": Sizes(batch=8, seq=64),
         "sweep": Sizes(batch=2, seq=32, grid=4, targets=8), "roles": Sizes(batch=8, seq=64),
         "capped": Sizes(batch=4, seq=16, context=64, new_tokens=8), "train": Sizes(batch=8, seq=64, targets=16, rank=4),
         "decode": Sizes(batch=8, seq=1, context=128, targets=1)}
out = {"stages": {}}
for stage in STAGES:
    r = dry_run(config, stage, "2x4", "h100", sizes=small[stage], dtype="float32")
    out["stages"][stage] = {"backend": r.backend, "total": r.total, "arguments": r.arguments, "fits": r.fits(),
                            "collectives": {k: list(v) for k, v in r.collective_summary().items()},
                            "flops": r.flops, "bound": r.bound}
for fsdp in (False, True):
    for batch, seq in ((8, 64), (16, 256)):
        plan = make_plan(config, "2x4", batch=batch, seq=seq, dtype="float32", fsdp=fsdp)
        run = dry_run(config, "prefill", "2x4", "h100", sizes=Sizes(batch=batch, seq=seq), dtype="float32", fsdp=fsdp)
        out.setdefault("plan_vs_compiled", []).append(
            {"fsdp": fsdp, "batch": batch, "seq": seq, "planned": plan.total, "compiled": run.total,
             "params": plan.params, "kv": plan.kv_cache, "activations": plan.activations,
             "arguments": run.arguments, "outputs": run.outputs, "temporaries": run.temporaries, "aliased": run.aliased})
print(json.dumps(out))
