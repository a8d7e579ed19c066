#!/usr/bin/env python
"""One section of the accelerator check (``scripts/accelerator_check.sh`` runs them all, each time-boxed in its
own process) — appends ONE JSON line per run to ``--out``: ``{"section": ..., <numbers>}``, or
``{"section": ..., "skipped": <why>}`` where the device cannot run it, or ``{"section": ..., "error": ...}``.

Sections:

* ``pytest_gpu`` — ``pytest -m gpu`` (tests/test_gpu.py): passed / failed / skipped counts;
* ``bf16_parity`` — small random Llama and Qwen2 models (transformers configs, random weights made on the
  device, saved and loaded by our loader): our bf16 logits vs HF torch's bf16 logits on the same device:
  max abs diff, its ratio to the largest logit, top-1 agreement;
* ``mfu_mbu`` — Qwen2.5-7B shapes in bf16, random weights made on the device with ``jax.random``: prefill MFU
  (model FLOPs / s over the device's peak) and decode MBU (weights + KV cache bytes read per step / s over the
  device's HBM bandwidth);
* ``big_prefill`` (``--model``) — on a device with >= 141 GB, Qwen3-32B or Gemma-2-27B shapes in bf16: one
  prefill; the allocator's peak (``memory_stats()['peak_bytes_in_use']``) vs the compiled program's plan
  (argument + output + temp - alias bytes of ``memory_analysis()``);
* ``sweep_vs_hf`` — a steering sweep (ours, batched) vs an HF + torch forward-hook loop on the same device and
  weights (a random SmolLM2-135M-shaped model): seconds, ratio, max |logprob diff|;
* ``serve`` — ``scripts/bench_serve.py --quick --no-hf --sections plain`` on a random model of SmolLM2-135M's
  shape (served over loopback HTTP): tokens/s, latency and TTFT p50.

``--tiny``: small configs that run on a CPU in seconds (every section's code path); without an accelerator and
without ``--tiny``, the sections record ``"skipped": "no accelerator"``. ``--summary FILE``: print the table.
No network is needed: every model is random, with a word-level tokenizer made here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("pytest_gpu", "bf16_parity", "mfu_mbu", "big_prefill", "plan_vs_peak", "sweep_vs_hf", "serve")
BIG_MODELS = ("qwen3-32b", "gemma-2-27b-it")
NO_ACCELERATOR = "no accelerator"
# bf16 dense peak FLOP/s and HBM bandwidth (bytes/s), from the device kind jax reports
PEAKS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
         ("A100", 312e12, 2.039e12))
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")
WORDS = ("the a cat dog sat on mat hello world what is capital of france paris you are helpful assistant tell me "
         "about your day how should i treat my coworkers write haiku rain best way to learn language").split()


# --- the device -------------------------------------------------------------------------------------------
def accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


def peaks(kind: str) -> tuple[float | None, float | None]:
    """(bf16 FLOP/s, HBM bytes/s) of a device kind; env ACCEL_PEAK_TFLOPS / ACCEL_PEAK_TBPS override."""
    flops = bw = None
    for name, f, b in PEAKS:
        if name.lower() in kind.lower():
            flops, bw = f, b
            break
    if os.environ.get("ACCEL_PEAK_TFLOPS"):
        flops = float(os.environ["ACCEL_PEAK_TFLOPS"]) * 1e12
    if os.environ.get("ACCEL_PEAK_TBPS"):
        bw = float(os.environ["ACCEL_PEAK_TBPS"]) * 1e12
    return flops, bw


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count()}


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median warm seconds); ``fn`` blocks until its result is ready."""
    from bench_forward import timed  # scripts/bench_forward.py

    first, times = timed(fn, repeats)
    return first, statistics.median(times)


# --- random models (no download) --------------------------------------------------------------------------
def word_tokenizer(n_words: int):
    """A word-level HF fast tokenizer of ``n_words`` ids (specials, WORDS, filler words) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in [*WORDS, "?", ".", ",", "!", "<", ">", "user", "system", "assistant"]:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < n_words:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return fast


def hf_config(family: str, dims: dict, init_range: float):
    import transformers

    d = {"vocab_size": dims["vocab"], "hidden_size": dims["d"], "intermediate_size": dims["ff"],
         "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
         "num_key_value_heads": dims["kv"], "max_position_embeddings": 2048, "initializer_range": init_range,
         "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
         "tie_word_embeddings": family == "qwen2"}
    if "head_dim" in dims:
        d["head_dim"] = dims["head_dim"]
    if family == "qwen2":
        d["use_sliding_window"] = False
    return transformers.AutoConfig.for_model(family, **d)


def random_hf_model(family: str, dims: dict, device: str, dtype: str, init_range: float = 0.02, seed: int = 0):
    """A random HF causal LM created on ``device`` (weights made there), in ``dtype``, eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(family, dims, init_range))
    return hf.to(getattr(torch, dtype)).eval()


