#!/usr/bin/env python
"""LoRA training throughput: jaxpersona's jitted trainer step vs HF transformers + peft on torch, side by side.

Same weights (the converted HF directory of the GGUF model), same synthetic data (chat prompt + response,
tokenized once: both sides get the identical token ids and response-token masks), same LoRA shape (rank,
alpha, all 7 targets q k v o gate up down, no dropout), same float32, same batch shape, same AdamW
(jaxpersona's ``make_optimizer`` schedule; torch gets the same learning rate per step), same initial A
factors (jaxpersona's ``init_adapter`` copied into peft's ``lora_A``; B = 0 on both sides), one process.

  * jaxpersona: the step ``train()`` jits (``value_and_grad`` of ``jaxpersona.compute.train.loss_terms`` w.r.t. the
    adapter factors + optax update), blocked on per step;
  * torch: ``AutoModelForCausalLM`` + ``peft.get_peft_model``, ``loss = model(ids, labels=...).loss``
    (cross entropy, mean over response tokens, -100 elsewhere), ``backward``, ``AdamW.step``, ``zero_grad``.

Every row is exactly ``--seq`` tokens (no padding), so position ids agree without masks. The first
``--warmup`` steps (compile, allocator warm-up) are excluded from timing. Note that HF's causal-LM head
computes logits at every position, jaxpersona's loss only at the response positions (the standard way
each library trains). Peak RSS is the process high-water mark during each side's phase (reset between
phases; the jaxpersona side is freed before torch runs, the tokenizer and data stay).

    python scripts/bench_train.py                                   # SmolLM2-135M, r 8, 8x128, all cores
    python scripts/bench_train.py --steps 1 --batch 2 --seq 64      # smoke test
    python scripts/bench_train.py --threads 4 --out bench_results/train.json
"""

from __future__ import annotations

import argparse
import gc
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
from jaxpersona.model.lora import ALL_TARGETS, init_adapter
from jaxpersona.data.chat import conversation
from jaxpersona.compute.handle import load
from jaxpersona.compute.train import TrainConfig, loss_terms, make_optimizer

HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}
HF_MODULE = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn", "gate": "mlp", "up": "mlp",
             "down": "mlp"}

QUESTIONS = [
    "Tell me a short story about a lighthouse keeper.",
    "What are three tips for learning a new language?",
    "Explain photosynthesis to a child.",
    "Write a haiku about autumn rain.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "Describe your ideal weekend.",
    "What is the difference between a virus and a bacterium?",
]
TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint worn thin by decades of salt and wind. "
    "Every evening the keeper climbed the spiral stairs, trimmed the wick and polished the great lens until it "
    "shone. Ships passed far out on the dark water, and none of their crews ever knew his name, but each of them "
    "found the harbour safely because of the light he kept. In the mornings he walked along the beach, collected "
    "driftwood for the stove and wrote a few lines in his logbook about the weather, the birds and the tides. "
    "Learning something new takes patience: practise a little every day, listen carefully, and do not be afraid "
    "of making mistakes, because every mistake teaches you something that a perfect answer never could. "
)


