#!/usr/bin/env python
"""Every benchmark in one command: one JSON and the README's performance table.

Runs each benchmark as its own process (fresh memory, threads pinned to ``--threads`` cores on both sides:
``taskset`` for XLA, ``torch.set_num_threads`` inside the scripts), ``--repeats`` times, and reports the median
with the min-max spread. With ``--baseline DIR`` (another checkout, e.g. ``git worktree add /tmp/base v0.5.0``)
every benchmark runs A (baseline) then B (this checkout), interleaved, repeat by repeat, and the table gains
B/A columns.

  * ``forward``   — ``bench_forward.py``: teacher-forced forward 32 x 128 and sampled generation 16 x 64 vs HF + torch;
  * ``sweep``     — ``bench_sweep.py``: 10 layers x 5 coefficients, all positions, vs an HF hook loop, with the
    block-forward model of the grid;
  * ``sweep_response`` — the same grid steering response positions only;
  * ``train``     — ``bench_train.py``: a LoRA step (r 8, all 7 targets, batch 8 x 128) vs peft;
  * ``matmul``    — ``bench_matmul.py``: the ceiling under the decode-bound rows, XLA's vs torch's ``x @ W`` at the
    model's projection shapes (16 rows, as a decode step; 1024 rows, as a training step);
  * ``main_job``  — ``jaxpersona extract --trait evil``, first with an empty compile cache, then again with it
    (stage times and compile seconds from ``run.json``).

    python scripts/bench_all.py                          # everything, 5 repeats (about an hour on 2 cores)
    python scripts/bench_all.py --repeats 1 --only sweep train
    python scripts/bench_all.py --baseline /tmp/base --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("forward", "sweep", "sweep_response", "train", "matmul", "main_job")


def _cpus(threads: int) -> str:
    avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in avail[:threads])


def _run(cmd: list[str], cwd: Path, threads: int, env: dict[str, str] | None = None, timeout: int = 3600) -> float:
    """Run ``cmd`` pinned to ``threads`` cores; returns its wall seconds (raises on failure)."""
    full = ["taskset", "-c", _cpus(threads), *cmd] if shutil.which("taskset") else cmd
    t0 = time.perf_counter()
    got = subprocess.run(full, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=timeout)
    if got.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({got.returncode}):\n{got.stdout[-2000:]}\n{got.stderr[-3000:]}")
    return time.perf_counter() - t0


def bench_once(name: str, src: Path, threads: int, tmp: Path) -> dict:
    """One run of benchmark ``name`` with the code in ``src``: its headline numbers."""
    py = sys.executable
    out = tmp / f"{name}.json"
    if name == "forward":
        _run([py, "scripts/bench_forward.py", "--repeats", "3", "--out", str(out)], src, threads)
        r = json.loads(out.read_text())
        ratio = r.get("ratio", {})
        return {"forward_tok_s": r["forward"]["tokens_per_s"], "forward_ratio": ratio.get("forward"),
                "generate_tok_s": r["generate"]["new_tokens_per_s"], "generate_ratio": ratio.get("generate"),
                "forward_gflops": r["forward"].get("gflops_per_s")}
    if name in ("sweep", "sweep_response"):
        pos = "response" if name == "sweep_response" else "all"
        _run([py, "scripts/bench_sweep.py", "--positions", pos, "--out", str(out)], src, threads)
        r = json.loads(out.read_text())
        m = r.get("block_model", {})
        return {"points_s": r["jaxpersona"]["points_per_s"], "ratio": r.get("ratio"),
                "model_speedup": m.get("speedup_incremental"), "share_of_model": r.get("share_of_model"),
                "max_abs_logprob_diff": r.get("max_abs_logprob_diff")}
    if name == "train":
        _run([py, "scripts/bench_train.py", "--threads", str(threads), "--steps", "4", "--out", str(out)], src,
             threads)
        r = json.loads(out.read_text())
        jx, hf = r["jax"], r.get("hf") or {}
        return {"jax_s_step": jx["median_s"], "peft_s_step": hf.get("median_s"),
                "ratio": r.get("ratio", {}).get("throughput_jax_over_hf")}
    if name == "matmul":
        _run([py, "scripts/bench_matmul.py", "--rows", "16,1024", "--out", str(out)], src, threads)
        r = json.loads(out.read_text())

        def step(m: int, col: str) -> float:  # one layer's 7 projections (q, k, v, o, gate, up, down), µs
            per = {row["shape"]: row[col + "_us"] for row in r["table"] if row["M"] == m}
            return 2 * per["q/o"] + 2 * per["k/v"] + 2 * per["gate/up"] + per["down"]

        sides = [c for c in ("xla", "torch", "kernel") if f"{c}_us" in r["table"][0]]  # no kernel before 0.7.12
        out = {f"{side}_layer_us_{m}": step(m, side) for side in sides for m in (16, 1024)}
        for side in sides[1:]:
            out |= {f"{side}_over_xla_{m}": step(m, "xla") / step(m, side) for m in (16, 1024)}
        return out
    if name == "main_job":
        cache = tmp / "xla-cache"
        shutil.rmtree(cache, ignore_errors=True)
        res = {}
        for label in ("first", "second"):
            run_dir = tmp / f"main-{label}"
            shutil.rmtree(run_dir, ignore_errors=True)
            wall = _run([py, "-m", "jaxpersona.cli", "extract", "--trait", "evil", "--out", str(run_dir), "--quiet"],
                        src, threads, env={"JAXPERSONA_COMPILE_CACHE": str(cache)})
            man = json.loads((run_dir / "run.json").read_text())
            res[f"{label}_s"] = wall
            res[f"{label}_compile_s"] = man.get("compile_s")
            res[f"{label}_stages"] = {s["name"]: s.get("wall_s") for s in man.get("stages", [])}
        return res
    raise ValueError(name)


def summarise(runs: list[dict]) -> dict:
    """Median and min/max of every numeric field over the repeats."""
    out: dict = {}
    for key in runs[0]:
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        elif isinstance(runs[0][key], dict):
            out[key] = runs[-1][key]
    return out


def fmt(s: dict | None, unit: str = "", digits: int = 2) -> str:
    if not s or not isinstance(s, dict) or "median" not in s:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


ROWS = [  # (benchmark, field, label, unit, digits)
    ("forward", "forward_tok_s", "forward 32×128, tokens/s", "", 0),
    ("forward", "forward_ratio", "forward vs HF + torch", "×", 2),
    ("forward", "generate_tok_s", "sampled generation 16×64, new tokens/s", "", 0),
    ("forward", "generate_ratio", "generation vs HF + torch", "×", 2),
    ("sweep", "ratio", "sweep 10 layers × 5 coeffs, all positions, vs HF hook loop", "×", 2),
    ("sweep", "share_of_model", "… share of the modelled (exact incremental) speed-up", "", 2),
    ("sweep_response", "ratio", "same sweep, response positions, vs HF hook loop", "×", 2),
    ("sweep_response", "share_of_model", "… share of the modelled speed-up", "", 2),
    ("train", "jax_s_step", "LoRA step r 8 × 7 targets, batch 8×128, s/step", " s", 2),
    ("train", "ratio", "LoRA step vs peft + torch (throughput)", "×", 2),
    ("matmul", "torch_over_xla_16", "a layer's 7 projections at 16 rows (decode), torch's speed / XLA's", "×", 2),
    ("matmul", "torch_over_xla_1024", "… at 1024 rows (training, prefill), torch's speed / XLA's", "×", 2),
    ("matmul", "kernel_over_xla_16", "… at 16 rows, the CPU kernel's speed / XLA's (what decode steps use)", "×", 2),
    ("matmul", "kernel_over_xla_1024", "… at 1024 rows, the CPU kernel's speed / XLA's", "×", 2),
    ("main_job", "first_s", "main job `extract --trait evil`, first run (compiles)", " s", 0),
    ("main_job", "second_s", "main job, second run (compile cache)", " s", 0),
    ("main_job", "first_compile_s", "main job, compile seconds, first run", " s", 1),
    ("main_job", "second_compile_s", "main job, compile seconds, second run", " s", 1),
]


def table(results: dict, baseline: dict | None) -> str:
    head = "| benchmark | " + ("A (baseline) | B (this) | B/A |" if baseline else "median (min–max) |")
    lines = [head, "|---|" + ("---:|---:|---:|" if baseline else "---:|")]
    for bench, field, label, unit, digits in ROWS:
        if bench not in results:
            continue
        b = results[bench].get(field)
        if baseline:
            a = baseline.get(bench, {}).get(field)
            ratio = (b["median"] / a["median"]) if (a and b and a["median"]) else None
            lines.append(f"| {label} | {fmt(a, unit, digits)} | {fmt(b, unit, digits)} | "
                         f"{'–' if ratio is None else f'{ratio:.2f}'} |")
        else:
            lines.append(f"| {label} | {fmt(b, unit, digits)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="cores for every benchmark (both sides)")
    ap.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    ap.add_argument("--baseline", default=None, help="another checkout to run first in every repeat (A/B)")
    ap.add_argument("--out", default="bench_results/all.json")
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1:
        sys.exit("--repeats and --threads must be >= 1")
    sides = {"B": ROOT} if not args.baseline else {"A": Path(args.baseline).resolve(), "B": ROOT}
    runs: dict[str, dict[str, list[dict]]] = {s: {b: [] for b in args.only} for s in sides}
    with tempfile.TemporaryDirectory(prefix="jp-bench-") as td:
        for rep in range(args.repeats):
            for bench in args.only:
                for side, src in sides.items():  # A then B, repeat by repeat: drift hits both alike
                    tmp = Path(td) / side
                    tmp.mkdir(exist_ok=True)
                    t0 = time.perf_counter()
                    runs[side][bench].append(bench_once(bench, src, args.threads, tmp))
                    print(f"[{rep + 1}/{args.repeats}] {bench} {side}: {time.perf_counter() - t0:.0f}s "
                          f"{json.dumps(runs[side][bench][-1], default=str)[:300]}", flush=True)
    summary = {side: {b: summarise(r) for b, r in by.items()} for side, by in runs.items()}
    md = table(summary["B"], summary.get("A"))
    result = {"repeats": args.repeats, "threads": args.threads, "cpu_count": os.cpu_count(), "summary": summary,
              "runs": runs, "table": md}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(md)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