def save_model_dir(hf, out: Path, tokenizer_words: int) -> Path:
    hf.save_pretrained(out)
    word_tokenizer(tokenizer_words).save_pretrained(out)
    return out


def torch_device() -> str | None:
    """The torch device on the accelerator jax uses, or "cpu" without one; None: torch cannot reach it."""
    import torch

    if not accelerator():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


# --- sections ---------------------------------------------------------------------------------------------
def section_pytest_gpu(args) -> dict:
    if not accelerator():
        return {"skipped": NO_ACCELERATOR}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={xml}", str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT, capture_output=True,
                           text=True, timeout=args.budget)
        import xml.etree.ElementTree as ET

        out = {"returncode": r.returncode, "seconds": time.perf_counter() - t0, "tail": r.stdout[-1500:]}
        if xml.exists():
            suites = ET.parse(xml).getroot()
            suite = suites if suites.tag == "testsuite" else suites[0]
            n = int(suite.get("tests", 0))
            bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            out.update({"tests": n, "passed": n - bad - skipped, "failed": bad, "skipped_tests": skipped,
                        "failing": [f"{c.get('name')}" for c in suite.iter("testcase")
                                    if c.find("failure") is not None or c.find("error") is not None]})
        return out


def section_bf16_parity(args) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from jaxpersona.model.loaders.hf import load_hf_dir
    from jaxpersona.model.transformer import forward

    if not accelerator() and not args.tiny:
        return {"skipped": NO_ACCELERATOR}
    dev = torch_device()
    if dev is None:
        return {"skipped": "torch cannot reach this accelerator (no CUDA)"}
    dims = ({"vocab": 512, "d": 64, "ff": 128, "layers": 2, "heads": 4, "kv": 2} if args.tiny else
            {"vocab": 32768, "d": 1024, "ff": 2816, "layers": 8, "heads": 16, "kv": 8})
    batch, seq = (2, 16) if args.tiny else (4, 512)
    out: dict = {"dims": dims, "batch": batch, "seq": seq, "models": {}}
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, dims["vocab"], (batch, seq)).astype(np.int32)
    for family in ("llama", "qwen2"):
        hf = random_hf_model(family, dims, dev, "bfloat16", init_range=0.05)
        with tempfile.TemporaryDirectory() as tmp:
            save_model_dir(hf, Path(tmp), dims["vocab"])
            cfg, params = load_hf_dir(tmp, jnp.bfloat16)
        ours = np.asarray(jax.jit(lambda p, t: forward(p, cfg, t).logits)(params, jnp.asarray(tokens)), np.float32)
        with torch.inference_mode():
            theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long, device=dev)).logits.float().cpu().numpy()
        diff = np.abs(ours - theirs)
        out["models"][family] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                                 "max_abs_logit": float(np.abs(theirs).max()),
                                 "rel_max_diff": float(diff.max() / max(np.abs(theirs).max(), 1e-9)),
                                 "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}
        del hf
    out["max_abs_diff"] = max(m["max_abs_diff"] for m in out["models"].values())
    out["top1_agreement"] = min(m["top1_agreement"] for m in out["models"].values())
    return out


def model_config(name: str, tiny: bool):
    from jaxpersona.compute.plan import read_config
    from jaxpersona.model.config import from_hf_config

    if not tiny:
        return read_config(name)[1]
    family = "gemma2" if "gemma" in name else ("qwen3" if "qwen3" in name else "qwen2")
    hf = {"model_type": family, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "tie_word_embeddings": family != "qwen2"}
    if family == "gemma2":
        hf.update({"query_pre_attn_scalar": 16, "sliding_window": 32, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "layer_types": ["sliding_attention", "full_attention"]})
    return from_hf_config(hf)


def random_params(cfg, seed: int = 0):
    """bf16 params made on the device by one jitted program (no fp32 copy of the whole model)."""
    import jax
    import jax.numpy as jnp

    from jaxpersona.model.params import init_params

    params = jax.jit(lambda k: init_params(cfg, k, jnp.bfloat16))(jax.random.key(seed))
    jax.block_until_ready(params)
    return params


