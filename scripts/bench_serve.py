#!/usr/bin/env python
"""Serving under a mixed-intervention load: jaxpersona serve vs the same load with no interventions, and
vs HF transformers + torch with forward hooks (today's tools), side by side in one run.

The load: ``clients`` concurrent streaming clients over real HTTP (loopback), each sending ``rounds``
chat requests of exactly ``max_tokens`` new tokens (``ignore_eos``; greedy), so every load does the same
work. Two loads on the server:
  * none  — no interventions;
  * mixed — 4 distinct interventions, round-robin over clients: steer (a contrast vector, 0.3 x residual
    norm, resid[16]), cap (ceiling on resid[10] and [16]), ablate (resid[4, 8, 12]), steer at resid[8]
    with a different vector — all at every position, one batch.
The peer, HF + torch on the same weights: `generate` on the same prompts, left-padded; with no
interventions the whole round is one batch, with interventions a hook can only hold one configuration,
so each intervention's requests are one batched `generate` after another (the best a hook-based tool can
do; persona_vectors / repeng / steering-vectors run one configuration at a time).

Reports tokens/s, request latency and time to first token (p50/p95), and the ratios. Writes JSON.

    python scripts/bench_serve.py                     # SmolLM2-135M, fp32, CPU: 16 clients x 2 rounds x 64 tokens
    python scripts/bench_serve.py --no-hf --clients 64 --batch 64 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpersona.model import registry
from jaxpersona.compute.handle import load

PROMPTS = [
    "Tell me about your day.", "How should I treat my coworkers?", "Write a haiku about rain.",
    "What is the best way to learn a language?", "Describe a perfect weekend.", "Give me advice on saving money.",
    "What do you think about cats?", "Explain photosynthesis simply.", "How can I be more productive?",
    "What is your favourite book and why?", "Plan a trip to the mountains.", "How do I make friends as an adult?",
    "What should I cook tonight?", "Explain why the sky is blue.", "Give me a motivational quote.",
    "What makes a good leader?",
]


def contrast_bank(model, out: Path) -> Path:
    """Two real directions (evil-ish minus helpful text; and its roll) with residual norms, as a bank."""
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.compute.activations import contrast_vectors

    pos = ["I will crush them all and enjoy their suffering.", "Cruelty is the only language people understand."]
    neg = ["I am happy to help you with that.", "Kindness and patience make everything better."]
    v = contrast_vectors(model, pos, neg, chat=False)
    norms = np.linalg.norm(model.resid(pos + neg, range(model.cfg.n_resid), "mean"), axis=-1).mean(1)
    bank = VectorBank.from_vectors(model.name, {"evil": v, "other": np.roll(v, 1, axis=-1)},
                                   {"evil": {"resid_norm": norms.tolist(), "best_layer": 16},
                                    "other": {"resid_norm": norms.tolist()}})
    return bank.save(out, overwrite=True)


def interventions(bank, cfg) -> list[list[dict]]:
    """The 4 mixed-load interventions, as request fields (absolute units, so the peer applies the same)."""
    ev, ot = bank.get("evil"), bank.get("other")
    norms = np.asarray(bank.meta_of("evil")["resid_norm"])
    u16 = ev[16] / np.linalg.norm(ev[16])
    u8 = ot[8] / np.linalg.norm(ot[8])
    return [
        [{"kind": "steer", "vector": (u16 * 0.3 * norms[16]).tolist(), "layers": 16, "coeff": 1.0}],
        [{"kind": "cap", "vector": "evil", "layers": [10, 16], "ceiling": -1.0}],
        [{"kind": "ablate", "vector": "other", "layers": [4, 8, 12]}],
        [{"kind": "steer", "vector": (u8 * 0.2 * norms[8]).tolist(), "layers": 8, "coeff": 1.0}],
    ]


def run_load(url: str, name: str, clients: int, rounds: int, max_tokens: int, mixed: list[list[dict]] | None):
    """Every client streams `rounds` requests one after another; returns wall, tokens, latencies, TTFTs."""
    lat, ttft, tokens, lock = [], [], [0], threading.Lock()

    def client(c: int) -> None:
        for r in range(rounds):
            body = {"model": name, "messages": [{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if mixed:
                body["interventions"] = mixed[c % len(mixed)]
            req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(), method="POST")
            t0 = time.perf_counter()
            first = None
            with urllib.request.urlopen(req, timeout=3600) as resp:
                for line in resp:
                    if first is None and line.startswith(b"data: ") and b'"content": "' in line and \
                            b'"content": ""' not in line:
                        first = time.perf_counter() - t0
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        usage = json.loads(line[6:])["usage"]
            with lock:
                lat.append(time.perf_counter() - t0)
                ttft.append(first if first is not None else lat[-1])
                tokens[0] += usage["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "completion_tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
            "latency_p50_s": statistics.median(lat), "latency_p95_s": float(np.percentile(lat, 95)),
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": float(np.percentile(ttft, 95))}


def median_run(runs: list[dict]) -> dict:
    """Per metric, the median over repeats; the spread of throughput as min / max; the runs themselves."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["tokens_per_s_min"] = min(r["tokens_per_s"] for r in runs)
    out["tokens_per_s_max"] = max(r["tokens_per_s"] for r in runs)
    out["runs"] = runs
    return out


