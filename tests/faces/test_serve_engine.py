"""The serving engine's prefill path on the embedded SmolLM2-135M: chunked prefill interleaved with decode
steps, the prefix cache, attention over the slots in use. The invariant under all of it: a request's tokens
and log-probs are the same (fp32 on CPU, bit for bit) alone or beside others in the decode batch, with or
without a prefix-cache hit, whatever else is being decoded; prompts prefilled side by side (a call of
``prefill_rows`` rows instead of one) keep the tokens, with log-probs within 1e-4."""

from __future__ import annotations

import queue
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona import errors

SYSTEM = ("You are a careful assistant for a persona study. Answer every question in two short sentences, "
          "plainly and kindly, without lists, without headings and without mentioning that you are an AI. "
          "If a question is unclear, say what you would need to know.")
QUESTIONS = ["What is the capital of France?", "Why do cats purr?", "How do I boil an egg?"]


def prompt_ids(model, question: str, system: str | None = SYSTEM) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    ids, _ = model.tokens_and_role(msgs, "assistant")
    return list(ids)


def make_engine(model, **kw):
    from jaxpersona.serve.engine import Engine, EngineConfig

    cfg = dict(batch=4, max_context=256, prefill_chunk=16, attn_block=32, prefill_rows=2, **kw)
    eng = Engine(model.params, model.cfg, model.tokenizer, model.eos_ids, model.pad_id, EngineConfig(**cfg))
    eng.start()
    return eng


def submit(eng, ids, max_tokens, items=()):
    from jaxpersona.serve.engine import Sequence

    q: queue.Queue = queue.Queue()
    eng.submit([Sequence(0, ids, max_tokens, q, logprobs=0, ignore_eos=True, items=list(items))])
    return q


def collect(q, stamps=None):
    toks, lps = [], []
    while (ev := q.get(timeout=600))[0] != "done":
        assert ev[0] == "delta", ev
        toks.append(ev[3][0])
        lps.append(ev[3][1])
        if stamps is not None:
            stamps.append(time.perf_counter())
    return toks, lps


def assert_same_up_to_prefill_shape(got, want):
    """Runs of prompts that may have been prefilled side by side vs alone (calls of different shapes): the same
    tokens, log-probs within 1e-4 (see test_prompts_prefilled_side_by_side_give_what_they_give_alone)."""
    assert len(got) == len(want)
    for (tok, lp), (tok1, lp1) in zip(got, want):
        assert tok == tok1
        np.testing.assert_allclose(lp, lp1, rtol=0, atol=1e-4)


def run_alone(eng, ids, max_tokens, items=()):
    return collect(submit(eng, ids, max_tokens, items))


def steer_item(model, positions: str):
    from jaxpersona.serve.engine import Item

    n, d = model.cfg.n_resid, model.cfg.d_model
    v = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    w = np.zeros(n, np.float32)
    w[10] = 1.0
    return Item(v, 0.5, steer_w=w, positions=positions)


@pytest.fixture(scope="module")
def engines(smollm2):
    plain = make_engine(smollm2, prefix_cache_mb=0)
    cached = make_engine(smollm2)
    yield plain, cached
    plain.stop()
    cached.stop()


