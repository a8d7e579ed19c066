#!/usr/bin/env python
"""The main job's roofline: useful FLOPs per stage against the machine's float32 matmul ceiling.

Reads a finished ``jaxpersona extract`` run directory (its ``run.json`` stage times, ``config.json``, the
generated and steered texts) and counts, per stage, the matmul FLOPs the job's algorithm has to do — the
"useful" work, MFU-style: ``2 x (matmul parameters used) x tokens`` for every token each stage runs through
each layer, plus ``2 x d_model x vocab`` for every token whose full-vocabulary logits a measure reads. Attention
scores, norms, softmax, sampling and padding are not counted, so the total is a **lower bound** on the work and
the "floor" column a lower bound on the time. Then it measures the ceiling on this machine, float32, at the
shapes these stages multiply ([rows, 576] x [576, 1536] and friends, many rows):

  * ``xla``  — XLA's dot (what every stage uses), inside a 30-layer scan as a forward meets it;
  * ``blas`` — numpy's BLAS (OpenBLAS in the numpy wheel), the best general GEMM installed here.

    python scripts/roofline_main.py runs/persona_evil       # ~1 min: the table for a run of the main job
    python scripts/roofline_main.py RUN_DIR --out bench_results/roofline_main.json

What each stage counts (SmolLM2-135M: 212 MFLOP a token through all 30 blocks, 57 MFLOP a token of logits):

  generate     every prompt token through all blocks + every new token through all blocks and the head
  judge_check  the judge's prompts (after their shared head) + its integer trie's nodes, blocks and head
  extract      prompt + response tokens of every extraction answer through all blocks (activations)
  steer        per grid point: the scored answers through the blocks at and above its layer + the head on every
               answer token; all-position points also their distinct prompts; the trunk below once per sweep;
               the greedy generations (all blocks + head a token); the coherence scores (every distinct steered
               text through all blocks + head, each distinct question once)
  control      the random directions: scoring as an all-position (or response-position) point
  monitor      its sampled generations, the answers scored under two held-out system prompts, the activations
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def block_flops(cfg) -> float:  # noqa: ANN001
    """Matmul FLOPs of one token through one block (q, k, v, o and the gated MLP)."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    return 2.0 * (d * q + 2 * d * kv + q * d + 3 * d * f)