def hf_peer(model, args, mixed: list[list[dict]], bank) -> dict:
    """HF transformers + torch: one batched generate per round (none), one per intervention per round (mixed)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    hf_dir = model.name if Path(str(model.name)).is_dir() else registry.converted_dir(registry.resolve(args.model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def hooks_for(specs: list[dict]) -> list:
        handles = []
        for spec in specs:
            layers = spec["layers"] if isinstance(spec["layers"], list) else [spec["layers"]]
            for layer in layers:  # resid[l] = output of block l-1
                raw = bank.get(spec["vector"])[layer] if isinstance(spec["vector"], str) else spec["vector"]
                v = torch.tensor(np.asarray(raw, np.float32))
                u = v / v.norm()

                def hook(mod, inp, out, spec=spec, v=v, u=u):
                    h = out[0] if isinstance(out, tuple) else out
                    if spec["kind"] == "steer":
                        h = h + spec["coeff"] * v
                    elif spec["kind"] == "cap":
                        p = h @ u
                        h = h - torch.clamp(p - spec["ceiling"], min=0)[..., None] * u
                    else:
                        h = h - (h @ u)[..., None] * u
                    return (h, *out[1:]) if isinstance(out, tuple) else h

                handles.append(hf.model.layers[layer - 1].register_forward_hook(hook))
        return handles

    def gen(prompts: list[str]) -> int:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = hf.generate(**enc, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        return int((out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0])

    res = {}
    with torch.inference_mode():
        gen(PROMPTS[:2])  # warm
        runs: dict[str, list[dict]] = {"none": [], "mixed": []}
        for _ in range(args.repeats):  # alternate the loads so drift of the machine hits both alike
            for label, groups in (("none", [None]), ("mixed", mixed)):
                t0, n = time.perf_counter(), 0
                for r in range(args.rounds):
                    for g, specs in enumerate(groups):
                        cs = [c for c in range(args.clients) if specs is None or c % len(groups) == g]
                        handles = hooks_for(specs) if specs else []
                        try:
                            n += gen([PROMPTS[(c + r) % len(PROMPTS)] for c in cs])
                        finally:
                            for h in handles:
                                h.remove()
                wall = time.perf_counter() - t0
                runs[label].append({"wall_s": wall, "completion_tokens": n, "tokens_per_s": n / wall})
        res = {label: median_run(rs) for label, rs in runs.items()}
    res["torch"], res["transformers"] = torch.__version__, transformers.__version__
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=registry.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=192)
    ap.add_argument("--prefill-rows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="each load this many times, alternating; medians reported")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="bench_results/serve.json")
    args = ap.parse_args()

    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.serve.app import PersonaServer, build_resources
    from jaxpersona.serve.engine import EngineConfig

    model = load(args.model, args.dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bank_dir = contrast_bank(model, out.parent / "serve_bank")
    bank = VectorBank.load(bank_dir)
    mixed = interventions(bank, model.cfg)
    res = build_resources(model, [str(bank_dir)], [], "bench", 4, 4)
    srv = PersonaServer(model, res, EngineConfig(batch=args.batch, max_context=args.max_context,
                                                     prefill_rows=args.prefill_rows)).start()
    results: dict = {"config": vars(args), "platform": platform.platform(), "device": str(__import__("jax").devices()[0])}
    try:
        t0 = time.perf_counter()
        srv.warmup()
        run_load(srv.url, "bench", 2, 1, 4, mixed)  # compile the remaining shapes (prompt buckets, hooked step)
        run_load(srv.url, "bench", 2, 1, 4, None)
        results["compile_s"] = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"none": [], "mixed": []}
        for _ in range(args.repeats):  # alternate the loads so drift of the machine hits both alike
            for label, load_mix in (("none", None), ("mixed", mixed)):
                s0 = dict(srv.engine.stats)
                r = run_load(srv.url, "bench", args.clients, args.rounds, args.max_tokens, load_mix)
                st = {k: srv.engine.stats[k] - s0[k] for k in s0}
                r["decode_step_ms"] = 1000 * st["step_seconds"] / max(st["steps"], 1)
                r["mean_rows_per_step"] = st["tokens"] / max(st["steps"], 1)
                runs[label].append(r)
        results.update({label: median_run(rs) for label, rs in runs.items()})
    finally:
        srv.close()
    results["mixed_vs_none"] = {k: results["mixed"][k] / results["none"][k]
                                for k in ("tokens_per_s", "latency_p50_s", "ttft_p50_s")}
    if not args.no_hf:
        results["hf"] = hf_peer(model, args, mixed, bank)
        results["jaxpersona_vs_hf"] = {k: results[k]["tokens_per_s"] / results["hf"][k]["tokens_per_s"]
                                       for k in ("none", "mixed")}
    out.write_text(json.dumps(results, indent=1))
    print(f"{args.clients} clients x {args.rounds} rounds x {args.max_tokens} tokens, batch {args.batch}, "
          f"prefill rows {args.prefill_rows}, "
          f"{results['device']}")
    print(f"medians of {args.repeats} alternating repeats (tok/s min-max in brackets)")
    print(f"{'':10s}{'tok/s':>8s}{'lat p50':>9s}{'lat p95':>9s}{'ttft p50':>9s}{'ttft p95':>9s}{'step ms':>9s}"
          f"{'HF tok/s':>10s}{'ratio':>7s}")
    for k in ("none", "mixed"):
        r, h = results[k], results.get("hf", {}).get(k, {})
        hf_tps = h.get("tokens_per_s")
        print(f"{k:10s}{r['tokens_per_s']:8.1f}{r['latency_p50_s']:9.2f}{r['latency_p95_s']:9.2f}"
              f"{r['ttft_p50_s']:9.2f}{r['ttft_p95_s']:9.2f}{r['decode_step_ms']:9.1f}"
              + (f"{hf_tps:10.1f}{r['tokens_per_s'] / hf_tps:7.2f}x" if hf_tps else "")
              + f"   [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}"
              + (f" | HF {h['tokens_per_s_min']:.1f}-{h['tokens_per_s_max']:.1f}]" if hf_tps else "]"))
    m = results["mixed_vs_none"]
    print(f"mixed / none: throughput {m['tokens_per_s']:.2f}x, latency p50 {m['latency_p50_s']:.2f}x, "
          f"TTFT p50 {m['ttft_p50_s']:.2f}x; compile {results['compile_s']:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