def tree_bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def matmul_params(cfg) -> int:
    """Weights in the per-token matmuls of the blocks (attention projections + MLP), all layers."""
    d, f, h, kv, hd = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return cfg.n_layers * (d * (h * hd + 2 * kv * hd) + h * hd * d + 3 * d * f)


def prefill_flops(cfg, batch: int, seq: int, head_tokens: int) -> float:
    """2 x matmul params x tokens + causal attention (QK^T and PV over the positions before each token:
    2 x 2 x heads x head_dim x seq^2 / 2 per layer and row) + the LM head over ``head_tokens`` tokens."""
    attn = 2.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * seq * batch
    return 2.0 * matmul_params(cfg) * batch * seq + attn + 2.0 * cfg.d_model * cfg.vocab_size * head_tokens


def section_mfu_mbu(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxpersona.model.transformer import KVCache, forward

    if not accelerator() and not args.tiny:
        return {"skipped": NO_ACCELERATOR}
    name = "qwen2.5-7b-instruct"
    cfg = model_config(name, args.tiny)
    pb, ps = (2, 64) if args.tiny else (4, 2048)
    db, dctx = (2, 64) if args.tiny else (16, 2048)
    reps = 3 if args.tiny else 5
    params = random_params(cfg)
    out: dict = {"model": name + (" (tiny shapes)" if args.tiny else ""), "dtype": "bfloat16",
                 "param_bytes": tree_bytes(params)}
    tokens = jax.random.randint(jax.random.key(1), (pb, ps), 4, cfg.vocab_size)
    prefill = jax.jit(lambda p, t: forward(p, cfg, t, logits="last").logits)
    first, warm = median_time(lambda: jax.block_until_ready(prefill(params, tokens)), reps)
    flops = prefill_flops(cfg, pb, ps, pb)
    out["prefill"] = {"batch": pb, "seq": ps, "compile_and_first_s": first, "seconds": warm, "flops": flops,
                      "tflops_per_s": flops / warm / 1e12, "tokens_per_s": pb * ps / warm}

    cache = KVCache.empty(cfg, db, dctx, jnp.bfloat16)
    cache = KVCache(cache.k, cache.v, jnp.arange(dctx)[None, :].repeat(db, 0) < dctx - 1)  # full but the last slot
    tok = jax.random.randint(jax.random.key(2), (db, 1), 4, cfg.vocab_size)

    def step_fn(p, c, t):
        o = forward(p, cfg, t, cache=c, cache_index=dctx - 1, logits="last")
        return o.logits, KVCache(o.cache.k, o.cache.v, c.valid)

    step = jax.jit(step_fn, donate_argnums=(1,))
    state = {"cache": cache}

    def one_step():
        logits, state["cache"] = step(params, state["cache"], tok)
        jax.block_until_ready(logits)

    first, warm = median_time(one_step, reps * 4)
    weight_bytes = out["param_bytes"]
    if "lm_head" in params:  # untied: the embedding table is gathered (db rows), not read whole
        weight_bytes -= params["embed"].size * params["embed"].dtype.itemsize
        weight_bytes += db * cfg.d_model * params["embed"].dtype.itemsize
    kv_bytes = tree_bytes((cache.k, cache.v))
    moved = weight_bytes + kv_bytes
    out["decode"] = {"batch": db, "context": dctx, "compile_and_first_s": first, "seconds_per_step": warm,
                     "bytes_per_step": moved, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
                     "tb_per_s": moved / warm / 1e12, "tokens_per_s": db / warm}
    flops_peak, bw_peak = peaks(jax.devices()[0].device_kind)
    out["peak_tflops"] = None if flops_peak is None else flops_peak / 1e12
    out["peak_tb_per_s"] = None if bw_peak is None else bw_peak / 1e12
    out["mfu"] = None if flops_peak is None else flops / out["prefill"]["seconds"] / flops_peak
    out["mbu"] = None if bw_peak is None else moved / warm / bw_peak
    if flops_peak is None:
        out["peak_note"] = f"no peak known for {jax.devices()[0].device_kind!r}: MFU / MBU not computed"
    return out


def section_big_prefill(args) -> dict:
    import jax

    from jaxpersona.model.transformer import forward

    name = args.model or BIG_MODELS[0]
    out: dict = {"model": name}
    if not accelerator() and not args.tiny:
        return {**out, "skipped": NO_ACCELERATOR}
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not args.tiny and (limit is None or limit < 120e9):  # a 141 GB H200 gives ~136e9 at 95 % (the .sh's)
        return {**out, "skipped": f"needs a >= 141 GB device (memory limit {limit} bytes)"}
    cfg = model_config(name, args.tiny)
    batch, seq = (1, 64) if args.tiny else (1, 2048)
    t0 = time.perf_counter()
    params = random_params(cfg)
    out["init_s"] = time.perf_counter() - t0
    out["param_bytes"] = tree_bytes(params)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 4, cfg.vocab_size)
    f = jax.jit(lambda p, t: forward(p, cfg, t, logits="last").logits)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, tokens))
    t0 = time.perf_counter()
    compiled = f.lower(*abstract).compile()
    out["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    planned = None
    if ma is not None:
        planned = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                      - ma.alias_size_in_bytes)
        out["plan"] = {"argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
                       "temp_bytes": int(ma.temp_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes)}
    out["planned_bytes"] = planned
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens))
    out["prefill_s"] = time.perf_counter() - t0
    out.update({"batch": batch, "seq": seq})
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    out["peak_bytes_in_use"] = peak
    if peak is None:
        out["peak_note"] = "the device reports no memory stats (CPU): planned bytes only"
    elif planned:
        out["peak_over_planned"] = peak / planned
    return out