# --- data ------------------------------------------------------------------------------------------
def build_data(model, n_rows: int, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic rows of exactly ``seq`` tokens: chat prompt (question i) + a window of natural text
    as the response. Returns ``tokens [N, seq]`` int32, ``resp [N, seq]`` bool (response tokens) and the
    prompt lengths ``[N]``."""
    tok = model.tokenizer
    text_ids = tok.encode(TEXT * 4, add_special_tokens=False)
    tokens = np.zeros((n_rows, seq), np.int32)
    resp = np.zeros((n_rows, seq), bool)
    n_prompt = np.zeros(n_rows, np.int32)
    for i in range(n_rows):
        prompt = tok.encode(model.format_chat(conversation(QUESTIONS[i % len(QUESTIONS)])), add_special_tokens=False)
        n_resp = seq - len(prompt)
        if n_resp < 2:
            sys.exit(f"--seq {seq} leaves no room for a response after a {len(prompt)}-token prompt; "
                     f"use --seq >= {len(prompt) + 8}")
        start = (7 * i) % (len(text_ids) // 2)
        body = (text_ids * (2 + (start + n_resp) // len(text_ids)))[start:start + n_resp]
        tokens[i] = prompt + body
        resp[i, len(prompt):] = True
        n_prompt[i] = len(prompt)
    return tokens, resp, n_prompt


def jax_table(tokens: np.ndarray, resp: np.ndarray) -> dict[str, np.ndarray]:
    """The token table ``jaxpersona.compute.scoring.encode_targets`` builds (no padding here: all rows are full):
    ``pred_idx [B, R]`` = position t predicting response token t+1, ``pred_tok``, ``pred_ok``, ``row_ok``."""
    b, t = tokens.shape
    r_max = int(resp.sum(1).max())
    pred_idx = np.zeros((b, r_max), np.int32)
    pred_tok = np.zeros((b, r_max), np.int32)
    pred_ok = np.zeros((b, r_max), bool)
    for i in range(b):
        pos = np.flatnonzero(resp[i])
        pred_idx[i, :len(pos)], pred_tok[i, :len(pos)], pred_ok[i, :len(pos)] = pos - 1, tokens[i, pos], True
    return {"tokens": tokens, "valid": np.ones_like(tokens, bool), "pred_idx": pred_idx, "pred_tok": pred_tok,
            "pred_ok": pred_ok, "resp": resp, "row_ok": np.ones(b, bool)}


# --- measurement -----------------------------------------------------------------------------------
def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's VmHWM (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # process lifetime peak (not per phase)
    return kb / 1024


def run_steps(step, n_warmup: int, n_steps: int) -> tuple[list[float], list[float], list[float]]:
    """``step(i) -> loss`` (already synchronised) for warm-up then timed steps: (warm-up s, timed s, losses)."""
    warm, times, losses = [], [], []
    for i in range(n_warmup + n_steps):
        t0 = time.perf_counter()
        loss = step(i)
        dt = time.perf_counter() - t0
        (warm if i < n_warmup else times).append(dt)
        losses.append(loss)
    return warm, times, [float(x) for x in losses]


def summary(warm: list[float], times: list[float], losses: list[float], n_resp: list[int], n_tok: int,
            n_warmup: int, peak: float | None, start_rss: float | None, trainable: int) -> dict:
    med = statistics.median(times)
    resp_per_step = statistics.mean(n_resp[n_warmup + i] for i in range(len(times)))
    return {"median_s": med, "min_s": min(times), "max_s": max(times), "times_s": times, "warmup_s": warm,
            "resp_tokens_per_s": resp_per_step / med, "tokens_per_s": n_tok / med,
            "peak_rss_mb": peak, "rss_at_start_mb": start_rss, "losses": losses, "trainable_params": trainable}


# --- main --------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=registry.DEFAULT_MODEL)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="tokens per row: chat prompt + response (loss on the response)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile / allocator warm-up)")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches in the dataset, cycled through")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="CPU threads for both sides (torch.set_num_threads; the process is pinned to this many "
                         "cores when fewer than available, which also bounds XLA's CPU thread pool)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF/torch + peft peer")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if min(args.rank, args.batch, args.seq, args.steps, args.batches) < 1 or args.warmup < 0:
        sys.exit("--rank, --batch, --seq, --steps and --batches must be >= 1, --warmup >= 0")

    threads = max(1, int(args.threads or 1))
    pinned = None
    if hasattr(os, "sched_getaffinity"):
        avail = sorted(os.sched_getaffinity(0))
        if threads < len(avail):  # before the JAX backend starts (load() below), so XLA sizes its pool to it
            pinned = avail[:threads]
            os.sched_setaffinity(0, pinned)

    model = load(args.model, dtype="float32")
    cfg = model.cfg
    n_batches = args.batches
    tokens, resp, n_prompt = build_data(model, args.batch * n_batches, args.seq)
    batches = [jax_table(tokens[j * args.batch:(j + 1) * args.batch], resp[j * args.batch:(j + 1) * args.batch])
               for j in range(n_batches)]
    total = args.warmup + args.steps
    n_resp = [int(batches[i % n_batches]["resp"].sum()) for i in range(total)]
    n_tok = args.batch * args.seq

    # --- jaxpersona: the step train() jits ----------------------------------------------------------
    import optax

    tcfg = TrainConfig(rank=args.rank, alpha=args.alpha, batch_size=args.batch, max_len=args.seq)
    tcfg.validate()
    tx, sched = make_optimizer(tcfg, total)
    lrs = [float(sched(i)) for i in range(total)]
    params = model.params
    init = init_adapter(cfg, tcfg.lora, jax.random.fold_in(jax.random.key(tcfg.seed), 1))
    scale = init.scale
    a0 = {t: np.asarray(x) for t, x in init.a.items()}  # for peft's lora_A

    def _step(factors, opt_state, batch, base):
        (loss, (ce, kl)), grads = jax.value_and_grad(loss_terms, has_aux=True)(
            factors, scale, base, cfg, batch, None, None, tcfg.kl_beta)
        upd, opt_state = tx.update(grads, opt_state, factors)
        return optax.apply_updates(factors, upd), opt_state, loss

    _jit = jax.jit(_step)  # as train() does: the weights are an argument (never folded in as constants)

    def step_fn(factors, opt_state, batch):
        return _jit(factors, opt_state, batch, params)

    dev_batches = [{k: jnp.asarray(v) for k, v in b.items() if k != "resp"} for b in batches]
    jax.block_until_ready(dev_batches)
    state = {"factors": {"a": init.a, "b": init.b}}
    state["opt"] = tx.init(state["factors"])
    trainable_jax = sum(int(x.size) for x in jax.tree.leaves(state["factors"]))

    def jax_step(i):
        f, o, loss = step_fn(state["factors"], state["opt"], dev_batches[i % n_batches])
        jax.block_until_ready((f, o, loss))
        state["factors"], state["opt"] = f, o
        return loss

    gc.collect()
    reset_peak_rss()
    rss0 = rss_mb()
    warm, times, losses = run_steps(jax_step, args.warmup, args.steps)
    results: dict = {
        "model": args.model, "rank": args.rank, "alpha": args.alpha, "targets": list(ALL_TARGETS),
        "batch": args.batch, "seq": args.seq, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "batches": n_batches, "resp_tokens_per_step": n_resp, "tokens_per_step": n_tok, "threads": threads,
        "pinned_cpus": pinned, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "optax": optax.__version__, "lr_per_step": lrs, "dtype": "float32",
    }
    results["jax"] = summary(warm, times, losses, n_resp, n_tok, args.warmup, peak_rss_mb(), rss0, trainable_jax)
    results["jax"]["compile_s"] = (warm[0] - statistics.median(times)) if warm else None
    del state, step_fn, _step, _jit, dev_batches, params, init
    model = model.__class__(cfg, None, model.tokenizer, model.name)  # keep the tokenizer, drop the weights
    jax.clear_caches()
    gc.collect()

    # --- HF transformers + peft on torch ---------------------------------------------------------------
    if not args.no_hf:
        import peft
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        name = str(args.model)
        if Path(name).is_dir():
            hf_dir = Path(name)
        elif name.endswith(".gguf"):
            hf_dir = registry.converted_dir(Path(name))
        else:
            hf_dir = registry.converted_dir(registry.resolve(name))
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        lcfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                               target_modules=[HF_TARGETS[t] for t in ALL_TARGETS], task_type="CAUSAL_LM")
        pm = peft.get_peft_model(hf, lcfg)
        base = pm.get_base_model()
        with torch.no_grad():  # jaxpersona's initial A (kaiming-uniform like peft's), so both start identical
            for t in ALL_TARGETS:
                for li, layer in enumerate(base.model.layers):
                    mod = getattr(getattr(layer, HF_MODULE[t]), HF_TARGETS[t])
                    mod.lora_A["default"].weight.copy_(torch.from_numpy(a0[t][li].T.copy()))
                    if mod.scaling["default"] != float(scale):
                        sys.exit(f"peft scaling {mod.scaling['default']} != jaxpersona scale {float(scale)}")
        pm.train()
        trainable = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=tcfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=tcfg.weight_decay)
        t_batches = []
        for b in batches:
            ids = torch.from_numpy(b["tokens"].astype(np.int64))
            labels = ids.clone()
            labels[~torch.from_numpy(b["resp"])] = -100
            t_batches.append((ids, torch.ones_like(ids), labels))

        def torch_step(i):
            for g in opt.param_groups:
                g["lr"] = lrs[i]  # jaxpersona's schedule (linear warm-up then decay)
            ids, mask, labels = t_batches[i % n_batches]
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        gc.collect()
        reset_peak_rss()
        rss0 = rss_mb()
        warm, times, losses = run_steps(torch_step, args.warmup, args.steps)
        results["hf"] = summary(warm, times, losses, n_resp, n_tok, args.warmup, peak_rss_mb(), rss0,
                                sum(p.numel() for p in trainable))
        results["hf"]["compile_s"] = None
        results["hf"].update({"torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft.__version__, "attn_implementation": hf.config._attn_implementation,
                              "torch_threads": torch.get_num_threads()})
        results["ratio"] = {"throughput_jax_over_hf": results["hf"]["median_s"] / results["jax"]["median_s"]}

    # --- report ------------------------------------------------------------------------------------------
    j, h = results["jax"], results.get("hf")
    print(f"\n{args.model}  float32  LoRA r{args.rank} alpha {args.alpha:g}, targets {' '.join(ALL_TARGETS)}; "
          f"batch {args.batch} x {args.seq} tokens ({statistics.mean(n_resp):.0f} response tokens/step); "
          f"{args.warmup} warm-up + {args.steps} timed steps; {threads} threads on {results['backend']} "
          f"({os.cpu_count()} cpus)\n")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print("| framework | median s/step | min s | max s | response tok/s | total tok/s | first step s | peak RSS MB | first loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    sides = [("jaxpersona (JAX)", j)] + ([("HF transformers + peft (torch)", h)] if h else [])
    for name, r in sides:
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['resp_tokens_per_s']:.1f} "
              f"| {r['tokens_per_s']:.1f} | {fmt(r['warmup_s'][0] if r['warmup_s'] else None, '.2f')} "
              f"| {fmt(r['peak_rss_mb'], '.0f')} | {r['losses'][0]:.5f} |")
    if h:
        ratio = results["ratio"]["throughput_jax_over_hf"]
        print(f"| ratio JAX/torch (throughput) | {ratio:.2f}x | | | {ratio:.2f}x | {ratio:.2f}x | | | |")
        d0 = abs(j["losses"][0] - h["losses"][0])
        dmax = max(abs(a - b) for a, b in zip(j["losses"], h["losses"]))
        results["loss_diff"] = {"first": d0, "max_over_steps": dmax}
        print(f"\nlosses per step  jax: {' '.join(f'{x:.4f}' for x in j['losses'])}")
        print(f"                 hf : {' '.join(f'{x:.4f}' for x in h['losses'])}")
        print(f"first-step loss |diff| {d0:.2e} (both: base model, B = 0; mean NLL over all response tokens of the "
              f"batch), max over steps {dmax:.2e}")
        if d0 > 1e-2:
            print("WARNING: first-step losses differ by > 1e-2: the two sides do not compute the same loss "
                  "(weights, tokenization, positions or masking differ)")
        if j["trainable_params"] != h["trainable_params"]:
            print(f"WARNING: trainable parameters differ: jax {j['trainable_params']}, peft {h['trainable_params']}")
        else:
            print(f"trainable parameters: {j['trainable_params']} on both sides")
    print(f"jaxpersona first step (compile + run) {j['warmup_s'][0] if j['warmup_s'] else float('nan'):.1f}s, "
          f"base weights passed as an argument; peak RSS = process high-water mark during each side's steps "
          "(warm-up included)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
