#!/usr/bin/env python
"""The matmul ceiling under the decode-bound targets: ``x @ W`` at SmolLM2-135M's projection shapes, XLA vs
jaxpersona's CPU kernel vs torch.

Serving (16 rows per decode step), sampled generation (16 rows) and the LoRA step's backward all spend most of
their time in matmuls whose row count M is small. This measures ``[M, K] x [K, N]`` fp32 matmuls as a decode step
meets them: one per layer over 30 layers' weights (``[30, K, N]``, 30 x K x N x 4 bytes streamed from memory, not
one cache-resident matrix), inside one call (a ``lax.scan`` in XLA, a Python loop in torch), for each M and each
projection shape, five ways in one run:

  * ``xla``   — ``jax.jit(jnp.dot)`` with the machine's cores;
  * ``kernel`` — :func:`jaxpersona.model.skinny.matmul`, each layer read in place from the stack (what every
    decode step uses on one CPU device; no column where the kernel is not available);
  * ``xla1``  — the same in a child process pinned to one core (``os.sched_setaffinity`` before JAX starts);
  * ``torch`` — ``torch.nn.functional.linear`` with as many threads as cores;
  * ``torch1`` — torch with one thread.

When ``xla`` equals ``xla1``, XLA ran that matmul on one thread. Results (median of ``--repeats`` calls, µs,
GB/s of weights streamed, GFLOP/s; per layer) go to stdout and ``--out``.

    python scripts/bench_matmul.py                       # ~3 min on 2 cores
    python scripts/bench_matmul.py --rows 1,16,64 --out bench_results/matmul.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# (name, K, N) of SmolLM2-135M's projections (x @ W with W [K, N])
SHAPES = (("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536), ("down", 1536, 576))
LAYERS = 30


def _median_us(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


def time_xla(rows: list[int], repeats: int, kernel: bool = False) -> dict[str, float]:
    """µs per layer of ``x @ W`` by XLA's dot (``kernel``: by the CPU kernel, each layer read in place)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpersona.model import skinny

    @jax.jit
    def layers(x, ws):  # [M, K], [L, K, N] -> [M]: one matmul per layer, each result used
        def body(acc, w):
            return acc + jnp.dot(x, w)[:, 0], None
        return jax.lax.scan(body, jnp.zeros(x.shape[0], x.dtype), ws)[0]

    @jax.jit
    def layers_k(x, ws):
        def body(acc, layer):
            return acc + skinny.matmul(x, ws, layer)[:, 0], None
        return jax.lax.scan(body, jnp.zeros(x.shape[0], x.dtype), jnp.arange(ws.shape[0]))[0]

    fn = layers_k if kernel else layers
    rng = np.random.default_rng(0)
    out = {}
    for name, k, n in SHAPES:
        ws = jnp.asarray(rng.standard_normal((LAYERS, k, n), dtype=np.float32))
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
            out[f"{name}|{m}"] = _median_us(lambda: fn(x, ws).block_until_ready(), repeats) / LAYERS
    return out


def time_torch(rows: list[int], repeats: int, threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    out = {}
    with torch.inference_mode():
        for name, k, n in SHAPES:
            ws = [torch.randn(n, k) for _ in range(LAYERS)]  # torch's [out, in] layout, as nn.Linear keeps it
            for m in rows:
                x = torch.randn(m, k)

                def layers() -> None:
                    acc = torch.zeros(m)
                    for w in ws:
                        acc += torch.nn.functional.linear(x, w)[:, 0]

                out[f"{name}|{m}"] = _median_us(layers, repeats) / LAYERS
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,16,32,64,256,1024", help="comma-separated row counts M")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child-xla1", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.child_xla1:  # pinned to one core before JAX makes its thread pools
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(json.dumps(time_xla(rows, args.repeats)))
        return 0
    cores = len(os.sched_getaffinity(0))
    child = subprocess.run([sys.executable, __file__, "--child-xla1", "--rows", args.rows,
                            "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
    res = {"xla1": json.loads(child.stdout.strip().splitlines()[-1]), "xla": time_xla(rows, args.repeats)}
    from jaxpersona.model import skinny

    if skinny.available():
        res["kernel"] = time_xla(rows, args.repeats, kernel=True)
    else:
        print(f"the CPU kernel is not available ({skinny.unavailable_reason()}): no kernel column", file=sys.stderr)
    try:
        res["torch"] = time_torch(rows, args.repeats, cores)
        res["torch1"] = time_torch(rows, args.repeats, 1)
    except ImportError:
        print("torch is not installed (the `test` extra): XLA only", file=sys.stderr)
    cols = [c for c in ("xla", "kernel", "xla1", "torch", "torch1") if c in res]
    print(f"fp32 x @ W over {LAYERS} layers' weights, {cores} cores; µs per layer "
          f"(GB/s of weights); torch/xla, kernel/xla = speed relative to XLA's dot")
    print(f"{'shape':>8} {'M':>5} " + " ".join(f"{c:>16}" for c in cols) + "  torch/xla kernel/xla")
    table = []
    for name, k, n in SHAPES:
        for m in rows:
            key = f"{name}|{m}"
            row = {"shape": name, "K": k, "N": n, "M": m}
            cells = []
            for c in cols:
                us = res[c][key]
                row[c + "_us"] = us
                cells.append(f"{us:8.0f} ({k * n * 4 / us / 1e3:5.1f})")
            row["gflops_xla"] = 2 * m * k * n / res["xla"][key] / 1e3
            ratio = res["xla"][key] / res["torch"][key] if "torch" in res else None
            kratio = res["xla"][key] / res["kernel"][key] if "kernel" in res else None
            row["torch_over_xla"], row["kernel_over_xla"] = ratio, kratio
            table.append(row)
            print(f"{name:>8} {m:>5} " + " ".join(f"{c:>16}" for c in cells)
                  + (f"  {ratio:8.2f}" if ratio is not None else "         -")
                  + (f"  {kratio:9.2f}" if kratio is not None else ""))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"cores": cores, "rows": rows, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