SMOLLM2_135M = {"vocab": 49152, "d": 576, "ff": 1536, "layers": 30, "heads": 9, "kv": 3}


def section_sweep_vs_hf(args) -> dict:
    from jaxpersona.compute.handle import load
    from jaxpersona.compute.scoring import ScoringSet, encode_scoring
    from jaxpersona.compute.sweep import Grid, run_sweep

    dev = torch_device()
    if not accelerator() and not args.tiny:
        return {"skipped": NO_ACCELERATOR}
    if dev is None:
        return {"skipped": "torch cannot reach this accelerator (no CUDA)"}
    dims = {"vocab": 512, "d": 64, "ff": 128, "layers": 4, "heads": 4, "kv": 2} if args.tiny else SMOLLM2_135M
    dtype = "float32" if dev == "cpu" else "bfloat16"
    layers, coeffs = ((1, 3), (0.0, 2.0, -2.0)) if args.tiny else (tuple(range(2, 22, 2)), (0.0, 2.0, 4.0, -2.0, -4.0))
    n_prompts = 3 if args.tiny else 8
    rng = np.random.default_rng(0)
    prompts = tuple(" ".join(rng.choice(WORDS, 8)) + " ?" for _ in range(n_prompts))
    responses = tuple(" ".join(rng.choice(WORDS, 6 if args.tiny else 48)) + " ." for _ in range(n_prompts))
    hf = random_hf_model("llama", dims, dev, dtype, init_range=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(hf, Path(tmp), 512)
        model = load(tmp, dtype)
    vec = rng.normal(size=model.cfg.d_model).astype(np.float32)
    vec *= 0.5 / np.linalg.norm(vec) * np.sqrt(model.cfg.d_model)  # about the size of a residual (norm ~ sqrt(D))
    grid = Grid("steer", vec[None], ("v",), layers, coeffs)
    data = ScoringSet(prompts, responses)
    enc = encode_scoring(model, data)
    t0 = time.perf_counter()
    run_sweep(model, Grid("steer", vec[None], ("v",), layers[:1], coeffs), data, progress=False)  # compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = run_sweep(model, grid, data, progress=False)
    ours_s = time.perf_counter() - t0
    points = grid.points()
    ours = np.asarray([[r["logprob"] for r in sorted((r for r in rows if r["layer"] == p["layer"]
                                                       and r["coeff"] == p["coeff"]), key=lambda r: r["prompt"])]
                       for p in points])
    from bench_sweep import hf_loop  # scripts/bench_sweep.py's peer loop, here on the device

    hf_loop(hf, enc, vec, points[:1], device=dev)  # warm-up
    theirs, hf_s = hf_loop(hf, enc, vec, points, device=dev)
    return {"dims": dims, "dtype": dtype, "grid_points": len(points), "prompts": n_prompts,
            "seq_len": int(enc["tokens"].shape[1]), "jaxpersona_s": ours_s, "jaxpersona_compile_s": compile_s,
            "hf_hooks_s": hf_s, "ratio": hf_s / ours_s, "points_per_s": len(points) / ours_s,
            "max_abs_logprob_diff": float(np.abs(ours - theirs).max())}


def section_serve(args) -> dict:
    if not accelerator() and not args.tiny:
        return {"skipped": NO_ACCELERATOR}
    dev = torch_device() or "cpu"
    dims = {"vocab": 512, "d": 64, "ff": 128, "layers": 17, "heads": 4, "kv": 2} if args.tiny else SMOLLM2_135M
    dtype = "float32" if not accelerator() else "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_model_dir(random_hf_model("llama", dims, "cpu" if dev != "cuda" else dev, dtype),
                                   tmp / "model", 512)
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--model", str(model_dir), "--dtype", dtype,
               "--quick", "--no-hf", "--sections", "plain", "--out", str(tmp / "serve.json")]
        if args.tiny:
            cmd += ["--clients", "2", "--rounds", "1", "--max-tokens", "4", "--batch", "2", "--max-context", "128"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.budget)
        if r.returncode != 0:
            return {"error": f"bench_serve.py exited {r.returncode}: {r.stderr[-2000:]}"}
        res = json.loads((tmp / "serve.json").read_text())
    none = res.get("none", {})
    keep = ("tokens_per_s", "latency_p50_s", "ttft_p50_s")
    return {"dims": dims, "dtype": dtype, "command": " ".join(cmd[1:]).replace(str(tmp), "TMP"),
            "seconds": time.perf_counter() - t0, "compile_s": res.get("compile_s"),
            **{k: none.get(k) for k in keep}, "clients": res["config"]["clients"],
            "max_tokens": res["config"]["max_tokens"], "batch": res["config"]["batch"]}


