#!/usr/bin/env python
"""Serving benchmarks for ``jaxpersona serve`` (issue 24), each section against its own baseline, one run.

Sections (``--sections``, comma list; default all):

* **plain / mixed** — ``clients`` concurrent streaming clients over real HTTP (loopback, each client keeps one
  HTTP/1.1 connection open), each sending ``rounds`` chat requests of exactly ``max_tokens`` new tokens
  (``ignore_eos``; greedy), so every load does the same work; tokens counted from ``usage``. Two loads on the
  server: *none* (no interventions) and *mixed* (4 distinct interventions round-robin over clients: steer (a
  contrast vector, 0.3 x residual norm, resid[16]), cap (ceiling on resid[10] and [16]), ablate (resid[4, 8,
  12]), steer at resid[8] with another vector — all at every position, one batch). The peer, HF transformers
  + torch on the same weights: ``generate`` on the same prompts, left-padded; with no interventions the whole
  round is one batched ``generate``; with interventions a forward hook holds one configuration, so each
  intervention's requests are one batched ``generate`` after another (the best a hook-based tool can do;
  persona_vectors / repeng / steering-vectors run one configuration at a time).
* **keepalive** — the plain load with each client reusing one HTTP/1.1 connection vs a new connection per
  request (``Connection: close``, what ``urllib`` does): tokens/s and latency p50 both ways.
* **chunked** — chunked prefill and the streams already running: 8 streaming clients (prompts of ~37
  tokens, ``stream_tokens`` new tokens each, a chunk per token) and, once all 8 stream, one request whose
  prompt is >= 8x theirs (>= 320 tokens, repeated text). The 8 streams' p95 inter-token gap while the long
  prompt is prefilled (from its arrival to its first token) over their p95 gap with no long request. Run on
  its own server (``max_context`` = 2 x the long prompt rounded up to a block; no prefix cache, so the long
  prompt is prefilled every repeat) with ``prefill_chunk`` blocks, and — before/after — with
  ``prefill_chunk = max_context / 2`` (the largest EngineConfig allows, ``max_context >= 2 x prefill_chunk``):
  the whole long prompt in one block, i.e. no chunking.
* **decode** — the jitted decode step at engine level (no HTTP): an Engine of ``decode_batch`` rows x
  ``decode_context`` slots; ``decode_step`` with ``Blocked(attn_block, span)`` at span = 1/8 of the context
  vs the full context (each warmed first; median of ``decode_reps``): the cost of a step over the slots in
  use.
* **prefix** — a persona-study load: one system prompt (a persona plus a few-shot block, ~260 tokens) and
  many different short questions, ``prefix_clients`` concurrent streaming clients, greedy, ``prefix_tokens``
  new tokens. On a server with ``prefix_cache_mb = 0`` and one with the cache: the fraction of the shared
  prompt tokens served from the cache (``engine.stats`` deltas: hits / (requests x shared-prefix tokens);
  the cache starts cold, each repeat uses another persona so every request is new) and TTFT p50/p95 with vs
  without. Also the hit fraction for a short persona system prompt (~37 shared tokens): the cache's block is
  ``prefill_chunk`` tokens, and the block holding a prompt's last token is always computed.
* **adapters** — a server with two random LoRA adapters (rank 16, every linear layer, peft format): the
  load round-robin over {base, adapter a, adapter b + steer, base + cap} vs the plain load on the same
  server. The peer: HF + peft, one configuration at a time (``disable_adapter`` / ``set_adapter`` + hooks),
  one batched ``generate`` per configuration per round.

Every server compiles its prefill / decode programs at every attention span before it starts, and each load
runs once, unmeasured, at full size first. Loads alternate within a section, each repeat starting with the
next one (drift of the machine hits all alike); medians over ``--repeats``, the min-max of throughput in
brackets. Targets (printed PASS/FAIL with the number): plain >= 1.0x HF's batched generate; mixed >= 2.5x HF
hooks; chunked-prefill p95 ITL ratio <= 2; decode step at 1/8 context <= 0.5x the full one; prefix-cache hit
fraction (long system prompt) >= 0.9. Writes everything as JSON (``--out``, with the printed summary). Feeds
the README's "Serve" throughput table and the serving numbers under it: take those from a full run on a quiet
machine; ``--quick`` (batch 8, 8 clients x 2 x 32 tokens, one repeat) checks that everything runs, and its
ratios to HF are not the full load's (short generations weigh prefill more; HF batches small groups well).

    python scripts/bench_serve.py                       # SmolLM2-135M, fp32, CPU; everything (~20 min on 2 cores)
    python scripts/bench_serve.py --quick               # fewer clients / tokens / repeats: ~4-5 min on 2 cores
    python scripts/bench_serve.py --sections chunked,decode,prefix --no-hf
    python scripts/bench_serve.py --no-hf --clients 64 --batch 64 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpersona.model import registry
from jaxpersona.compute.handle import load

SECTIONS = ("plain", "mixed", "keepalive", "chunked", "decode", "prefix", "adapters")
NAME = "bench"

PROMPTS = [
    "Tell me about your day.", "How should I treat my coworkers?", "Write a haiku about rain.",
    "What is the best way to learn a language?", "Describe a perfect weekend.", "Give me advice on saving money.",
    "What do you think about cats?", "Explain photosynthesis simply.", "How can I be more productive?",
    "What is your favourite book and why?", "Plan a trip to the mountains.", "How do I make friends as an adult?",
    "What should I cook tonight?", "Explain why the sky is blue.", "Give me a motivational quote.",
    "What makes a good leader?",
]

# --- the persona-study load (prefix section) -------------------------------------------------------------
PERSONAS = [
    ("Ava", ("a night-shift nurse in a busy city hospital with twenty years on the wards. You are warm, patient "
             "and practical; you notice how people feel before you notice what they say, and you never talk down "
             "to anyone. You speak plainly, you reach for concrete examples from the ward, and you admit it when "
             "you do not know something.")),
    ("Marcus", ("a retired investigative journalist who spent thirty years exposing corruption. You are sceptical, "
                "dry and blunt; you distrust easy answers, you ask who benefits, and you have little patience for "
                "jargon. You tell stories from old assignments when they make a point, and you never flatter the "
                "person you are talking to.")),
    ("Professor Lin", ("a historian of science who lectures on how ideas change. You are meticulous and curious; "
                       "you put every question in its historical context, you separate what is known from what is "
                       "guessed, and you enjoy a good counterexample. You are kind to students but exacting about "
                       "evidence, and you keep your answers organised.")),
]
SYSTEM = ("You are {name}, {desc}\n\nStay in character for the whole conversation. Answer the user's question in "
          "your own voice in two or three sentences. Do not mention that you are an AI, a language model or a "
          "character, and do not break the fourth wall. If a question is unclear, answer the most likely reading "
          "of it rather than asking for clarification. Keep the tone consistent with the examples below.")
FEW_SHOT = [
    ("What do you do when you feel overwhelmed?",
     "I stop, take one slow breath, and pick the single next thing I can actually do. The rest can wait a minute."),
    ("Is it ever right to lie?",
     ("Rarely, and never for my own comfort. If the truth would only hurt and help no one, I choose my words "
      "with care.")),
]
SHORT_SYSTEM = "You are {name}, {desc} Stay in character."
SHORT_DESCS = ["a warm night-shift nurse with twenty years on the wards; you answer kindly, plainly and briefly.",
               "a blunt retired journalist who distrusts easy answers; you answer drily, plainly and briefly.",
               "a careful historian of science who loves a counterexample; you answer precisely and briefly."]
QUESTIONS = [
    "How do you spend a quiet Sunday?", "Should children have phones?", "Tell me what courage means to you.",
    "Why do people procrastinate?", "Which habit changed your life most?", "Can money buy happiness?",
    "Describe your ideal neighbour.", "Would you rather be feared or loved?", "Explain trust to a child.",
    "Is social media good for democracy?", "Where do you find hope?", "Give one piece of advice to a new parent.",
    "Name a mistake you learned from.", "Are people basically good?", "Does ambition make people unkind?",
    "Recommend a way to apologise well.", "Summarise your philosophy of work.",
    "Pick a favourite season and defend it.",
    "Do rules matter more than results?", "Imagine a world without cars.", "Teach me how to listen better.",
    "Compare cats and dogs as companions.", "Argue for or against homework.", "Suppose you won the lottery: then what?",
    "Tell a short story about a lost key.", "Justify spending money on space travel.",
    "Predict how cities will change.",
    "Rank honesty, kindness and loyalty.", "Help me decide whether to move abroad.",
    "Critique the idea of a four-day week.",
    "List three signs of a good friend.", "Forgive, or forget?", "Remember your first job: what did it teach you?",
    "Weigh freedom against safety.", "Outline a perfect morning routine.", "Question: what is wisdom?",
    "Value tradition or progress?", "Invent a new holiday and explain it.", "Confess a small guilty pleasure.",
    "Discuss whether art must be beautiful.",
]
LONG_PARAGRAPH = ("Notes from the quarterly planning meeting: the team reviewed the delivery schedule, the budget for "
                  "the new warehouse, staffing for the winter season and the customer complaints about late "
                  "parcels. Everyone agreed the routing software needs replacing before December, and that the "
                  "night shift should get two more drivers. ")


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


def adapter_mix(mixed: list[list[dict]]) -> list[tuple[str, list[dict] | None]]:
    """The adapters section's 4 configurations (round-robin over clients): (model, interventions)."""
    return [(NAME, None), ("a", None), ("b", mixed[0]), (NAME, mixed[1])]


