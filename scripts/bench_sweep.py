#!/usr/bin/env python
"""Sweep throughput: jaxpersona's batched, shared-prefix sweep vs an HF + torch forward-hook loop.

Grid: one steering vector x 10 layers x 5 coefficients (50 points), steer on all positions, over
8 chat prompts with target responses (~64 tokens each); metric: mean log-prob of the response
tokens. Both sides use the same weights, tokens and math; the peer runs one forward per grid
point with a hook on the decoder layer, the way persona_vectors / repeng do. Prints the ratio,
checks the two agree, and writes JSON.

    python scripts/bench_sweep.py                 # SmolLM2-135M, fp32, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpersona.model import registry
from jaxpersona.compute.handle import load
from jaxpersona.pipelines.sweep import load_config, sweep_vector
from jaxpersona.compute.sweep import Grid, run_sweep
from jaxpersona.compute.scoring import ScoringSet, encode_scoring


def block_model(layers: list[int], n_coeffs: int, n_layers: int, head_blocks: float, tp: int, ts: int,
                n_targets: int, zero_once: bool) -> dict[str, float]:
    """Work of the sweep in block-forwards x tokens (the head as ``head_blocks`` blocks per scored token).

    ``tp`` prompt-prefix tokens (0 for all-position steering: every token is then "suffix"), ``ts`` suffix
    tokens per row, ``n_targets`` scored tokens per row; one chunk per start layer. ``zero_once``: coefficient 0 is one point, not one per layer.
      * flat: the hook loop, every point the full depth over every token, logits at every token;
      * today (0.5): per chunk the prefix at full depth, the trunk below the chunk's start, then per point the
        layers from its start, logits at the target tokens only;
      * exact incremental trunk (0.6): the prefix once per sweep, the trunk carried from chunk to chunk
        (blocks below the last start once), per point its layers from its start.
    """
    ls = sorted(layers)
    per_point = [(n_layers - l) for l in ls for _ in range(n_coeffs)]
    if zero_once:
        per_point = [(n_layers - l) for l in ls for _ in range(n_coeffs - 1)] + [n_layers - ls[0]]
    points = len(per_point)
    flat = n_coeffs * len(ls) * (n_layers + head_blocks) * (tp + ts)
    head = points * head_blocks * n_targets
    today = len(ls) * n_layers * tp + sum(ls) * ts + sum(per_point) * ts + head
    best = n_layers * tp + max(ls) * ts + sum(per_point) * ts + head
    return {"flat": flat, "today": today, "incremental": best, "points": points,
            "speedup_today": flat / today, "speedup_incremental": flat / best}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hf_loop(hf, enc: dict, vec: np.ndarray, points: list[dict], positions: str = "all",
            device: str = "cpu") -> tuple[np.ndarray, float]:
    """One HF forward per grid point with a torch hook adding coeff * v to resid[layer] (every valid
    token, or the last prompt token + response tokens), on ``device``; ``vec`` ``[L+1, D]`` (one vector per resid
    point) or ``[D]``."""
    import torch

    t = {k: torch.tensor(np.asarray(enc[k]), device=device) for k in ("tokens", "valid", "pred_idx", "pred_tok",
                                                                       "pred_ok")}
    tokens, mask = t["tokens"].long(), t["valid"].long()
    pos = torch.clamp(mask.cumsum(-1) - 1, min=0)
    pred_idx, pred_tok, ok = t["pred_idx"].long(), t["pred_tok"].long(), t["pred_ok"].float()
    where = enc["valid"] if positions == "all" else (enc["resp"] | (np.roll(enc["resp"], -1, axis=1) & ~enc["resp"]))
    valid = torch.tensor(np.asarray(where), device=device).bool()[..., None]
    dtype = next(hf.parameters()).dtype
    out = np.zeros((len(points), tokens.shape[0]), np.float32)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for g, pt in enumerate(points):
            v = (torch.tensor(vec[pt["layer"]] if vec.ndim == 2 else vec, device=device) * pt["coeff"]).to(dtype)

            def add(module, args, output, v=v):
                h = output[0] if isinstance(output, tuple) else output
                h = torch.where(valid, h + v, h)
                return (h, *output[1:]) if isinstance(output, tuple) else h

            layer = pt["layer"]
            target = hf.model.embed_tokens if layer == 0 else hf.model.layers[layer - 1]
            handle = target.register_forward_hook(add)
            try:
                logits = hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits
            finally:
                handle.remove()
            logp = torch.log_softmax(logits.float(), -1)
            sel = logp.gather(1, pred_idx[..., None].expand(-1, -1, logp.shape[-1]))
            lp = sel.gather(-1, pred_tok[..., None])[..., 0]
            out[g] = ((lp * ok).sum(-1) / ok.sum(-1)).cpu().numpy()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/sweep_optimism.toml"))
    ap.add_argument("--out", default="bench_results/sweep.json")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--every-zero", action="store_true",
                    help="score coefficient 0 at every layer (as the hook loop does) instead of once")
    ap.add_argument("--positions", choices=["all", "response"], default="all",
                    help="steer every token, or only the last prompt token + response (the pipeline's setting: "
                         "the prompt prefix then runs once per chunk)")
    args = ap.parse_args()

    cfg = load_config(args.config)
    model = load(cfg.get("model", registry.DEFAULT_MODEL))
    name, vec = sweep_vector(model, cfg, Path(args.config).parent)  # scaled per [grid] units
    g = cfg["grid"]
    zero_once = not args.every_zero and 0.0 in [float(c) for c in g["coeffs"]]
    grid = Grid("steer", vec[None], (name,), tuple(g["layers"]), tuple(g["coeffs"]), positions=args.positions,
                baseline_once=zero_once)
    data = ScoringSet(tuple(cfg["data"]["prompts"]), tuple(cfg["data"]["responses"]), cfg["data"].get("system"))
    enc = encode_scoring(model, data)

    # warm-up compiles on a 2-layer grid (both chunk shapes: the lowest layer's group, which holds the
    # coefficient-0 point, and the others), then time the full grid
    warm = Grid("steer", vec[None], (name,), tuple(grid.layers[:2]), grid.coeffs, positions=args.positions,
                baseline_once=zero_once)
    t0 = time.perf_counter()
    run_sweep(model, warm, data, progress=False)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = run_sweep(model, grid, data, progress=False)
    jax_s = time.perf_counter() - t0
    jax_peak = peak_rss_mb()
    points = Grid("steer", vec[None], (name,), grid.layers, grid.coeffs, positions=args.positions).points()
    low = min(grid.layers)  # with zero_once the coefficient-0 rows exist at the lowest layer only: same numbers

    def row_of(p: dict) -> list[float]:
        layer = low if (zero_once and p["coeff"] == 0.0) else p["layer"]
        return [r["logprob"] for r in rows if r["layer"] == layer and r["coeff"] == p["coeff"]]

    ours = np.asarray([row_of(p) for p in points])
    n_tok = int(enc["valid"].sum())
    mc = model.cfg
    layer_params = 2 * mc.d_model * mc.n_heads * mc.head_dim + 2 * mc.d_model * mc.n_kv_heads * mc.head_dim \
        + 3 * mc.d_model * mc.d_ff
    head_blocks = mc.vocab_size * mc.d_model / layer_params
    n_resp = int(enc["pred_ok"].sum(1).max())
    if args.positions == "response":
        tp, ts = int(enc["tokens"].shape[1]) - n_resp - 1, n_resp + 1
    else:
        tp, ts = 0, int(enc["tokens"].shape[1])
    model_w = block_model(list(grid.layers), len(grid.coeffs), mc.n_layers, head_blocks, tp, ts, n_resp, zero_once)
    res = {
        "model": cfg.get("model", registry.DEFAULT_MODEL), "grid_points": len(points), "positions": args.positions,
        "prompts": int(enc["tokens"].shape[0]), "seq_len": int(enc["tokens"].shape[1]), "cpu_count": os.cpu_count(),
        "jaxpersona": {"seconds": jax_s, "compile_s": compile_s, "points_per_s": len(points) / jax_s,
                       "tokens_per_s": len(points) * n_tok / jax_s, "peak_rss_mb_after": jax_peak,
                       "points_computed": len(grid.points())},
        "block_model": model_w,
    }
    if not args.no_hf:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        hf_dir = registry.converted_dir(registry.resolve(res["model"]))
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        hf_loop(hf, enc, vec, points[:1], args.positions)  # warm-up
        theirs, hf_s = hf_loop(hf, enc, vec, points, args.positions)
        res["hf_torch_hooks"] = {"seconds": hf_s, "points_per_s": len(points) / hf_s,
                                 "tokens_per_s": len(points) * n_tok / hf_s, "peak_rss_mb_after": peak_rss_mb()}
        res["ratio"] = hf_s / jax_s
        res["share_of_model"] = res["ratio"] / model_w["speedup_incremental"]
        res["max_abs_logprob_diff"] = float(np.abs(ours - theirs).max())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    j = res["jaxpersona"]
    print(f"\n{len(points)} grid points x {res['prompts']} prompts x {res['seq_len']} tokens, {os.cpu_count()} cpus")
    print(f"jaxpersona sweep   {j['seconds']:7.2f} s  {j['points_per_s']:6.2f} points/s  (compile {compile_s:.1f} s,"
          f" peak RSS {j['peak_rss_mb_after']:.0f} MB)")
    if "ratio" in res:
        h = res["hf_torch_hooks"]
        print(f"HF + torch hooks   {h['seconds']:7.2f} s  {h['points_per_s']:6.2f} points/s")
        print(f"ratio {res['ratio']:.2f}x   (max |logprob diff| {res['max_abs_logprob_diff']:.2e})")
    m = res["block_model"]
    print(f"modelled work (block-forwards x tokens, head as {head_blocks:.1f} blocks/token): flat {m['flat']:.0f}, "
          f"0.5 per-chunk trunk {m['today']:.0f} ({m['speedup_today']:.2f}x), exact incremental trunk "
          f"{m['incremental']:.0f} ({m['speedup_incremental']:.2f}x)"
          + (f"; measured {res['ratio']:.2f}x = {100 * res['share_of_model']:.0f}% of the incremental model"
             if "ratio" in res else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