PLAN_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048,
               "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4,
               "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
               "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False}


def section_plan_vs_peak(args) -> dict:
    """One stage's program as `jaxpersona plan --stage` compiles it (jaxpersona.compute.aot, from abstract inputs),
    then run on random inputs made on the device: planned (compiled arguments + outputs + temporaries - aliased)
    vs `memory_stats()['peak_bytes_in_use']` of this fresh process (one stage per process: the peak only grows)."""
    import jax

    from jaxpersona.compute import aot
    from jaxpersona.model import sharding

    stage = args.stage or "prefill"
    out: dict = {"stage": stage}
    if not accelerator() and not args.tiny:
        return {**out, "skipped": NO_ACCELERATOR}
    cfg_path = Path(tempfile.mkdtemp(prefix="plan-vs-peak-")) / "config.json"
    hf = dict(PLAN_CONFIG)
    if args.tiny:
        hf.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    cfg_path.write_text(json.dumps(hf))
    _, cfg = aot.read_config(str(cfg_path))
    cfg, _ = sharding.layout_for_mesh(cfg, (1, 1))
    sizes = {"prefill": aot.Sizes(batch=8, seq=1024), "sweep": aot.Sizes(batch=8, seq=256, grid=8, targets=64),
             "train": aot.Sizes(batch=8, seq=512, targets=128, rank=16),
             "decode": aot.Sizes(batch=64, seq=1, context=2048, targets=1)}[stage]
    if args.tiny:
        sizes = aot.Sizes(batch=2, seq=32, context=64 if stage == "decode" else 0, grid=2, targets=8, rank=4)
    mesh, backend = aot.target_mesh(aot.accelerator("h100"), 1, 1)  # this machine's GPU, or a CPU estimate
    prog = aot.build_program(stage, cfg, mesh, sizes, jax.numpy.bfloat16, False)
    t0 = time.perf_counter()
    compiled = prog.fn.lower(*prog.args).compile()
    out["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    planned = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
    out.update(backend=backend, planned_bytes=planned, sizes={k: v for k, v in vars(sizes).items()})
    inputs = aot.materialise(prog.args, jax.random.key(0))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    out["run_s"] = time.perf_counter() - t0
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    out["peak_bytes_in_use"] = peak
    if peak is None:
        out["peak_note"] = "the device reports no memory stats (CPU): planned bytes only"
    else:
        out["peak_over_planned"] = peak / planned
    return out


RUNNERS = {"pytest_gpu": section_pytest_gpu, "bf16_parity": section_bf16_parity, "mfu_mbu": section_mfu_mbu,
           "big_prefill": section_big_prefill, "plan_vs_peak": section_plan_vs_peak, "sweep_vs_hf": section_sweep_vs_hf,
           "serve": section_serve}


# --- the record and the summary -----------------------------------------------------------------------------
def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()


def run_section(args) -> int:
    rec: dict = {"section": args.section, "tiny": args.tiny, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    t0 = time.perf_counter()
    try:
        rec["device"] = device_info()
        rec.update(RUNNERS[args.section](args))
    except Exception as e:  # recorded, so the other sections still run
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        rec["traceback"] = traceback.format_exc()[-3000:]
    rec["wall_s"] = time.perf_counter() - t0
    append(Path(args.out), rec)
    print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}, default=float)[:1500], flush=True)
    return 1 if "error" in rec else 0