def make_adapters(model, root: Path) -> dict[str, Path]:
    """Two random LoRA adapters (rank 16 on every linear layer, nonzero ``b``) written as peft directories."""
    import jax

    from jaxpersona.artifacts.peft import save_peft_adapter
    from jaxpersona.model.lora import Adapter, LoraConfig, init_adapter

    lcfg = LoraConfig(rank=16, alpha=32.0)
    dirs = {}
    for name, seed in (("a", 1), ("b", 2)):
        ad = init_adapter(model.cfg, lcfg, jax.random.key(seed))
        keys = jax.random.split(jax.random.key(seed + 100), len(ad.b))
        b = {t: jax.random.normal(k, x.shape) * 0.02 for (t, x), k in zip(ad.b.items(), keys)}
        dirs[name] = save_peft_adapter(root / f"peft_{name}", Adapter(ad.a, b, ad.scale), model.cfg, lcfg)
    return dirs


# --- HTTP clients -------------------------------------------------------------------------------------------
class Client:
    """One client: an HTTP/1.1 connection kept open for all its requests (``keep_alive``), or a new connection
    per request that asks the server to close it (``Connection: close``, as ``urllib`` does)."""

    def __init__(self, url: str, keep_alive: bool = True) -> None:
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.base = u.hostname, u.port, u.path
        self.keep_alive = keep_alive
        self.conn: http.client.HTTPConnection | None = None
        self.connections = 0

    def stream(self, body: dict, times: list[float] | None = None) -> dict:
        """POST a streamed chat request; the time of every content chunk goes into ``times`` as it arrives.
        Returns ``t0`` (sent), ``end`` (stream done), ``times`` and ``usage``."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if not self.keep_alive:
            headers["Connection"] = "close"
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=3600)
            self.connections += 1
        times = [] if times is None else times
        usage = None
        t0 = time.perf_counter()
        self.conn.request("POST", self.base + "/chat/completions", body=data, headers=headers)
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        for line in resp:
            if line.startswith(b"data: {"):
                if b'"delta": {"content"' in line:
                    times.append(time.perf_counter())
                elif b'"usage": {' in line:
                    usage = json.loads(line[6:])["usage"]
        end = time.perf_counter()
        resp.close()
        if not self.keep_alive or resp.will_close:
            self.close()
        return {"t0": t0, "end": end, "times": times, "usage": usage}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def chat_body(messages: list[dict] | str, max_tokens: int, model: str = NAME, items: list[dict] | None = None,
              *, logprobs: bool = False) -> dict:
    """A streamed greedy chat request of exactly ``max_tokens`` new tokens (``ignore_eos``)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if items:
        body["interventions"] = items
    if logprobs:  # one chunk per token, even one whose text is held back
        body["logprobs"] = True
    return body


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run_load(url: str, clients: int, rounds: int, body_of: Callable[[int, int], dict], keep_alive: bool = True) -> dict:
    """Every client streams ``rounds`` requests one after another (``body_of(client, round)``); returns wall,
    tokens, tokens/s, latency and TTFT p50/p95, and the connections opened."""
    lat, ttft, tokens, conns, lock, errs = [], [], [0], [0], threading.Lock(), []

    def client(c: int) -> None:
        cl = Client(url, keep_alive)
        try:
            for r in range(rounds):
                out = cl.stream(body_of(c, r))
                with lock:
                    lat.append(out["end"] - out["t0"])
                    ttft.append((out["times"][0] if out["times"] else out["end"]) - out["t0"])
                    tokens[0] += out["usage"]["completion_tokens"]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errs.append(e)
        finally:
            cl.close()
            with lock:
                conns[0] += cl.connections

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errs:
        raise errs[0]
    return {"wall_s": wall, "completion_tokens": tokens[0], "tokens_per_s": tokens[0] / wall, "requests": len(lat),
            "connections": conns[0], "latency_p50_s": statistics.median(lat), "latency_p95_s": pct(lat, 95),
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": pct(ttft, 95)}


def median_run(runs: list[dict]) -> dict:
    """Per metric, the median over repeats; the spread of throughput as min / max; the runs themselves."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    if "tokens_per_s" in runs[0]:
        out["tokens_per_s_min"] = min(r["tokens_per_s"] for r in runs)
        out["tokens_per_s_max"] = max(r["tokens_per_s"] for r in runs)
    out["runs"] = runs
    return out


def with_engine_stats(srv, fn: Callable[[], dict]) -> dict:
    """Run ``fn`` (a load) and add the engine's decode-step time and rows per step over it."""
    s0 = dict(srv.engine.stats)
    r = fn()
    st = {k: srv.engine.stats[k] - s0[k] for k in s0}
    r["decode_step_ms"] = 1000 * st["step_seconds"] / max(st["steps"], 1)
    r["mean_rows_per_step"] = st["tokens"] / max(st["steps"], 1)
    # the load's wall time split: decode steps, prompt prefill, and the rest (host loop, HTTP, clients)
    r["decode_s"], r["prefill_s"] = st["step_seconds"], st["prefill_seconds"]
    r["other_s"] = r["wall_s"] - st["step_seconds"] - st["prefill_seconds"]
    r["prefix_hits"], r["prefix_queries"] = st["prefix_hits"], st["prefix_queries"]
    return r


def start_server(model, res, ecfg):
    """A server with every prefill / decode span compiled before the engine starts (decode at every span only
    compiles on an engine not yet running), then serving."""
    from jaxpersona.serve.app import PersonaServer

    srv = PersonaServer(model, res, ecfg)
    try:
        srv.warmup()
        srv.start()
    except BaseException:
        srv.close()
        raise
    return srv


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def rotated(items: list, i: int) -> list:
    """``items`` starting at ``i`` (mod len): repeat ``i`` runs the loads in this order, so no load always goes
    first (the first load after a pause or a compile tends to run slower)."""
    k = i % len(items)
    return items[k:] + items[:k]


# --- sections -----------------------------------------------------------------------------------------------
def section_loads(model, args, res, mixed, want: set[str], results: dict) -> None:
    """plain / mixed / keepalive on one server (keep-alive clients unless said otherwise), loads alternated."""
    from jaxpersona.serve.engine import EngineConfig

    ecfg = EngineConfig(batch=args.batch, max_context=args.max_context, prefill_rows=args.prefill_rows,
                        prefill_chunk=args.prefill_chunk, attn_block=args.attn_block,
                        prefix_cache_mb=args.prefix_cache_mb)
    loads = []  # (label, interventions, keep_alive)
    if want & {"plain", "keepalive"}:
        loads.append(("none", None, True))
    if "mixed" in want:
        loads.append(("mixed", mixed, True))
    if "keepalive" in want:
        loads.append(("none_new_connection", None, False))

    def body_of(items):
        return lambda c, r: chat_body(PROMPTS[(c + r) % len(PROMPTS)], args.max_tokens, NAME,
                                      items[c % len(items)] if items else None)

    t0 = time.perf_counter()
    srv = start_server(model, res, ecfg)
    try:
        for _, items, keep in loads:  # compile what warmup does not (hooked steps at every span the load
            run_load(srv.url, args.clients, 1, body_of(items), keep)  # reaches); the first full-size load runs slow
        results["compile_s"] = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in loads}
        for i in range(args.repeats):  # alternate the loads so drift of the machine hits both alike
            for label, items, keep in rotated(loads, i):
                runs[label].append(with_engine_stats(srv, lambda items=items, keep=keep: run_load(
                    srv.url, args.clients, args.rounds, body_of(items), keep)))
        results.update({label: median_run(rs) for label, rs in runs.items()})
    finally:
        srv.close()
    if "none" in results and "mixed" in results:
        results["mixed_vs_none"] = {k: results["mixed"][k] / results["none"][k]
                                    for k in ("tokens_per_s", "latency_p50_s", "ttft_p50_s")}
    if "keepalive" in want:
        ka, nc = results["none"], results["none_new_connection"]
        results["keepalive"] = {"keep_alive_tokens_per_s": ka["tokens_per_s"],
                                "new_connection_tokens_per_s": nc["tokens_per_s"],
                                "keep_alive_latency_p50_s": ka["latency_p50_s"],
                                "new_connection_latency_p50_s": nc["latency_p50_s"],
                                "keep_alive_ttft_p50_s": ka["ttft_p50_s"],
                                "new_connection_ttft_p50_s": nc["ttft_p50_s"],
                                "connections": {"keep_alive": ka["connections"], "new_connection": nc["connections"]},
                                "throughput_ratio": ka["tokens_per_s"] / nc["tokens_per_s"]}


