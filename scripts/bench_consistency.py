#!/usr/bin/env python
"""K-seed sampling for run-to-run consistency: the seed axis vmapped in one computation vs a loop over
seeds (the same jitted sampler, one key at a time) vs HF transformers + torch ``generate`` looped over
seeds, the way persona-consistency studies sample today. Same model, prompts, temperature and token
budget; greedy-free sampling, so the sides agree in distribution, not token for token.

    python scripts/bench_consistency.py --seeds 8 --prompts 8 --tokens 32     # SmolLM2-135M, fp32, CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpersona.model import registry
from jaxpersona.pipelines.consistency import personas_of, sample_seeds
from jaxpersona.compute.generate import generate
from jaxpersona.data.chat import conversation
from jaxpersona.compute.handle import load
from jaxpersona.compute.batching import pad_left
from jaxpersona.data.roles import load_roles


def timed(fn, repeats: int) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=registry.DEFAULT_MODEL)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="bench_consistency.json")
    a = ap.parse_args()
    m = load(a.model)
    personas = personas_of("traits", a.prompts, 0)
    qs = load_roles().questions
    convs = [conversation(qs[i % len(qs)], personas[i % len(personas)][1]) for i in range(a.prompts)]
    batch = pad_left([m.tokenizer.encode(m.format_chat(c), add_special_tokens=False) for c in convs], m.pad_id)
    tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.valid)
    keys = jax.random.split(jax.random.key(0), a.seeds)
    temp, top_p = jnp.float32(a.temperature), jnp.float32(1.0)
    kw = dict(max_new_tokens=a.tokens, eos_ids=(), pad_id=m.pad_id)  # no EOS: every sample runs the full budget

    def vmapped():
        sample_seeds(m.params, m.cfg, tokens, valid, keys, temp, top_p, **kw).tokens.block_until_ready()

    def looped():
        for k in keys:
            generate(m.params, m.cfg, batch.tokens, batch.valid, key=k, temperature=a.temperature, top_p=1.0,
                     **kw).tokens.block_until_ready()

    res = {"model": a.model, "seeds": a.seeds, "prompts": a.prompts, "tokens": a.tokens,
           "jax_vmapped_s": timed(vmapped, a.repeats), "jax_loop_s": timed(looped, a.repeats)}
    if not a.no_hf:
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(registry.converted_dir(registry.resolve(a.model)), dtype=torch.float32)
        hf.eval()
        ids = torch.tensor(batch.tokens, dtype=torch.long)
        mask = torch.tensor(batch.valid, dtype=torch.long)

        def hf_loop():
            with torch.no_grad():
                for k in range(a.seeds):
                    torch.manual_seed(k)
                    hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=a.temperature, top_p=1.0,
                                top_k=0, max_new_tokens=a.tokens, min_new_tokens=a.tokens, pad_token_id=m.pad_id)

        res["hf_torch_loop_s"] = timed(hf_loop, a.repeats)
    n = a.seeds * a.prompts * a.tokens
    for k in [k for k in res if k.endswith("_s")]:
        res[k.replace("_s", "_tok_per_s")] = n / res[k]
    res["speedup_vmapped_vs_loop"] = res["jax_loop_s"] / res["jax_vmapped_s"]
    if "hf_torch_loop_s" in res:
        res["speedup_vmapped_vs_hf"] = res["hf_torch_loop_s"] / res["jax_vmapped_s"]
    print(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
