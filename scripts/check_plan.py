#!/usr/bin/env python
"""Check `jaxpersona plan` against measured memory on this machine's CPU: for each real small model, run the
prefill the plan describes (fp32, one device) and compare the peak RSS growth while it runs (Linux VmHWM,
reset just before) with the plan's KV cache + activations; the params are compared with the loaded arrays.

    python scripts/check_plan.py [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct] [--batch 8 --seq 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def one(name: str, batch: int, seq: int, new: int) -> dict:
    import jax
    import numpy as np

    from jaxpersona.model import registry
    from jaxpersona.compute.handle import load
    from jaxpersona.model.transformer import KVCache, forward
    from jaxpersona.compute.plan import make_plan

    m = load(name)
    plan = make_plan(str(registry.converted_dir(registry.resolve(name))), "1x1", batch=batch, seq=seq, new_tokens=new,
                     dtype="float32")
    tokens = np.random.default_rng(0).integers(0, m.cfg.vocab_size, (batch, seq)).astype(np.int32)
    fn = jax.jit(lambda p, t, c: forward(p, m.cfg, t, cache=c, logits="last"), donate_argnums=(2,))
    shape = jax.ShapeDtypeStruct
    kv = (m.cfg.n_layers, batch, m.cfg.n_kv_heads, seq + new, m.cfg.head_dim)
    compiled = fn.lower(m.params, shape(tokens.shape, np.int32),
                        KVCache(shape(kv, np.float32), shape(kv, np.float32), shape((batch, seq + new), bool))).compile()

    def rss(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    before = rss("VmRSS:")
    cache = KVCache.empty(m.cfg, batch, seq + new, np.float32)
    out = compiled(m.params, tokens, cache)
    jax.block_until_ready(out)
    peak = rss("VmHWM:")
    return {"model": name, "batch": batch, "seq": seq, "new_tokens": new,
            "params_plan": plan.params, "params_loaded": int(sum(x.nbytes for x in jax.tree.leaves(m.params))),
            "kv_plus_activations_plan": plan.kv_cache + plan.activations, "peak_growth_measured": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.seq, args.new_tokens)))
        return
    rows = []
    for name in args.models:  # a fresh process each: a clean peak
        out = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--seq", str(args.seq),
                              "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    print("| model | params: plan / loaded | KV + activations: plan | peak RSS growth while running | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['batch']}x{r['seq']}+{r['new_tokens']}) | {mib(r['params_plan'])} / "
              f"{mib(r['params_loaded'])} | {mib(r['kv_plus_activations_plan'])} | {mib(r['peak_growth_measured'])} | "
              f"{r['peak_growth_measured'] / r['kv_plus_activations_plan']:.2f} |")


if __name__ == "__main__":
    main()