def section_adapters(model, args, bank_dir, adapter_dirs, mixed, results: dict) -> None:
    """The plain load vs the load round-robin over {base, a, b + steer, base + cap} on one server with 2 adapters."""
    from jaxpersona.serve.app import build_resources
    from jaxpersona.serve.engine import EngineConfig

    res = build_resources(model, [str(bank_dir)], [], NAME, 4, 4,
                          adapters=[f"{n}={d}" for n, d in adapter_dirs.items()])
    ecfg = EngineConfig(batch=args.batch, max_context=args.max_context, prefill_rows=args.prefill_rows,
                        prefill_chunk=args.prefill_chunk, attn_block=args.attn_block,
                        prefix_cache_mb=args.prefix_cache_mb)
    configs = adapter_mix(mixed)

    def body_of(mix: bool):
        def f(c: int, r: int) -> dict:
            name, items = configs[c % len(configs)] if mix else (NAME, None)
            return chat_body(PROMPTS[(c + r) % len(PROMPTS)], args.max_tokens, name, items)
        return f

    t0 = time.perf_counter()
    srv = start_server(model, res, ecfg)
    out: dict = {"adapters": {n: str(d) for n, d in adapter_dirs.items()}, "rank": 16,
                 "configurations": [f"{n}{' + ' + i[0]['kind'] if i else ''}" for n, i in configs]}
    try:
        for mix in (False, True):  # compiles; and the first full-size load runs slow
            run_load(srv.url, max(args.clients, len(configs)), 1, body_of(mix))
        out["compile_s"] = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"plain": [], "adapters_mixed": []}
        for i in range(args.repeats):
            for label, mix in rotated([("plain", False), ("adapters_mixed", True)], i):
                runs[label].append(with_engine_stats(srv, lambda mix=mix: run_load(srv.url, args.clients, args.rounds,
                                                                                   body_of(mix))))
        out.update({label: median_run(rs) for label, rs in runs.items()})
    finally:
        srv.close()
    out["mixed_vs_plain"] = out["adapters_mixed"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    results["adapters"] = out


def long_prompt(model, target: int) -> tuple[list[dict], int]:
    """A user message of repeated text whose rendered prompt has >= ``target`` tokens; (messages, tokens)."""
    text = "Summarise these meeting notes in one sentence.\n\n"
    while True:
        msgs = [{"role": "user", "content": text}]
        n = len(model.chat_ids([msgs])[0])
        if n >= target:
            return msgs, n
        text += LONG_PARAGRAPH


def chunked_run(url: str, shorts: list[list[dict]], long_msgs: list[dict] | None, stream_tokens: int,
                long_tokens: int, settle: int) -> dict:
    """8 (``len(shorts)``) streams; once each has ``settle`` tokens, the long request (if any) is sent. Returns
    each stream's gaps between chunks in the long prompt's prefill window (its arrival to its first token) and
    after all streams settled."""
    times: list[list[float]] = [[] for _ in shorts]
    outs: list[dict | None] = [None] * len(shorts)
    errs: list[BaseException] = []

    def stream(i: int) -> None:
        cl = Client(url)
        try:
            outs[i] = cl.stream(chat_body(shorts[i], stream_tokens, logprobs=True), times[i])
        except BaseException as e:  # noqa: BLE001
            errs.append(e)
        finally:
            cl.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(shorts))]
    for t in threads:
        t.start()
    while min(len(t) for t in times) < settle and not errs and any(t.is_alive() for t in threads):
        time.sleep(0.002)
    t_settled = time.perf_counter()
    long_out: dict = {}
    if long_msgs is not None and not errs:
        def send_long() -> None:
            cl = Client(url)
            try:
                long_out.update(cl.stream(chat_body(long_msgs, long_tokens, logprobs=True)))
            except BaseException as e:  # noqa: BLE001
                errs.append(e)
            finally:
                cl.close()

        lt = threading.Thread(target=send_long)
        lt.start()
        lt.join()
    for t in threads:
        t.join()
    if errs:
        raise errs[0]
    after = [b - a for ts in times for a, b in itertools.pairwise(ts) if b > t_settled]
    res = {"settled_gaps": len(after), "itl_p50_s": statistics.median(after), "itl_p95_s": pct(after, 95),
           "itl_max_s": max(after)}
    if long_msgs is not None:
        t_send, t_first = long_out["t0"], long_out["times"][0]
        window, covered = [], True
        for ts in times:
            before = [b - a for a, b in itertools.pairwise(ts) if b <= t_send]
            tol = min(0.01, 0.5 * statistics.median(before)) if before else 0.005
            gaps = [b - a for a, b in itertools.pairwise(ts) if t_send < b <= t_first + tol]
            covered &= ts[-1] > t_first + tol  # the stream outlived the window
            window.extend(gaps)
        res.update({"window_s": t_first - t_send, "long_ttft_s": t_first - t_send, "window_gaps": len(window),
                    "window_covered": covered, "window_itl_p50_s": statistics.median(window),
                    "window_itl_p95_s": pct(window, 95), "window_itl_max_s": max(window)})
    return res