def fmt(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def line_of(r: dict) -> str:
    s = r.get("section", "?")
    if "skipped" in r:
        return f"{s:12s} skipped: {r['skipped']}"
    if "error" in r:
        return f"{s:12s} ERROR: {r['error'].splitlines()[0][:200]}"
    if s == "pytest_gpu":
        return f"{s:12s} {r.get('passed')} passed, {r.get('failed')} failed, {r.get('skipped_tests')} skipped"
    if s == "bf16_parity":
        return (f"{s:12s} max |logit diff| {fmt(r['max_abs_diff'])}, top-1 agreement "
                f"{fmt(r['top1_agreement'], '.1%')} (" + ", ".join(
                    f"{k}: {fmt(m['max_abs_diff'])} / {fmt(m['top1_agreement'], '.1%')}" for k, m in r["models"].items())
                + ")")
    if s == "mfu_mbu":
        p, d = r["prefill"], r["decode"]
        return (f"{s:12s} {r['model']}: prefill {fmt(p['tflops_per_s'])} TFLOP/s, MFU {fmt(r['mfu'], '.1%')}; "
                f"decode {fmt(d['seconds_per_step'] * 1e3)} ms/step, {fmt(d['tb_per_s'])} TB/s, "
                f"MBU {fmt(r['mbu'], '.1%')}")
    if s == "big_prefill":
        return (f"{s:12s} {r['model']}: prefill {fmt(r['prefill_s'])} s, peak {fmt(r['peak_bytes_in_use'])} B vs "
                f"planned {fmt(r['planned_bytes'])} B (ratio {fmt(r.get('peak_over_planned'))})")
    if s == "plan_vs_peak":
        return (f"{s:12s} {r['stage']}: peak {fmt(r['peak_bytes_in_use'])} B vs planned {fmt(r['planned_bytes'])} B "
                f"(ratio {fmt(r.get('peak_over_planned'))}; {r['backend']})")
    if s == "sweep_vs_hf":
        return (f"{s:12s} {r['grid_points']} points: ours {fmt(r['jaxpersona_s'])} s, HF hooks {fmt(r['hf_hooks_s'])} s "
                f"-> {fmt(r['ratio'])}x; max |logprob diff| {fmt(r['max_abs_logprob_diff'])}")
    if s == "serve":
        return (f"{s:12s} {fmt(r['tokens_per_s'])} tokens/s, latency p50 {fmt(r['latency_p50_s'])} s, "
                f"TTFT p50 {fmt(r['ttft_p50_s'])} s ({r['clients']} clients, batch {r['batch']})")
    return f"{s:12s} {json.dumps(r)[:200]}"


def summary(path: Path) -> int:
    recs = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()] if Path(path).exists() else []
    dev = next((r["device"] for r in recs if "device" in r), {})
    print(f"\naccelerator check: {path} ({len(recs)} records; {dev.get('device_kind', '?')} x "
          f"{dev.get('device_count', '?')}, {platform.node()})")
    for r in recs:
        print("  " + line_of(r))
    missing = [s for s in SECTIONS if s not in {r.get("section") for r in recs}]
    if missing:
        print(f"  missing: {', '.join(missing)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=SECTIONS)
    ap.add_argument("--model", default=None, help=f"big_prefill: one of {', '.join(BIG_MODELS)}")
    ap.add_argument("--stage", default=None, choices=("prefill", "sweep", "train", "decode"), help="plan_vs_peak")
    ap.add_argument("--tiny", action="store_true", help="small configs (a CPU runs every section in seconds)")
    ap.add_argument("--out", default="bench_results/accelerator_check.jsonl")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for a section's own subprocess")
    ap.add_argument("--summary", metavar="JSONL", help="print the summary of a results file and exit")
    args = ap.parse_args()
    if args.summary:
        return summary(Path(args.summary))
    if not args.section:
        ap.error("give --section or --summary")
    return run_section(args)


if __name__ == "__main__":
    sys.exit(main())