def test_prefix_cache_hits_give_the_same_numbers(smollm2, engines):
    plain, cached = engines
    ids = [prompt_ids(smollm2, q) for q in QUESTIONS]
    shared = next(i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    ref = [run_alone(plain, p, 6) for p in ids]
    assert plain.stats["prefix_hits"] == 0
    first = run_alone(cached, ids[0], 6)  # fills the cache with its full blocks
    assert first == ref[0] and cached.stats["prefix_hits"] == 0 and len(cached.prefix) > 0
    for p, want in zip(ids[1:], ref[1:]):
        before = cached.stats["prefix_hits"]
        assert run_alone(cached, p, 6) == want  # tokens and log-probs, bit for bit
        hit = cached.stats["prefix_hits"] - before
        assert hit == (min(shared, len(p) - 1) // 16) * 16 and hit >= 0.8 * shared, (hit, shared)
    # a steer acting on the reply only leaves the prompt's blocks alone: still a hit, and the library's numbers
    resp = steer_item(smollm2, "response")
    want = run_alone(plain, ids[2], 6, [resp])
    before = cached.stats["prefix_hits"]
    assert run_alone(cached, ids[2], 6, [resp]) == want
    assert cached.stats["prefix_hits"] > before
    # a steer on the prompt changes its keys and values: no hit on blocks it touches, same numbers as no cache
    prompt_steer = steer_item(smollm2, "prompt")
    want = run_alone(plain, ids[1], 6, [prompt_steer])
    before = cached.stats["prefix_hits"]
    assert run_alone(cached, ids[1], 6, [prompt_steer]) == want
    assert cached.stats["prefix_hits"] == before
    assert run_alone(cached, ids[1], 6, [prompt_steer]) == want  # now its own blocks are cached: a hit
    assert cached.stats["prefix_hits"] > before


def test_prompts_prefilled_side_by_side_give_what_they_give_alone(smollm2, engines):
    """A lone prompt's prefill calls compute one row; two arriving together share calls of ``prefill_rows``
    (2) rows. A call's shape changes XLA's matmul kernels, so side by side is not bit for bit what alone is: the
    bound is the same greedy tokens and log-probs within 1e-4 (measured: 2.6e-6, the first token's only)."""
    plain, _ = engines
    ids = [prompt_ids(smollm2, q) for q in QUESTIONS[:2]]
    calls, rows = plain.stats["prefills"], plain.stats["prefill_rows"]
    alone = [run_alone(plain, p, 6) for p in ids]
    blocks = [-(-len(p) // 16) for p in ids]
    assert plain.stats["prefills"] - calls == plain.stats["prefill_rows"] - rows == sum(blocks)  # one row each
    from jaxpersona.serve.engine import Sequence

    qs = [queue.Queue(), queue.Queue()]
    calls, rows = plain.stats["prefills"], plain.stats["prefill_rows"]
    plain.submit([Sequence(0, ids[0], 6, qs[0], logprobs=0, ignore_eos=True),
                  Sequence(0, ids[1], 6, qs[1], logprobs=0, ignore_eos=True)])
    assert_same_up_to_prefill_shape([collect(q) for q in qs], alone)
    n_calls = plain.stats["prefills"] - calls
    assert n_calls == max(blocks) and plain.stats["prefill_rows"] - rows == 2 * n_calls  # side by side


def test_prompts_arriving_together_share_their_common_blocks(smollm2, engines):
    """Two prompts with one system prompt (not cached yet) arrive together: the first computes each common block,
    the second waits a call and takes it from the cache, so the shared tokens are computed once, as when they
    arrive one after the other; then each computes its own blocks. Same tokens as alone (log-probs within
    1e-4: some of its calls compute another row beside it)."""
    from jaxpersona.serve.engine import Sequence

    plain, cached = engines
    system = "Study B, second wave. " + SYSTEM  # blocks no earlier test has cached
    ids = [prompt_ids(smollm2, q, system) for q in QUESTIONS[1:]]
    shared = next(i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    common = min(shared, len(ids[0]) - 1, len(ids[1]) - 1) // 16  # full blocks before each one's last
    assert common >= 3
    alone = [run_alone(plain, p, 6) for p in ids]
    qs = [queue.Queue(), queue.Queue()]
    hits, queries = cached.stats["prefix_hits"], cached.stats["prefix_queries"]
    calls, rows = cached.stats["prefills"], cached.stats["prefill_rows"]
    cached.submit([Sequence(0, ids[0], 6, qs[0], logprobs=0, ignore_eos=True),
                   Sequence(0, ids[1], 6, qs[1], logprobs=0, ignore_eos=True)])
    assert_same_up_to_prefill_shape([collect(q) for q in qs], alone)
    assert cached.stats["prefix_hits"] - hits == common * 16  # the second's common blocks, from the cache
    assert cached.stats["prefix_queries"] - queries == sum(len(p) for p in ids)
    blocks = [-(-len(p) // 16) for p in ids]
    assert cached.stats["prefill_rows"] - rows <= sum(blocks) - common + (cached.stats["prefills"] - calls)


def test_a_long_prompt_is_prefilled_between_decode_steps(smollm2, engines):
    """Two streams run; a prompt ~8x longer arrives: its 10+ blocks are prefilled a few at a time (about one
    decode step's worth) between decode steps, so the streams keep producing tokens, and every request gets exactly what it gets alone (the short rows attend
    over fewer slots alone than beside the long one)."""
    plain, _ = engines
    short = [prompt_ids(smollm2, q, None) for q in QUESTIONS[:2]]
    long = prompt_ids(smollm2, "Summarise this: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 16),
                      None)
    assert len(long) >= 8 * max(map(len, short)) // 2 and len(long) > 10 * 16
    alone_short = [run_alone(plain, p, 40) for p in short]
    alone_long = run_alone(plain, long, 8)
    stamps: list[list[float]] = [[], []]
    qs = [submit(plain, p, 40) for p in short]
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, collect(qs[i], stamps[i])))
               for i in range(2)]
    for t in threads:
        t.start()
    while len(stamps[0]) < 5:  # both streams are decoding
        time.sleep(0.01)
    prefills, t_submit = plain.stats["prefills"], time.perf_counter()
    ql = submit(plain, long, 8)
    long_stamps: list[float] = []
    got_long = collect(ql, long_stamps)
    for t in threads:
        t.join()
    assert got_long == alone_long  # prefilled alone (a one-row call) while the others decode: bit for bit
    assert_same_up_to_prefill_shape([results[0], results[1]], alone_short)  # these two may share prefill calls
    blocks = -(-len(long) // 16)
    assert plain.stats["prefills"] - prefills >= blocks
    during = [s for s in stamps[0] if t_submit < s < long_stamps[0]]
    assert len(during) >= 2, (len(during), blocks)  # the running stream kept producing tokens meanwhile


def test_lru_eviction_keeps_the_numbers(smollm2):
    from jaxpersona.serve.engine import EngineConfig

    block = 30 * 2 * 3 * 16 * 64 * 4  # SmolLM2: layers x (k, v) x kv heads x block x head_dim x fp32 bytes
    eng = make_engine(smollm2, prefix_cache_mb=2.5 * block / (1 << 20))  # room for two blocks
    try:
        ids = [prompt_ids(smollm2, q) for q in QUESTIONS]
        ref = [run_alone(eng, p, 3) for p in ids]
        assert eng.prefix.evictions > 0 and len(eng.prefix) == 2 and eng.prefix.bytes <= eng.prefix.budget
        assert [run_alone(eng, p, 3) for p in ids] == ref
    finally:
        eng.stop()
    with pytest.raises(errors.InputError, match="multiple of prefill_chunk"):
        EngineConfig(max_context=200, prefill_chunk=32, attn_block=8)
    with pytest.raises(errors.InputError, match="multiple of attn_block"):
        EngineConfig(max_context=192, attn_block=128)
    with pytest.raises(errors.InputError, match="prefix_cache_mb"):
        EngineConfig(prefix_cache_mb=-1)


def test_block_keys_hold_what_changes_a_block():
    from jaxpersona.serve.prefix import actor_identity, block_keys

    toks = list(range(100, 164))
    s = 128
    none = block_keys(toks, 16, 0, [], 3)
    assert len(none) == 3 and len(set(none)) == 3
    assert block_keys(toks, 16, 1, [], 3) != none  # the adapter
    other = toks.copy()
    other[20] = 7
    k2 = block_keys(other, 16, 0, [], 3)
    assert k2[0] == none[0] and k2[1] != none[1] and k2[2] != none[2]  # a token changes its block and later ones
    late = np.zeros(s, bool)
    late[40:] = True  # acts from slot 40: blocks 0 and 1 untouched
    v = actor_identity(np.ones(4), 0.5)
    k3 = block_keys(toks, 16, 0, [(v, late)], 3)
    assert k3[:2] == none[:2] and k3[2] != none[2]
    k4 = block_keys(toks, 16, 0, [(actor_identity(np.ones(4), 0.6), late)], 3)
    assert k4[2] != k3[2]  # another coefficient, another block


def test_a_mixed_precision_engine_holds_weight_bits_and_serves_the_same_numbers(tiny_llama, word_tokenizer,
                                                                               monkeypatch):
    """On a CPU the engine holds bfloat16 layer weights as their uint16 bits (converted once, not in every step):
    its tokens and log-probs equal an engine that holds them as bfloat16, bit for bit."""
    from jaxpersona.model.params import with_matmul_dtype
    from jaxpersona.serve import engine as engine_module
    from jaxpersona.serve.engine import Engine, EngineConfig

    params = with_matmul_dtype(tiny_llama.params, "bfloat16")
    ecfg = EngineConfig(batch=2, max_context=64, prefill_chunk=8, attn_block=16, prefill_rows=1, prefix_cache_mb=0)
    tokenizer = word_tokenizer()
    runs = []
    for hold_bits in (True, False):
        if not hold_bits:
            monkeypatch.setattr(engine_module, "layers_as_bits", lambda p: p)
        eng = Engine(params, tiny_llama.cfg, tokenizer, (2,), 0, ecfg)
        assert eng.params["layers"]["wq"].dtype == (np.uint16 if hold_bits else jnp.bfloat16)
        eng.start()
        try:
            runs.append([run_alone(eng, [1, 5 + i, 9, 11, 7 + i], 6) for i in range(2)])
        finally:
            eng.stop()
    assert runs[0] == runs[1]