def section_chunked(model, args, results: dict) -> None:
    """8 streams' p95 inter-token gap during a long prompt's prefill vs without, chunked and unchunked."""
    from jaxpersona.serve.app import build_resources
    from jaxpersona.serve.engine import EngineConfig

    shorts = [[{"role": "user", "content": p}] for p in PROMPTS[:8]]
    short_len = statistics.mean(len(x) for x in model.chat_ids(shorts))
    long_msgs, long_len = long_prompt(model, max(320, math.ceil(8 * short_len)))
    block = math.lcm(args.attn_block, args.prefill_chunk)
    whole = round_up(long_len, block)  # one prefill block holds the whole long prompt
    context = max(2 * whole, round_up(int(max(short_len, long_len)) + args.stream_tokens + 8, block))
    out: dict = {"short_prompt_tokens": short_len, "long_prompt_tokens": long_len, "streams": len(shorts),
                 "stream_tokens": args.stream_tokens, "max_context": context, "batch": args.chunked_batch, "runs": {}}
    res = build_resources(model, [], [], NAME, 4, 4)
    for label, chunk in (("chunked", args.prefill_chunk), ("unchunked", context // 2)):
        ecfg = EngineConfig(batch=args.chunked_batch, max_context=context, prefill_rows=args.prefill_rows,
                            prefill_chunk=chunk,
                            attn_block=args.attn_block, prefix_cache_mb=0)
        srv = start_server(model, res, ecfg)
        try:
            chunked_run(srv.url, shorts[:2], long_msgs, 12, 2, 2)  # the remaining compiles (row moves, spans)
            runs: dict[str, list[dict]] = {"alone": [], "with_long": []}
            for i in range(args.repeats):
                for case in rotated(["alone", "with_long"], i):
                    runs[case].append(chunked_run(srv.url, shorts, long_msgs if case == "with_long" else None,
                                                  args.stream_tokens, 4, args.settle))
            alone, wl = median_run(runs["alone"]), median_run(runs["with_long"])
            out["runs"][label] = {"prefill_chunk": chunk, "alone": alone, "with_long": wl,
                                  "p95_itl_ratio": wl["window_itl_p95_s"] / alone["itl_p95_s"],
                                  "window_covered": all(r["window_covered"] for r in runs["with_long"])}
        finally:
            srv.close()
    results["chunked"] = out


def section_decode(model, args, results: dict) -> None:
    """The jitted decode step at span = context / 8 vs the full context, at engine level."""
    import jax
    import jax.numpy as jnp

    from jaxpersona.model.transformer import Blocked
    from jaxpersona.serve.engine import Engine, EngineConfig, decode_step

    b, s = args.decode_batch, args.decode_context
    ecfg = EngineConfig(batch=b, max_context=s, prefill_chunk=args.prefill_chunk, attn_block=args.attn_block,
                        prefix_cache_mb=0)
    eng = Engine(model.params, model.cfg, model.tokenizer, model.eos_ids, model.pad_id, ecfg)
    eng.cache = eng.cache._replace(valid=jnp.ones_like(eng.cache.valid))  # every slot holds a key
    units, layers = eng.table.device()[1:]
    spans = sorted({ecfg.span(s // 8), s})

    def step(span: int) -> float:
        t0 = time.perf_counter()
        eng.cache, eng.logits, out = decode_step(
            eng.params, eng.cfg, eng.cache, eng.logits, jnp.full(b, span - 1, jnp.int32), jnp.ones(b, bool),
            jnp.asarray(eng.keys), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.float32), jnp.ones(b, jnp.float32),
            None, units, layers, logprobs=jnp.asarray(False), readout=False, blocked=Blocked(args.attn_block, span),
            cpu_kernel=eng.cpu_kernel)
        jax.block_until_ready((eng.cache, eng.logits, out))
        return time.perf_counter() - t0

    out = {"batch": b, "max_context": s, "attn_block": args.attn_block, "reps": args.decode_reps, "spans": {}}
    compile_s = {sp: step(sp) for sp in spans}
    for sp in spans:
        step(sp)  # one more warm call
    times: dict[int, list[float]] = {sp: [] for sp in spans}
    for _ in range(args.decode_reps):  # alternate the spans
        for sp in spans:
            times[sp].append(step(sp))
    for sp in spans:
        out["spans"][str(sp)] = {"step_ms": 1000 * statistics.median(times[sp]),
                                 "step_ms_min": 1000 * min(times[sp]), "step_ms_max": 1000 * max(times[sp]),
                                 "first_call_s": compile_s[sp]}
    out["eighth_span"] = spans[0]
    out["ratio"] = statistics.median(times[spans[0]]) / statistics.median(times[s])
    results["decode"] = out


def persona_messages(i: int, short: bool) -> list[dict]:
    """The persona-study prompt's shared part: persona ``i``'s system prompt (+ the few-shot turns)."""
    name, desc = PERSONAS[i % len(PERSONAS)]
    if short:
        return [{"role": "system", "content": SHORT_SYSTEM.format(name=name, desc=SHORT_DESCS[i % len(SHORT_DESCS)])}]
    msgs = [{"role": "system", "content": SYSTEM.format(name=name, desc=desc)}]
    for q, a in FEW_SHOT:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def shared_tokens(model, convs: list[list[dict]]) -> int:
    """Length of the longest common token prefix of the rendered prompts."""
    ids = model.chat_ids(convs)
    n = min(len(x) for x in ids)
    for j in range(n):
        if len({x[j] for x in ids}) > 1:
            return j
    return n


def prefix_load(srv, model, args, persona: int, short: bool) -> dict:
    """``prefix_clients`` clients over ``prefix_questions`` different questions under one persona prompt."""
    head = persona_messages(persona, short)
    qs = QUESTIONS[: args.prefix_questions]
    convs = [head + [{"role": "user", "content": q}] for q in qs]
    shared = shared_tokens(model, convs)
    k = args.prefix_clients
    rounds = -(-len(qs) // k)

    def body_of(c: int, r: int) -> dict:
        return chat_body(convs[(r * k + c) % len(convs)], args.prefix_tokens)

    r = with_engine_stats(srv, lambda: run_load(srv.url, k, rounds, body_of))
    n = r["requests"]
    c = srv.engine.ecfg.prefill_chunk
    r.update({"shared_prefix_tokens": shared, "prompt_tokens_max": max(len(x) for x in model.chat_ids(convs)),
              "hit_fraction": r["prefix_hits"] / (n * shared),
              # a perfect cache: every request but the first served the shared prefix's full blocks
              "hit_fraction_bound": (n - 1) / n * (shared // c) * c / shared,
              "whole_block_fraction": (shared // c) * c / shared})  # the bound once the cache is warm
    return r


def section_prefix(model, args, results: dict) -> None:
    """The persona-study load with no prefix cache vs with it; and a short system prompt's hit fraction."""
    from jaxpersona.serve.app import build_resources
    from jaxpersona.serve.engine import EngineConfig

    qs = QUESTIONS[: args.prefix_questions]
    longest = max(len(x) for i in range(len(PERSONAS)) for x in model.chat_ids(
        [persona_messages(i, False) + [{"role": "user", "content": q}] for q in qs]))
    block = math.lcm(args.attn_block, args.prefill_chunk)
    context = max(2 * args.prefill_chunk, round_up(longest + args.prefix_tokens, block))
    res = build_resources(model, [], [], NAME, 4, 4)
    out: dict = {"questions": len(qs), "clients": args.prefix_clients, "max_tokens": args.prefix_tokens,
                 "max_context": context, "prefill_chunk": args.prefill_chunk}
    warm = [{"role": "system", "content": "Warm-up. " * 40}, {"role": "user", "content": "Hi"}]
    for label, mb in (("no_cache", 0.0), ("cache", args.prefix_cache_mb)):
        ecfg = EngineConfig(batch=args.batch, max_context=context, prefill_rows=args.prefill_rows,
                            prefill_chunk=args.prefill_chunk, attn_block=args.attn_block, prefix_cache_mb=mb)
        srv = start_server(model, res, ecfg)
        try:
            for _ in range(2):  # a block stored, then found: compiles the cache's copies (another prompt)
                run_load(srv.url, 1, 1, lambda c, r: chat_body(warm, 2))
            runs = [prefix_load(srv, model, args, p, False) for p in range(args.repeats)]  # a new persona each
            out[label] = median_run(runs)
            if label == "cache":
                out["short_system"] = prefix_load(srv, model, args, 0, True)
        finally:
            srv.close()
    out["hit_fraction"] = out["cache"]["hit_fraction"]
    out["ttft_p50_ratio"] = out["cache"]["ttft_p50_s"] / out["no_cache"]["ttft_p50_s"]
    out["ttft_p95_ratio"] = out["cache"]["ttft_p95_s"] / out["no_cache"]["ttft_p95_s"]
    results["prefix"] = out


# --- the HF + torch peer ------------------------------------------------------------------------------------
class HFPeer:
    """HF transformers + torch on the same weights; forward hooks for interventions, peft for adapters."""

    def __init__(self, model, args, bank) -> None:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch, self.args, self.bank = torch, args, bank
        hf_dir = model.name if Path(str(model.name)).is_dir() else registry.converted_dir(registry.resolve(args.model))
        dtype = torch.float32 if args.hf_dtype == "float32" else torch.bfloat16
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        self.tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.gen_model = self.hf
        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__}

    def hooks_for(self, specs: list[dict]) -> list:
        torch = self.torch
        handles = []
        for spec in specs:
            layers = spec["layers"] if isinstance(spec["layers"], list) else [spec["layers"]]
            for layer in layers:  # resid[l] = output of block l-1
                raw = self.bank.get(spec["vector"])[layer] if isinstance(spec["vector"], str) else spec["vector"]
                v = torch.tensor(np.asarray(raw, np.float32))
                u = (v / v.norm()).to(self.hf.dtype)  # in the residual stream's dtype (bfloat16 with --hf-dtype)
                v = v.to(self.hf.dtype)

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

                handles.append(self.hf.model.layers[layer - 1].register_forward_hook(hook))
        return handles

    def gen(self, prompts: list[str]) -> int:
        tok = self.tok
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        n = self.args.max_tokens
        out = self.gen_model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        return int((out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0])

    def timed(self, groups: list, run_group: Callable[[object, list[str]], int]) -> dict:
        """One load: per round, each group (a configuration) runs its clients' prompts as one batch."""
        a = self.args
        t0, n = time.perf_counter(), 0
        for r in range(a.rounds):
            for g, cfg in enumerate(groups):
                cs = [c for c in range(a.clients) if c % len(groups) == g]
                n += run_group(cfg, [PROMPTS[(c + r) % len(PROMPTS)] for c in cs])
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "completion_tokens": n, "tokens_per_s": n / wall}

    def hooked(self, specs: list[dict] | None, prompts: list[str]) -> int:
        handles = self.hooks_for(specs) if specs else []
        try:
            return self.gen(prompts)
        finally:
            for h in handles:
                h.remove()

    def loads(self, mixed: list[list[dict]], labels: list[str]) -> dict:
        """``none``: one batched generate per round; ``mixed``: one per intervention per round."""
        with self.torch.inference_mode():
            self.gen(PROMPTS[:2])  # warm
            runs: dict[str, list[dict]] = {k: [] for k in labels}
            for i in range(self.args.repeats):
                for label in rotated(labels, i):
                    runs[label].append(self.timed([None] if label == "none" else mixed, self.hooked))
        return {label: median_run(rs) for label, rs in runs.items()}

    def adapters(self, adapter_dirs: dict[str, Path], configs: list[tuple[str, list[dict] | None]]) -> dict:
        """peft with both adapters loaded; one configuration (adapter or none, + hooks) per batched generate.
        Modifies the HF model (LoRA layers injected): run it last."""
        import peft

        pm = peft.PeftModel.from_pretrained(self.hf, str(adapter_dirs["a"]), adapter_name="a").eval()
        pm.load_adapter(str(adapter_dirs["b"]), adapter_name="b")
        self.gen_model = pm

        def run_group(cfg, prompts):
            name, specs = cfg
            if name == NAME:
                with pm.disable_adapter():
                    return self.hooked(specs, prompts)
            pm.set_adapter(name)
            return self.hooked(specs, prompts)

        with self.torch.inference_mode():
            run_group(configs[1], PROMPTS[:2])  # warm
            runs = [self.timed(configs, run_group) for _ in range(self.args.repeats)]
        return {"adapters_mixed": median_run(runs), "peft": peft.__version__}


# --- main ---------------------------------------------------------------------------------------------------
QUICK = {"clients": 8, "rounds": 2, "max_tokens": 32, "batch": 8, "repeats": 1, "stream_tokens": 64, "settle": 4,
         "decode_reps": 5, "prefix_questions": 24, "prefix_clients": 8, "prefix_tokens": 8}
FULL = {"clients": 16, "rounds": 2, "max_tokens": 64, "batch": 16, "repeats": 3, "stream_tokens": 96, "settle": 6,
        "decode_reps": 10, "prefix_questions": 32, "prefix_clients": 8, "prefix_tokens": 16}


def f(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary(results: dict, args) -> list[str]:
    """The printed report (also kept in the JSON as ``summary``)."""
    lines = [(f"device {results['device']}; {args.clients} clients x {args.rounds} rounds x {args.max_tokens} "
              f"tokens, batch {args.batch}, max_context {args.max_context}, prefill_chunk {args.prefill_chunk}, "
              f"prefill_rows {args.prefill_rows}, attn_block {args.attn_block}, prefix cache {args.prefix_cache_mb:g} MB; medians of {args.repeats} "
              f"alternating repeats (tok/s min-max in brackets); decode projections by "
              + ("the CPU kernel" if results.get("cpu_kernel") else f"XLA ({results.get('cpu_kernel_off_because')})"))]
    hf = results.get("hf", {})
    rows = [(k, results[k], hf.get(k)) for k in ("none", "mixed", "none_new_connection") if k in results]
    ad = results.get("adapters")
    if ad:
        rows += [("ad:plain", ad["plain"], None), ("ad:mixed", ad["adapters_mixed"], hf.get("adapters_mixed"))]
    if rows:
        lines.append(f"{'load':21s}{'tok/s':>8s}{'lat p50':>9s}{'lat p95':>9s}{'ttft p50':>9s}{'ttft p95':>9s}"
                     f"{'step ms':>9s}{'HF tok/s':>10s}{'ratio':>8s}")
        for k, r, h in rows:
            hf_tps = h["tokens_per_s"] if h else None
            lines.append(f"{k:21s}{r['tokens_per_s']:8.1f}{r['latency_p50_s']:9.2f}{r['latency_p95_s']:9.2f}"
                         f"{r['ttft_p50_s']:9.2f}{r['ttft_p95_s']:9.2f}{r['decode_step_ms']:9.1f}"
                         + (f"{hf_tps:10.1f}{r['tokens_per_s'] / hf_tps:7.2f}x" if hf_tps else f"{'':18s}")
                         + f"   [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}"
                         + (f" | HF {h['tokens_per_s_min']:.1f}-{h['tokens_per_s_max']:.1f}]" if hf_tps else "]"))
    if "mixed_vs_none" in results:
        m = results["mixed_vs_none"]
        lines.append(f"mixed / none: throughput {m['tokens_per_s']:.2f}x, latency p50 {m['latency_p50_s']:.2f}x, "
                     f"TTFT p50 {m['ttft_p50_s']:.2f}x; server compile {results['compile_s']:.1f} s")
    if "keepalive" in results:
        k = results["keepalive"]
        lines.append(f"keep-alive vs new connection per request: {k['keep_alive_tokens_per_s']:.1f} vs "
                     f"{k['new_connection_tokens_per_s']:.1f} tok/s ({k['throughput_ratio']:.3f}x), latency p50 "
                     f"{k['keep_alive_latency_p50_s']:.3f} vs {k['new_connection_latency_p50_s']:.3f} s, TTFT p50 "
                     f"{k['keep_alive_ttft_p50_s']:.3f} vs {k['new_connection_ttft_p50_s']:.3f} s; connections "
                     f"{k['connections']['keep_alive']} vs {k['connections']['new_connection']}")
    if ad:
        lines.append(f"adapters: {{{', '.join(ad['configurations'])}}} round-robin / plain on the same server "
                     f"(2 rank-16 adapters loaded): {ad['mixed_vs_plain']:.2f}x throughput"
                     + (f"; vs HF + peft one configuration at a time: "
                        f"{ad['adapters_mixed']['tokens_per_s'] / hf['adapters_mixed']['tokens_per_s']:.2f}x"
                        if "adapters_mixed" in hf else "")
                     + (f"; its plain load / the plain load without adapters loaded: "
                        f"{ad['plain']['tokens_per_s'] / results['none']['tokens_per_s']:.2f}x (separate servers, "
                        f"not alternated)" if "none" in results else ""))
    if "chunked" in results:
        c = results["chunked"]
        lines.append(f"chunked prefill: {c['streams']} streams (~{c['short_prompt_tokens']:.0f}-token prompts, "
                     f"{c['stream_tokens']} tokens), a {c['long_prompt_tokens']}-token prompt arrives; batch "
                     f"{c['batch']}, max_context {c['max_context']}")
        for label, r in c["runs"].items():
            a, w = r["alone"], r["with_long"]
            lines.append(f"  {label:9s} (prefill_chunk {r['prefill_chunk']:4d}): p95 ITL alone "
                         f"{1000 * a['itl_p95_s']:.0f} "
                         f"ms, during the long prefill {1000 * w['window_itl_p95_s']:.0f} ms (max "
                         f"{1000 * w['window_itl_max_s']:.0f}, window {w['window_s']:.2f} s, {w['window_gaps']:.0f} "
                         f"gaps) -> {r['p95_itl_ratio']:.2f}x" + ("" if r["window_covered"] else
                                                                   "  [a stream ended inside the window]"))
    if "decode" in results:
        d = results["decode"]
        sp = d["spans"]
        lines.append(f"decode step, batch {d['batch']}, max_context {d['max_context']}: span {d['eighth_span']} "
                     f"{sp[str(d['eighth_span'])]['step_ms']:.1f} ms vs span {d['max_context']} "
                     f"{sp[str(d['max_context'])]['step_ms']:.1f} ms -> {d['ratio']:.2f}x")
    if "prefix" in results:
        p = results["prefix"]
        nc, ca, sh = p["no_cache"], p["cache"], p["short_system"]
        lines.append(f"prefix cache, persona study ({p['questions']} questions, {p['clients']} clients, "
                     f"{p['max_tokens']} tokens; shared prefix {ca['shared_prefix_tokens']:.0f} of <= "
                     f"{ca['prompt_tokens_max']:.0f} prompt tokens): hit fraction {ca['hit_fraction']:.3f} (bound "
                     f"{ca['hit_fraction_bound']:.3f}: the first request cold, then whole blocks of "
                     f"{p['prefill_chunk']} = {ca['whole_block_fraction']:.3f} of the shared tokens); TTFT p50 "
                     f"{ca['ttft_p50_s']:.2f} vs {nc['ttft_p50_s']:.2f} s "
                     f"({p['ttft_p50_ratio']:.2f}x), p95 {ca['ttft_p95_s']:.2f} vs {nc['ttft_p95_s']:.2f} s; "
                     f"{ca['tokens_per_s']:.1f} vs {nc['tokens_per_s']:.1f} tok/s")
        lines.append(f"  short system prompt (shared prefix {sh['shared_prefix_tokens']} tokens, blocks of "
                     f"{p['prefill_chunk']}): hit fraction {sh['hit_fraction']:.3f} (bound "
                     f"{sh['hit_fraction_bound']:.3f}; whole blocks "
                     f"{sh['whole_block_fraction']:.3f})"
                     f", TTFT p50 {sh['ttft_p50_s']:.2f} s")
    lines.append("targets:")
    for name, value, ok in targets(results):
        lines.append(f"  {'n/a ' if ok is None else ('PASS' if ok else 'FAIL')}  {name}: {f(value)}")
    return lines


def targets(results: dict) -> list[tuple[str, float | None, bool | None]]:
    """(target, measured, passed or None when not measured)."""
    vs = results.get("jaxpersona_vs_hf", {})
    ch = results.get("chunked", {}).get("runs", {}).get("chunked")
    out = [("plain load >= 1.0x HF batched generate", vs.get("none"), 1.0, "ge"),
           ("mixed load >= 2.5x HF hooks", vs.get("mixed"), 2.5, "ge"),
           ("chunked-prefill p95 ITL ratio <= 2", ch["p95_itl_ratio"] if ch else None, 2.0, "le"),
           ("decode step at 1/8 context <= 0.5x full", results.get("decode", {}).get("ratio"), 0.5, "le"),
           ("prefix-cache hit fraction >= 0.9", results.get("prefix", {}).get("hit_fraction"), 0.9, "ge")]
    return [(n, v, None if v is None else (v >= t if op == "ge" else v <= t)) for n, v, t, op in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=registry.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--matmul-dtype", default=None, choices=["float32", "bfloat16"],
                    help="the server's matmul weights and products in this dtype (mixed precision; default --dtype)")
    ap.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"], help="the HF peer's torch dtype")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="fewer clients / tokens / repeats (~5 min on 2 cores)")
    ap.add_argument("--clients", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--max-context", type=int, default=192, help="of the plain / mixed / adapters loads' server")
    ap.add_argument("--prefill-rows", type=int, default=None, help="default min(8, batch), as `jaxpersona serve`")
    ap.add_argument("--prefill-chunk", type=int, default=16)
    ap.add_argument("--attn-block", type=int, default=64)
    ap.add_argument("--prefix-cache-mb", type=float, default=256.0)
    ap.add_argument("--repeats", type=int, help="each load this many times, alternating; medians reported")
    ap.add_argument("--stream-tokens", type=int, help="chunked: new tokens of each of the 8 streams")
    ap.add_argument("--chunked-batch", type=int, default=16,
                    help="chunked: the server's batch (> 8: the long request needs a row)")
    ap.add_argument("--settle", type=int, help="chunked: tokens every stream has before the long prompt arrives")
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--decode-reps", type=int)
    ap.add_argument("--prefix-questions", type=int)
    ap.add_argument("--prefix-clients", type=int)
    ap.add_argument("--prefix-tokens", type=int)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="bench_results/serve.json")
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.prefill_rows is None:
        args.prefill_rows = min(8, args.batch, args.chunked_batch)
    want = {s.strip() for s in args.sections.split(",") if s.strip()}
    if want - set(SECTIONS):
        ap.error(f"unknown sections {sorted(want - set(SECTIONS))}; use {', '.join(SECTIONS)}")
    if args.prefix_questions > len(QUESTIONS):
        ap.error(f"--prefix-questions: at most {len(QUESTIONS)}")

    import jax

    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.serve.app import build_resources

    t_start = time.perf_counter()
    model = load(args.model, args.dtype, matmul_dtype=args.matmul_dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bank_dir = contrast_bank(model, out.parent / "serve_bank")
    bank = VectorBank.load(bank_dir)
    mixed = interventions(bank, model.cfg)
    from jaxpersona.model import skinny

    results: dict = {"config": {**vars(args), "sections": sorted(want)}, "platform": platform.platform(),
                     "device": str(jax.devices()[0]), "seconds": {},
                     "cpu_kernel": skinny.available(), "cpu_kernel_off_because": skinny.unavailable_reason()}

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        fn()
        results["seconds"][name] = time.perf_counter() - t0
        print(f"[{name}: {results['seconds'][name]:.0f} s]", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(model, Path(tmp)) if "adapters" in want else {}
        if want & {"plain", "mixed", "keepalive"}:
            res = build_resources(model, [str(bank_dir)], [], NAME, 4, 4)
            timed("loads", lambda: section_loads(model, args, res, mixed, want, results))
        if "adapters" in want:
            timed("adapters", lambda: section_adapters(model, args, bank_dir, adapter_dirs, mixed, results))
        if "chunked" in want:
            timed("chunked", lambda: section_chunked(model, args, results))
        if "prefix" in want:
            timed("prefix", lambda: section_prefix(model, args, results))
        if "decode" in want:
            timed("decode", lambda: section_decode(model, args, results))
        hf_labels = [k for k in ("none", "mixed") if k in results and (k != "none" or "plain" in want)]
        if not args.no_hf and (hf_labels or "adapters" in want):
            def hf_run() -> None:
                peer = HFPeer(model, args, bank)
                hf = {**peer.versions}
                if hf_labels:
                    hf.update(peer.loads(mixed, hf_labels))
                if "adapters" in want:
                    hf.update(peer.adapters(adapter_dirs, adapter_mix(mixed)))
                results["hf"] = hf
            timed("hf", hf_run)
            results["jaxpersona_vs_hf"] = {k: results[k]["tokens_per_s"] / results["hf"][k]["tokens_per_s"]
                                           for k in hf_labels}
            if "adapters_mixed" in results["hf"]:
                results["jaxpersona_vs_hf"]["adapters_mixed"] = (results["adapters"]["adapters_mixed"]["tokens_per_s"]
                                                                 / results["hf"]["adapters_mixed"]["tokens_per_s"])
    results["seconds"]["total"] = time.perf_counter() - t_start
    results["targets"] = [{"target": n, "measured": v, "pass": ok} for n, v, ok in targets(results)]
    lines = summary(results, args)
    lines.append(f"total {results['seconds']['total']:.0f} s; wrote {out}")
    results["summary"] = lines
    out.write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
