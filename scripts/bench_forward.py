#!/usr/bin/env python
"""Forward and generation throughput: jaxpersona vs HF transformers + torch, side by side.

Same weights (the converted HF directory of the GGUF model), same inputs, one process:
  * teacher-forced forward over a [batch, seq] block of tokens (full logits) -> tokens/s
  * sampled generation (temperature 0.8, top-p 0.95) of `gen_new` tokens for `gen_batch`
    left-padded chat prompts, EOS disabled so both do identical work -> new tokens/s
Compile time is reported apart; timed runs are warm. Prints a table and writes JSON.

    python scripts/bench_forward.py                       # SmolLM2-135M, fp32, CPU (issue defaults)
    python scripts/bench_forward.py --dtype bfloat16 --peak-tflops 989 --no-hf   # on a GPU: MFU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpersona.model import registry
from jaxpersona.compute.generate import generate
from jaxpersona.compute.handle import load
from jaxpersona.model.transformer import forward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import QUESTIONS  # noqa: E402  (the same chat prompts as the training benchmark)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first-call seconds, warm per-call seconds)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def forward_flops(cfg, n_tokens: int, seq: int) -> float:
    """Matmul FLOPs of a forward over n_tokens (2 * params-in-matmuls per token + attention)."""
    d, f, h, kv, hd = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = d * (h * hd + 2 * kv * hd) + h * hd * d + 3 * d * f
    attn = 2 * h * hd * seq  # QK^T and PV, average over causal positions ~ seq (upper bound)
    return 2.0 * n_tokens * (cfg.n_layers * (per_layer + attn) + d * cfg.vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=registry.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--matmul-dtype", default=None, choices=["float32", "bfloat16"],
                    help="jaxpersona's matmul weights and products in this dtype (mixed precision; default --dtype)")
    ap.add_argument("--hf-dtype", default=None, choices=["float32", "bfloat16"], help="the peer's torch dtype "
                    "(default --dtype)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--gen-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF/torch peer")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, to report MFU")
    ap.add_argument("--out", default="bench_results/forward.json")
    args = ap.parse_args()

    model = load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_fwd = args.batch * args.seq

    fwd = jax.jit(lambda p, t: forward(p, cfg, t).logits)
    tok_j = jnp.asarray(tokens)
    fwd_first, fwd_times = timed(lambda: fwd(model.params, tok_j).block_until_ready(), args.repeats)

    prompts = [QUESTIONS[i % len(QUESTIONS)] + " " * (i % 3) for i in range(args.gen_batch)]
    batch = model.encode(prompts, chat=True, system="You are a helpful assistant.")
    key = jax.random.key(0)

    def run_gen():
        out = generate(
            model.params, cfg, batch.tokens, batch.valid, max_new_tokens=args.gen_new, key=key,
            temperature=0.8, top_p=0.95, eos_ids=(), pad_id=model.pad_id,
        )
        out.tokens.block_until_ready()
        return out

    gen_first, gen_times = timed(run_gen, args.repeats)
    n_gen = args.gen_batch * args.gen_new
    results: dict = {
        "model": args.model,
        "dtype": args.dtype,
        "matmul_dtype": args.matmul_dtype or args.dtype,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "forward": {"batch": args.batch, "seq": args.seq, "compile_s": fwd_first - min(fwd_times),
                    "median_s": statistics.median(fwd_times), "tokens_per_s": n_fwd / statistics.median(fwd_times)},
        "generate": {"batch": args.gen_batch, "new_tokens": args.gen_new, "prompt_len": int(batch.tokens.shape[1]),
                     "compile_s": gen_first - min(gen_times), "median_s": statistics.median(gen_times),
                     "new_tokens_per_s": n_gen / statistics.median(gen_times)},
    }
    flops = forward_flops(cfg, n_fwd, args.seq)
    results["forward"]["gflops_per_s"] = flops / statistics.median(fwd_times) / 1e9
    if args.peak_tflops:
        results["forward"]["mfu"] = results["forward"]["gflops_per_s"] / (args.peak_tflops * 1e3)

    if not args.no_hf:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        hf_dir = model.name if Path(str(model.name)).is_dir() else registry.converted_dir(registry.resolve(args.model))
        tdtype = torch.float32 if (args.hf_dtype or args.dtype) == "float32" else torch.bfloat16
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=tdtype).eval()
        tt = torch.tensor(tokens).long()
        with torch.inference_mode():
            _, hf_fwd = timed(lambda: hf(tt).logits, args.repeats)
            ids = torch.tensor(batch.tokens).long()
            mask = torch.tensor(batch.valid).long()

            def hf_gen():
                torch.manual_seed(0)
                return hf.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                    max_new_tokens=args.gen_new, min_new_tokens=args.gen_new, pad_token_id=model.pad_id,
                )

            _, hf_gen_times = timed(hf_gen, args.repeats)
        results["hf"] = {
            "dtype": str(tdtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "attn_implementation": hf.config._attn_implementation,
            "forward_tokens_per_s": n_fwd / statistics.median(hf_fwd),
            "generate_new_tokens_per_s": n_gen / statistics.median(hf_gen_times),
        }
        results["ratio"] = {
            "forward": results["forward"]["tokens_per_s"] / results["hf"]["forward_tokens_per_s"],
            "generate": results["generate"]["new_tokens_per_s"] / results["hf"]["generate_new_tokens_per_s"],
        }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    f, g = results["forward"], results["generate"]
    peer = f" (HF+torch {results['hf']['dtype']})" if "hf" in results else ""
    print(f"\n{args.model}  {args.dtype}, matmuls {results['matmul_dtype']}{peer}  {results['backend']} ({results['device']}, {os.cpu_count()} cpus)")
    print(f"{'':28s}{'jaxpersona':>14s}{'HF+torch':>14s}{'ratio':>8s}")
    hf_r = results.get("hf", {})
    rows = [
        (f"forward {args.batch}x{args.seq} tok/s", f["tokens_per_s"], hf_r.get("forward_tokens_per_s")),
        (f"generate {args.gen_batch}x{args.gen_new} new tok/s", g["new_tokens_per_s"],
         hf_r.get("generate_new_tokens_per_s")),
    ]
    for name, ours, theirs in rows:
        ratio = f"{ours / theirs:7.2f}x" if theirs else "      -"
        theirs_s = f"{theirs:14.1f}" if theirs else f"{'-':>14s}"
        print(f"{name:28s}{ours:14.1f}{theirs_s}{ratio}")
    print(f"forward: {f['gflops_per_s']:.0f} GFLOP/s" + (f", MFU {f['mfu']:.1%}" if "mfu" in f else "")
          + f"; compile forward {f['compile_s']:.1f}s, generate {g['compile_s']:.1f}s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
