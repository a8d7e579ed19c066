#!/usr/bin/env python
"""Where the time goes: a ``jax.profiler`` trace of one workload and its top XLA operations.

Targets (SmolLM2-135M, fp32, the shapes of the benchmarks):

  * ``train``    — the LoRA trainer step of ``scripts/bench_train.py`` (batch 8 x 128, rank 8, all 7 targets);
  * ``generate`` — sampled generation 16 x 64 (T 0.8, top-p 0.95), as ``scripts/bench_forward.py``;
  * ``decode``   — the server's jitted decode step (``jaxpersona.serve.engine.decode_step``) at batch 16, no
    interventions, attention over 128 slots: the plain serving load's step (``--steps`` x 16 steps);
  * ``main``     — the whole main job, ``jaxpersona extract --trait evil`` with the default config, in-process
    (its steering sweep is ``jit_score_chunk`` + ``jit_generate_chunk``).

The trace (``--trace-dir``, viewable in Perfetto / TensorBoard) holds one event per executed XLA thunk with
its HLO module and op. This script sums them as *self time* (time in the op minus time in ops nested in it,
e.g. a ``while`` around a decode step), per module and per op, and names each op from the optimised HLO
(``--xla_dump_to``): op kind, shape and the JAX source op. Warm-up runs (compiles) happen before the trace.

    python scripts/profile_ops.py train                 # top 10 ops of the trainer step
    python scripts/profile_ops.py generate --top 15
    python scripts/profile_ops.py main --out bench_results/profile_main.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

DUMP = tempfile.mkdtemp(prefix="jp_hlo_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_pass_re=^$").strip()  # only the final (optimised) module text

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpersona.model import registry  # noqa: E402


# --- reading the trace ------------------------------------------------------------------------------
def hlo_ops(dump: str) -> dict[tuple[str, str], str]:
    """``(module, op) -> "kind shape  [jax op_name]"`` from the optimised HLO text files of ``dump``."""
    out: dict[tuple[str, str], str] = {}
    line_re = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)?) ([\w\-]+)\(")
    for path in glob.glob(os.path.join(dump, "*after_optimizations.txt")):
        text = Path(path).read_text(errors="replace")
        m = re.search(r"^HloModule ([\w.\-]+)", text, re.M)
        if not m:
            continue
        module = m.group(1)
        for line in text.splitlines():
            g = line_re.match(line)
            if not g:
                continue
            name, shape, kind = g.groups()
            src = re.search(r'op_name="([^"]+)"', line)
            kind_m = re.search(r"kind=(k\w+)", line)
            desc = f"{kind}{'/' + kind_m.group(1) if kind_m else ''} {shape[:60]}"
            out[(module, name)] = desc + (f"  [{src.group(1)[-70:]}]" if src else "")
    return out


def op_times(trace_dir: str) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int], float]:
    """Self time (ms) and count per ``(hlo_module, hlo_op)``; total wall of the traced window (ms)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    spans = [e for e in events if e.get("ph") == "X" and "ts" in e]
    wall = (max(e["ts"] + e.get("dur", 0) for e in spans) - min(e["ts"] for e in spans)) / 1e3 if spans else 0.0
    self_ms: dict[tuple[str, str], float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    by_tid: dict[int, list] = collections.defaultdict(list)
    for e in ops:
        by_tid[e["tid"]].append(e)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []  # [end, key, child time]
        for e in evs:
            start, dur = e["ts"], e.get("dur", 0.0)
            while stack and stack[-1][0] <= start:
                end, key, child = stack.pop()
                self_ms[key] -= child / 1e3
            key = (e["args"].get("hlo_module", "?"), e["args"]["hlo_op"])
            self_ms[key] += dur / 1e3
            count[key] += 1
            if stack:
                stack[-1][2] += dur
            stack.append([start + dur, key, 0.0])
        while stack:
            end, key, child = stack.pop()
            self_ms[key] -= child / 1e3
    return dict(self_ms), dict(count), wall


def report(trace_dir: str, top: int, label: str) -> dict:
    self_ms, count, wall = op_times(trace_dir)
    names = hlo_ops(DUMP)
    total = sum(self_ms.values())
    per_module: dict[str, float] = collections.defaultdict(float)
    for (mod, _), ms in self_ms.items():
        per_module[mod] += ms
    ranked = sorted(self_ms.items(), key=lambda kv: -kv[1])[:top]
    print(f"\n== {label}: traced window {wall / 1e3:.2f} s, XLA op self time {total / 1e3:.2f} s ==")
    print("per module (self time):")
    for mod, ms in sorted(per_module.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {ms / 1e3:8.2f} s  {100 * ms / max(total, 1e-9):5.1f}%  {mod}")
    print(f"top {top} ops:")
    rows = []
    for (mod, op), ms in ranked:
        desc = names.get((mod, op), "")
        print(f"  {ms:9.1f} ms {100 * ms / max(total, 1e-9):5.1f}% x{count[(mod, op)]:<6d} {mod}:{op}  {desc}")
        rows.append({"module": mod, "op": op, "self_ms": ms, "share": ms / max(total, 1e-9),
                     "count": count[(mod, op)], "hlo": desc})
    return {"target": label, "wall_s": wall / 1e3, "op_self_s": total / 1e3,
            "modules": {m: ms / 1e3 for m, ms in sorted(per_module.items(), key=lambda kv: -kv[1])}, "top": rows}


def traced(fn, trace_dir: str) -> None:
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # XLA ops only: the Python tracer would dominate the trace
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=opts):
        fn()


# --- targets ----------------------------------------------------------------------------------------
def target_train(model):
    """The trainer step of bench_train (same data, optimiser and loss); returns ``run(n_steps)``."""
    from bench_train import build_data, jax_table

    from jaxpersona.compute.train import TrainConfig, loss_terms, make_optimizer
    from jaxpersona.model.lora import init_adapter
    import optax

    cfg = model.cfg
    tc = TrainConfig(rank=8, alpha=16.0)
    tokens, resp, _ = build_data(model, 8, 128)
    batch = {k: jnp.asarray(v) for k, v in jax_table(tokens, resp).items()}
    tx, _ = make_optimizer(tc, 100)
    init = init_adapter(cfg, tc.lora, jax.random.key(1))
    factors = {"a": init.a, "b": init.b}
    state = [factors, tx.init(factors)]

    @jax.jit
    def step(factors, opt, params, batch):
        (loss, _), g = jax.value_and_grad(loss_terms, has_aux=True)(factors, init.scale, params, cfg, batch, None,
                                                                    None, 0.0)
        upd, opt = tx.update(g, opt, factors)
        return optax.apply_updates(factors, upd), opt, loss

    def run(steps: int) -> None:
        for _ in range(steps):
            f, o, loss = step(state[0], state[1], model.params, batch)
            loss.block_until_ready()
            state[0], state[1] = f, o

    return run


def target_generate(model):
    """Sampled generation 16 x 64 on bench_forward's prompts; returns ``run(n_times)``."""
    from bench_train import QUESTIONS

    from jaxpersona.compute.generate import generate

    prompts = [QUESTIONS[i % len(QUESTIONS)] + " " * (i % 3) for i in range(16)]
    batch = model.encode(prompts, chat=True, system="You are a helpful assistant.")
    tokens, valid = batch.tokens, batch.valid

    def run(steps: int) -> None:
        for i in range(steps):
            generate(model.params, model.cfg, tokens, valid, max_new_tokens=64, key=jax.random.key(i),
                     temperature=0.8, top_p=0.95, eos_ids=(), pad_id=model.pad_id).tokens.block_until_ready()

    return run


def target_decode(model, temperature: float = 0.0):
    """The engine's decode step, batch 16, span 128 (the plain load of ``bench_serve.py``: greedy; top-p 0.95 at
    ``temperature > 0``); ``run(n)``: n x 16 steps."""
    import jax.numpy as jnp

    from jaxpersona.model.transformer import Blocked
    from jaxpersona.serve.engine import Engine, EngineConfig, decode_step

    b, span = 16, 128
    eng = Engine(model.params, model.cfg, model.tokenizer, model.eos_ids, model.pad_id,
                 EngineConfig(batch=b, max_context=512, prefix_cache_mb=0))
    eng.cache = eng.cache._replace(valid=jnp.ones_like(eng.cache.valid))
    units, layers = eng.table.device()[1:]

    def run(steps: int) -> None:
        for _ in range(16 * steps):
            eng.cache, eng.logits, out = decode_step(
                eng.params, eng.cfg, eng.cache, eng.logits, jnp.full(b, span - 1, jnp.int32), jnp.ones(b, bool),
                jnp.asarray(eng.keys), jnp.zeros(b, jnp.int32), jnp.full(b, temperature, jnp.float32),
                jnp.full(b, 0.95, jnp.float32), None, units, layers, logprobs=jnp.asarray(False), readout=False,
                blocked=Blocked(64, span), cpu_kernel=eng.cpu_kernel)
            jax.device_get(out)

    return run


def target_main(out_dir: str, matmul_dtype: str | None = None):
    from jaxpersona import cli

    def run():
        extra = ["--matmul-dtype", matmul_dtype] if matmul_dtype else []
        rc = cli.main(["extract", "--trait", "evil", "--out", out_dir, "--quiet", *extra])
        if rc:
            sys.exit(f"the main job exited {rc}")

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=("train", "generate", "decode", "main"))
    ap.add_argument("--steps", type=int, default=3, help="traced repetitions (train, generate)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.0, help="decode: sample at this temperature (top-p 0.95)")
    ap.add_argument("--matmul-dtype", default=None, choices=("float32", "bfloat16"),
                    help="the model in mixed precision (see README, Precision)")
    ap.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    args = ap.parse_args()
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jp_trace_")
    if args.target == "main":
        run_dir = tempfile.mkdtemp(prefix="jp_main_")
        fn = target_main(run_dir, args.matmul_dtype)
        t0 = time.perf_counter()
        traced(fn, trace_dir)  # the main job compiles inside the trace: compile time shows as wall, not op time
    else:
        from jaxpersona.compute.handle import load

        model = load(registry.DEFAULT_MODEL, dtype="float32", matmul_dtype=args.matmul_dtype)
        run = {"train": target_train, "generate": target_generate, "decode": functools.partial(target_decode, temperature=args.temperature)}[args.target](model)
        run(1)  # compile outside the trace
        t0 = time.perf_counter()
        traced(lambda: run(args.steps), trace_dir)
    elapsed = time.perf_counter() - t0
    summary = report(trace_dir, args.top, args.target)
    summary.update(elapsed_s=elapsed, trace_dir=trace_dir, jax=jax.__version__, cpus=os.cpu_count())
    print(f"trace: {trace_dir}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
