"""The layout table of the papers' models: for each model, slice and stage, the layout the planner chooses
(`jaxpersona.compute.layout.choose_layout`), its compiled per-device memory, the bounding roofline term and the
time per step. TPU slices compile deviceless with libtpu (`pip install -e ".[aot]"`); GPU slices are CPU-backend
estimates on 8 CPU devices (set here before JAX starts).

    python scripts/plan_table.py [--models M,M] [--slices v5e-8,8xh100] [--stages decode,train] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from jaxpersona import errors  # noqa: E402
from jaxpersona.compute.aot import STAGES  # noqa: E402
from jaxpersona.compute.layout import choose_layout  # noqa: E402

MODELS = ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "gemma-2-27b-it", "qwen3-32b", "llama-3.3-70b-instruct")
SLICES = ("v5e-8", "v5e-16", "v5e-64", "v5p-8", "8xh100", "8xh200")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--slices", default=",".join(SLICES))
    ap.add_argument("--stages", default=",".join(s for s in STAGES if s != "prefill"))
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    rows = ["| model | slice | stage | layout | sizes | GiB/device | bound | ms/step | MFU / MBU at bound | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    t0 = time.time()
    for model in args.models.split(","):
        for sl in args.slices.split(","):
            for stage in args.stages.split(","):
                try:
                    r = choose_layout(model, stage, sl).run
                    u = r.utilisation
                    layout = f"{r.mesh[0]}x{r.mesh[1]}{' FSDP' if r.fsdp else ''}" + (
                        f", KV x{r.kv_replication}" if r.kv_replication > 1 else "")
                    sizes = " ".join(f"{k[0]}{v}" for k, v in r.sizes.items())
                    line = (f"| {model} | {sl} | {stage} | {layout} | {sizes} | {r.total / 2**30:.1f} | {r.bound} | "
                            f"{r.time * 1e3:.1f} | {u['MFU']:.0%} / {u['MBU']:.0%} | {r.compile_s:.0f} |")
                except errors.JaxPersonaError as e:
                    line = f"| {model} | {sl} | {stage} | does not fit | | | | | | ({type(e).__name__}) |"
                rows.append(line)
                print(line, flush=True)
    print(f"# {time.time() - t0:.0f} s; sizes: b batch, s seq, c context, n new tokens, g grid, t targets, r rank",
          flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