def count(run_dir: Path) -> tuple[dict[str, float], dict]:
    """Useful FLOPs per stage of the run in ``run_dir`` and the run's manifest."""
    from jaxpersona.compute.handle import load
    from jaxpersona.data.chat import conversation
    from jaxpersona.data.traits import load_anchors, load_trait
    from jaxpersona.measure.judge_check import anchor_sets
    from jaxpersona.measure.judge import LocalJudge
    from jaxpersona.pipelines.persona import ExtractConfig

    manifest = json.loads((run_dir / "run.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    default = ExtractConfig.default()
    ec = default.replace(**{k: v for k, v in config.items()
                            if hasattr(default, k) and k not in ("trait", "model", "judge")})
    model = load(config["model"])
    cfg = model.cfg
    L, blk, head = cfg.n_layers, block_flops(cfg), 2.0 * cfg.d_model * cfg.vocab_size
    full = L * blk
    trait = load_trait(config["trait"])
    n_tok = lambda text: len(model.tokenizer.encode(text, add_special_tokens=False)) if text else 0  # noqa: E731
    out: dict[str, float] = {}

    def generation(rows: list[dict]) -> float:
        ids = model.chat_ids([r["messages"] for r in rows])
        return sum(len(p) * full + int(r["tokens"]) * (full + head) for p, r in zip(ids, rows))

    responses = [json.loads(x) for x in (run_dir / "responses.jsonl").read_text().splitlines()]
    out["generate"] = generation(responses)

    # the judge check: the trait rubric on the trait's anchors (and the coherence rubric when that passed); the
    # prompts' shared head is prefilled once per call, each remainder and the integer trie's nodes per prompt
    check = json.loads((run_dir / "judge_check.json").read_text())
    spec = str(config.get("judge", ""))
    if not spec.startswith(f"local:{config['model']}:"):  # another model or an endpoint: not counted here
        print(f"(the judge {spec!r} is not the model itself: its check is not counted)")
        check = {"n": {}}
    judge = LocalJudge(model, answer_prefix=spec.split(":", 2)[2].strip("'") if spec.count(":") >= 2 else "")
    nodes = int(judge.trie.tokens.shape[0])
    sets = anchor_sets(trait, load_anchors(trait))[: 2 if check.get("coherence_auroc") is not None else 1]
    sets = sets if check.get("n") else []
    jc = 0.0
    for labelled in sets:
        seqs = [judge.render(p) for p in labelled.prompts]
        shared = len(os.path.commonprefix(seqs))
        jc += shared * full + sum((len(x) - shared + nodes) * full + (nodes + 1) * head for x in seqs)
    out["judge_check"] = jc

    extract = [r for r in responses if not r.get("eval")]
    ids = model.pair_ids([r["messages"] for r in extract], [r["response"] for r in extract])
    out["extract"] = sum((len(p) + len(a)) * full for p, a in ids)

    # the steering sweep
    ev = [r for r in responses if r.get("eval")]
    qs = sorted({r["question"] for r in ev}, key=[r["question"] for r in ev].index)
    answers = [r["response"] for r in ev]
    q_ids = {q: len(model.chat_ids([conversation(q)])[0]) for q in qs}
    a_tok = [n_tok(a) for a in answers]
    layers, coeffs = ec.layers_for(L), [c for c in ec.steer_coeffs if c != 0]
    steer = 0.0
    for positions in ec.steer_positions:
        for layer in layers:
            above = (L - layer) * blk
            per_point = sum((1 + t) * above + t * head for t in a_tok)  # last prompt token + answer; logits
            if positions == "all":
                per_point += sum(q_ids[q] * above for q in qs)
            steer += len(coeffs) * per_point
        steer += sum((1 + t) * full + t * head for t in a_tok) + sum(q_ids[q] * full for q in qs)  # c = 0, once
        n_points = len(layers) * len(coeffs) + 1
        steer += n_points * len(qs) * ec.steer_tokens * (full + head)  # greedy generations
    texts = set()
    for path in run_dir.glob("steering/**/results.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("text") and r["prompt"] < len(qs):
                texts.add((r["prompt"], r["text"]))
    steer += sum(n_tok(t) * (full + head) for _, t in texts) + sum(q_ids.values()) * full  # coherence
    steer += sum(t * (full + head) for t in a_tok)  # the answers' own coherence (calibration)
    out["steer"] = steer

    setting = json.loads((run_dir / "summary.json").read_text()).get("setting") or {}
    if setting:
        above = (L - int(setting["layer"])) * blk
        prompts = sum(q_ids[q] * above for q in qs) if setting["positions"] == "all" else 0.0
        out["control"] = ec.n_random * (sum((1 + t) * above + t * head for t in a_tok) + prompts)

    mon = [json.loads(x) for x in (run_dir / "monitor.jsonl").read_text().splitlines()]
    m_ids = model.pair_ids([r["messages"] for r in mon], [r["response"] for r in mon])
    scored = (2 * sum(len(a) * (full + head) for _, a in m_ids)  # the answers under two held-out system prompts
              + 2 * len(qs) * np.mean([len(p) for p, _ in m_ids]) * full)
    out["monitor"] = generation(mon) + scored + sum((len(p) + len(a)) * full for p, a in m_ids)
    return out, manifest


def ceiling(rows: int = 4096, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of float32 matmuls at the forward's shapes (``rows`` tokens): XLA inside a 30-layer scan (an MLP:
    gate, up, down, with its elementwise work fused in), and numpy's BLAS at the same three products alone."""
    import jax
    import jax.numpy as jnp

    d, f, n = 576, 1536, 30
    rng = np.random.default_rng(0)
    w1, w3 = (rng.standard_normal((n, d, f), np.float32) * 0.03 for _ in range(2))
    w2 = rng.standard_normal((n, f, d), np.float32) * 0.03
    x = rng.standard_normal((rows, d), np.float32)
    flops = n * 3 * 2.0 * rows * d * f

    @jax.jit
    def mlp(x, w1, w2, w3):  # noqa: ANN001, ANN202
        def step(h, ws):  # noqa: ANN001, ANN202
            a, b, c = ws
            return h + (jax.nn.silu(h @ a) * (h @ c)) @ b * 0.01, None
        return jax.lax.scan(step, x, (w1, w2, w3))[0]

    args = [jnp.asarray(a) for a in (x, w1, w2, w3)]
    mlp(*args).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        mlp(*args).block_until_ready()
    xla = flops * repeats / (time.perf_counter() - t) / 1e9

    a, c = np.empty((rows, f), np.float32), np.empty((rows, f), np.float32)
    o = np.empty((rows, d), np.float32)

    def blas() -> None:  # the three products alone, into preallocated outputs: BLAS's own rate
        for i in range(n):
            np.matmul(x, w1[i], out=a)
            np.matmul(x, w3[i], out=c)
            np.matmul(a, w2[i], out=o)

    blas()
    t = time.perf_counter()
    for _ in range(repeats):
        blas()
    return {"xla": xla, "blas": flops * repeats / (time.perf_counter() - t) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    need = ("run.json", "config.json", "responses.jsonl", "judge_check.json", "summary.json", "monitor.jsonl")
    missing = [n for n in need if not (args.run_dir / n).is_file()]
    if missing:
        sys.exit(f"{args.run_dir} is not a finished `jaxpersona extract` run of one trait "
                 f"(missing {', '.join(missing)})")
    flops, manifest = count(args.run_dir)
    ceil = ceiling()
    stages = {s["name"]: s for s in manifest["stages"]}
    print(f"float32 matmul ceiling here: XLA {ceil['xla']:.0f} GFLOP/s (30-layer MLP scan), numpy BLAS "
          f"{ceil['blas']:.0f} GFLOP/s (same products)")
    print(f"{'stage':12s} {'TFLOP':>7s} {'wall s':>7s} {'compile':>8s} {'run s':>7s} {'GFLOP/s':>8s} "
          f"{'of XLA':>7s} {'floor XLA':>10s} {'floor BLAS':>11s}")

    def row_of(name: str, f: float, wall: float, comp: float) -> dict:
        run = max(wall - comp, 1e-9)
        row = {"stage": name, "tflop": f / 1e12, "wall_s": wall, "compile_s": comp, "run_s": run,
               "gflops": f / run / 1e9, "floor_xla_s": f / ceil["xla"] / 1e9, "floor_blas_s": f / ceil["blas"] / 1e9}
        print(f"{name:12s} {row['tflop']:7.2f} {wall:7.1f} {comp:8.1f} {run:7.1f} {row['gflops']:8.0f} "
              f"{row['gflops'] / ceil['xla']:7.0%} {row['floor_xla_s']:10.1f} {row['floor_blas_s']:11.1f}")
        return row

    rows = [row_of(name, f, float(stages.get(name, {}).get("wall_s", 0.0)),
                   float(stages.get(name, {}).get("compile_s", 0.0))) for name, f in flops.items()]
    total = row_of("total", sum(flops.values()), sum(r["wall_s"] for r in rows),
                   sum(r["compile_s"] for r in rows))
    print(f"(run.json total {manifest.get('wall_s', 0):.1f} s; counted stages exclude the judge's own 'judge' stage "
          "and the summary)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"ceiling_gflops": ceil, "stages": rows, "total": total,
                                        "run_dir": str(args.run_dir), "package": manifest.get("package")}, indent=1))


if __name__ == "__main__":
    main()
