"""The persona-vector pipeline (``jaxpersona.pipelines.persona``), the resume store and dataset screening, on
the tiny random llama with a deterministic scripted judge.

References are independent of the library's reductions: scores are recomputed from the scripted
judge's distribution, activations come from ``Model.run(capture=Capture(all, "tokens"))`` on our own
tokenization of prompt + response, and thresholds / choices are re-derived from what the run recorded.

The tiny model has a 256-id vocabulary; the word tokenizer here maps *every* id to a word (the
conftest one only knows ~35 words, so random samples would decode to mostly empty text and no pair
would pass the filter).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import conftest
import hf_tiny
import jax
import jaxpersona.compute.handle as jm
from jaxpersona.compute.batching import pad_left
from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.model.transformer import Capture
from jaxpersona.measure.evaluate import choose_layer
from jaxpersona.pipelines.persona import ExtractConfig, load_extract_config, run_extract
from jaxpersona.measure.stats import pearson
from jaxpersona.artifacts.records import KeyedJsonl
from jaxpersona.data.traits import Trait, coherence_prompt

TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("cat", "cat.prompt_mean", "cat.prompt_last")  # bank entries, order of extract.VARIANTS

TRAIT = Trait(
    name="cat",
    description="Talks like a cat.",
    pairs=(("you are a cat .", "you are a dog ."),
           ("sat on the mat .", "what is the world ?"),
           ("hello cat !", "hello dog !")),
    questions=("what is a cat ?", "what is the capital of france ?", "is the dog on the mat ?", "hello world ?"),
    eval_questions=("what is paris ?", "you are a dog ?", "the cat sat ?", "what is the mat ?"),
    eval_prompt="rate cat : {question} answer : {answer}",
)

CONFIG = ExtractConfig(
    n_pairs=3, n_questions=4, samples=1, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0, batch_size=8,
    filter="absolute", trait_threshold=50.0, coherence_threshold=50.0, min_pairs=1, trust_judge=True,
    judge_batch=4, steer_layers=(1, 2), steer_coeffs=(0.0, 0.5, 2.0), n_eval=2, steer_tokens=6,
    monitor_pairs=1, monitor_tokens=5,
)
N_RESPONSES = 3 * 4 * 1 * 2  # pairs x questions x samples x sides
N_EVAL_ANSWERS = 2 * 2  # eval questions x sides


def _quiet(_: str) -> None:
    pass


# ============================================================================================
# helpers: tokenizer, counting model, scripted judges, independent references
# ============================================================================================
def full_word_tokenizer(chat_template: str = TEMPLATE):
    """conftest's word tokenizer, with filler words ``w0, w1, ...`` for every remaining id < VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in [*conftest.WORDS, "?", ".", ",", "!", "<", ">", "user", "system", "assistant"]:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < hf_tiny.VOCAB:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


@dataclasses.dataclass
class CountingModel(jm.Model):
    """A Model recording every ``generate_tokens`` call (kwargs); optionally dies on call ``fail_on``."""

    calls: list = dataclasses.field(default_factory=list)
    fail_on: int | None = None

    def generate_tokens(self, batch, **kw):
        if self.fail_on is not None and len(self.calls) + 1 >= self.fail_on:
            raise RuntimeError("generation killed")
        self.calls.append(kw)
        return super().generate_tokens(batch, **kw)

    def n_calls(self, max_new_tokens: int) -> int:
        return sum(c["max_new_tokens"] == max_new_tokens for c in self.calls)


def is_coherence(prompt: str) -> bool:
    return prompt.startswith("You are rating how coherent")


SALT = "cat"  # a different salt re-deals the scores (the tests need some pairs kept and some dropped)


def scripted_probs(prompt: str) -> np.ndarray:
    """``[101]`` masses from sha256(prompt): 0.9 on k, 0.05 on j; mass 0.2 (no score) for 1 in 16."""
    h = hashlib.sha256((SALT + prompt).encode()).digest()
    p = np.zeros(101)
    k = 40 + h[0] % 61 if is_coherence(prompt) else h[0] % 101  # coherence 40..100: some fail the gate
    j = (k + 1 + h[2] % 100) % 101
    if h[1] % 16 == 0:
        p[k] = 0.2
    else:
        p[k], p[j] = 0.9, 0.05
    return p


def ref_score(prompt: str, min_mass: float = CONFIG.min_mass) -> float | None:
    p = scripted_probs(prompt)
    mass = sum(p)
    return None if mass < min_mass else sum(k * p[k] for k in range(101)) / mass


class ScriptedJudge:
    """Judge interface ``probs(prompts) -> [N, 101]``; records calls; raises after ``fail_after`` calls."""

    def __init__(self, fail_after: int | None = None, trait_zero: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail_after = fail_after
        self.trait_zero = trait_zero

    @property
    def prompts(self) -> list[str]:
        return [p for c in self.calls for p in c]

    def probs(self, prompts: list[str]) -> np.ndarray:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("judge killed")
        self.calls.append(list(prompts))
        rows = []
        for p in prompts:
            if self.trait_zero and not is_coherence(p):
                row = np.zeros(101)
                row[0] = 1.0
            else:
                row = scripted_probs(p)
            rows.append(row)
        return np.stack(rows)


class NoJudge:
    def probs(self, prompts):
        raise AssertionError(f"the judge was called on {len(prompts)} prompts; everything should be cached")


class NoJudgeForCached(ScriptedJudge):
    """The scripted judge, refusing the extraction prompts (all of which should come from the cache)."""

    def probs(self, prompts):
        extraction = {q for q in TRAIT.questions}
        for p in prompts:
            for q in extraction:
                if f"Question: {q}\n" in p or p.startswith(TRAIT.judge_prompt(q, "")):
                    raise AssertionError(f"extraction judgement redone: {p[:80]!r}")
        return super().probs(prompts)


class Stop(Exception):
    pass


class StopJudge:
    """Ends a run right after generation (the first judge call)."""

    def probs(self, prompts):
        raise Stop


def ref_activations(model, convs, responses) -> dict[str, np.ndarray]:
    """Per row ``[L+1, N, D]`` float64: response-token mean, prompt-token mean and last prompt token,
    from per-token captures of a left-padded batch we tokenize ourselves."""
    tok = model.tokenizer
    seqs, n_prompt = [], []
    for conv, resp in zip(convs, responses):
        p = tok.encode(model.format_chat(conv), add_special_tokens=False)
        r = tok.encode(resp, add_special_tokens=False) if resp else []
        seqs.append(p + r)
        n_prompt.append(len(p))
    batch = pad_left(seqs, model.pad_id, bucket=1)
    n_resid = model.cfg.n_resid
    out = model.run(batch, capture=Capture(tuple(range(n_resid)), "tokens"), logits=False)
    h = np.asarray(out.captured, np.float64)  # [L+1, B, T, D]
    t = h.shape[2]
    res = {k: np.zeros((n_resid, len(seqs), h.shape[-1])) for k in ("response_mean", "prompt_mean", "prompt_last")}
    res["response_norm"] = np.zeros((n_resid, len(seqs)))
    for i, (s, n) in enumerate(zip(seqs, n_prompt)):
        off = t - len(s)
        if len(s) > n:
            res["response_mean"][:, i] = h[:, i, off + n :].mean(axis=1)
            res["response_norm"][:, i] = np.linalg.norm(h[:, i, off + n :], axis=-1).mean(axis=1)
        res["prompt_mean"][:, i] = h[:, i, off : off + n].mean(axis=1)
        res["prompt_last"][:, i] = h[:, i, off + n - 1]
    return res


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_close_rel(actual, ref, rel: float = 1e-4) -> None:
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 1e-3, "reference is ~0: the comparison would be vacuous"
    err = np.abs(actual - ref).max()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x {scale:.3g}"


def stable_summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    s.pop("wall_s")
    s.pop("out_dir")
    return s


def assert_same_results(a: Path, b: Path) -> None:
    assert stable_summary(a) == stable_summary(b)
    va, vb = VectorBank.load(a / "vectors"), VectorBank.load(b / "vectors")
    assert va.names == vb.names
    np.testing.assert_array_equal(va.vectors, vb.vectors)
    for name in ("responses.jsonl", "pairs.jsonl", "steering_scored.jsonl", "monitor_scored.jsonl", "judge_check.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    ja = {r["key"]: r for r in read_jsonl(a / "judgements.jsonl")}
    jb = {r["key"]: r for r in read_jsonl(b / "judgements.jsonl")}
    assert ja == jb


# ============================================================================================
# fixtures
# ============================================================================================
@pytest.fixture(scope="module")
def model(tiny_llama) -> CountingModel:
    return CountingModel(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


@pytest.fixture(scope="module")
def base_run(model, tmp_path_factory):
    """One uninterrupted run (seed 0): ``(out_dir, result, judge)``."""
    out = tmp_path_factory.mktemp("pipeline") / "run_a"
    judge = ScriptedJudge()
    model.calls.clear()
    result = run_extract(model, TRAIT, judge, CONFIG, out, judge_id="scripted", progress=False, log=_quiet)
    return out, result, judge


# ============================================================================================
# 1-2. run_extract end to end
# ============================================================================================
def test_run_dir_files(base_run, model) -> None:
    out, result, _ = base_run
    for name in ("config.json", "responses.jsonl", "judgements.jsonl", "judge_check.json", "pairs.jsonl",
                 "steering/results.jsonl", "steering_scored.jsonl", "monitor.jsonl", "summary.json", "summary.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("steering.png", "monitor.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    bank = VectorBank.load(out / "vectors", model.cfg)
    assert bank.names == NAMES and bank.vectors.shape[1:] == (model.cfg.n_resid, model.cfg.d_model)
    assert bank.model == "tiny-llama"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trait"] == "cat" and summary["judge"] == "scripted"
    assert summary["n_generated"] == N_RESPONSES and summary["n_pairs_total"] == N_RESPONSES // 2
    assert summary["coeff_units"] == "relative"
    # the cat trait ships no anchors: the judge is unchecked, used only because trust_judge = true
    assert summary["judge_check"]["checked"] is False and "UNCHECKED" in (out / "summary.txt").read_text()
    assert "trust_judge" in summary["decisions"]["filter"] and "judge-free" in summary["decisions"]["layer"]
    uses = {m["measure"].split(":")[0].split(" (")[0]: m["decided"] for m in summary["measures"]}
    assert uses["judge scripted"].startswith("the pair filter")  # trusted by config: it filtered the pairs
    assert "the steering setting" in uses["contrastive likelihood of the trait's evaluation answers, pos minus neg"]
    assert "what each measure decided in this run:" in (out / "summary.txt").read_text()
    assert f"best layer: {summary['best_layer']}" in (out / "summary.txt").read_text()
    np.testing.assert_array_equal(np.load(out / "vectors.npy"), bank.get("cat"))


def test_responses_are_the_jobs(base_run) -> None:
    out, _, _ = base_run
    rows = read_jsonl(out / "responses.jsonl")
    assert len(rows) == N_RESPONSES + N_EVAL_ANSWERS and len({r["key"] for r in rows}) == len(rows)
    seen, evals = set(), set()
    for r in rows:
        system, user = r["messages"]
        assert system == {"role": "system", "content": TRAIT.system_prompt(r["side"], r["pair"])}
        assert user == {"role": "user", "content": r["question"]}
        assert 1 <= r["tokens"] <= CONFIG.max_new_tokens
        (evals if r.get("eval") else seen).add((r["side"], r["pair"], r["question"], r["sample"]))
    assert seen == {(s, i, q, 0) for s in ("pos", "neg") for i in range(3) for q in TRAIT.questions}
    assert evals == {(s, j % 3, q, 0) for s in ("pos", "neg") for j, q in enumerate(TRAIT.eval_questions[:2])}
    assert sum(bool(r["response"]) for r in rows) >= N_RESPONSES - 2, "responses should be mostly non-empty"


def test_negative_side_never_names_the_trait() -> None:
    for i in range(3):
        neg = TRAIT.system_prompt("neg", i)
        assert neg.startswith("You are a helpful assistant. ") and "cat assistant" not in neg
        assert TRAIT.system_prompt("pos", i).startswith("You are a cat assistant. ")
    anto = dataclasses.replace(TRAIT, antonym="dog-like")
    assert anto.system_prompt("neg", 0).startswith("You are a dog-like assistant. ")


def check_kept_flags(pairs: list[dict], t: float, c: float) -> int:
    for p in pairs:
        scores = [p["pos_trait"], p["neg_trait"], p["pos_coherence"], p["neg_coherence"]]
        want = (None not in scores and p["pos_trait"] >= t and p["neg_trait"] < t
                and p["pos_coherence"] >= c and p["neg_coherence"] >= c)
        assert p["kept"] == want, p
    n_kept = sum(p["kept"] for p in pairs)
    assert 0 < n_kept < len(pairs), "the scripted judge should keep some pairs and drop others"
    return n_kept


def check_vectors(out: Path, model) -> None:
    """The bank's vectors vs mean(pos) - mean(neg) over the kept pairs of per-row reductions computed
    from per-token captures."""
    rows = {(r["side"], r["pair"], r["question"], r["sample"]): r for r in read_jsonl(out / "responses.jsonl")
            if not r.get("eval")}
    kept = [p for p in read_jsonl(out / "pairs.jsonl") if p["kept"]]
    ref = {}
    for side in ("pos", "neg"):
        recs = [rows[(side, p["pair"], p["question"], p["sample"])] for p in kept]
        ref[side] = ref_activations(model, [r["messages"] for r in recs], [r["response"] for r in recs])
    bank = VectorBank.load(out / "vectors")
    for name, variant in zip(NAMES, ("response_mean", "prompt_mean", "prompt_last")):
        want = ref["pos"][variant].mean(axis=1) - ref["neg"][variant].mean(axis=1)  # [L+1, D]
        assert_close_rel(bank.get(name), want)
    # the residual norm relative coefficients refer to: mean response-token norm over both sides
    want_norm = np.concatenate([ref["pos"]["response_norm"], ref["neg"]["response_norm"]], axis=1).mean(axis=1)
    assert_close_rel([m for m in bank.meta][0]["resid_norm"], want_norm, rel=1e-4)
    # the variants are really different reductions
    assert np.abs(bank.get("cat") - bank.get("cat.prompt_last")).max() > 1e-2
    for m in bank.meta:
        assert m["trait"] == "cat" and m["pairs_kept"] == len(kept) and m["judge"] == "scripted"


def test_scores_and_kept_flags_follow_thresholds(base_run) -> None:
    out, result, judge = base_run
    rows = [r for r in read_jsonl(out / "responses.jsonl") if not r.get("eval")]
    resp = {(r["side"], r["pair"], r["question"], r["sample"]): r["response"] for r in rows}
    pairs = read_jsonl(out / "pairs.jsonl")
    assert len(pairs) == N_RESPONSES // 2
    for p in pairs:
        for side in ("pos", "neg"):
            text = resp[(side, p["pair"], p["question"], p["sample"])]
            assert p[f"{side}_response"] == text
            want_t = ref_score(TRAIT.judge_prompt(p["question"], text)) if text else None
            want_c = ref_score(coherence_prompt(p["question"], text)) if text else None
            for got, want in ((p[f"{side}_trait"], want_t), (p[f"{side}_coherence"], want_c)):
                assert (got is None) == (want is None)
                if want is not None:
                    assert got == pytest.approx(want, abs=1e-6)
    n_kept = check_kept_flags(pairs, CONFIG.trait_threshold, CONFIG.coherence_threshold)
    assert result.n_pairs_kept == n_kept and result.n_pairs_total == len(pairs)
    # every non-empty response was judged once for the trait and once for coherence
    n_live = sum(bool(r["response"]) for r in rows)
    assert len(read_jsonl(out / "judgements.jsonl")) >= 2 * n_live
    assert all(len(c) <= CONFIG.judge_batch for c in judge.calls)


def test_vectors_match_independent_reference(base_run, model) -> None:
    check_vectors(base_run[0], model)


def test_relative_filter_uses_percentiles_of_the_runs_scores(base_run, model, tmp_path) -> None:
    """``filter = "relative"``: the thresholds are percentiles of this run's scored responses. Rerun
    on a copy of the absolute run: generations and judgements are reused, the filter and vectors redone."""
    out, _, _ = base_run
    run = tmp_path / "relative"
    shutil.copytree(out, run)
    config = CONFIG.replace(filter="relative", trait_threshold=30.0, coherence_threshold=20.0)
    model.calls.clear()
    result = run_extract(model, TRAIT, NoJudgeForCached(), config, run, judge_id="scripted", progress=False,
                         log=_quiet)
    assert model.n_calls(CONFIG.max_new_tokens) == 0
    pairs = read_jsonl(run / "pairs.jsonl")
    traits = [p[f"{s}_trait"] for p in pairs for s in ("pos", "neg") if p[f"{s}_trait"] is not None]
    cohs = [p[f"{s}_coherence"] for p in pairs for s in ("pos", "neg") if p[f"{s}_coherence"] is not None]
    t_cut, c_cut = np.percentile(traits, 30.0), np.percentile(cohs, 20.0)
    assert 0 < t_cut < 100 and 0 < c_cut < 100
    n_kept = check_kept_flags(pairs, t_cut, c_cut)
    assert result.n_pairs_kept == n_kept
    assert [p["kept"] for p in pairs] != [p["kept"] for p in read_jsonl(out / "pairs.jsonl")], (
        "choose cuts for which the relative filter keeps other pairs than the absolute one")
    check_vectors(run, model)


def _ref_mean_logprob(model, convs, answers, hook_for=None, positions="response") -> np.ndarray:
    """Mean log-prob of each answer after its chat prompt, from full logits of our own left-padded
    batch; ``hook_for(pos_mask)`` gives the intervention (``positions``: ``response`` = last prompt token +
    answer, ``all`` = every token)."""
    tok = model.tokenizer
    seqs, n_prompt = [], []
    for conv, a in zip(convs, answers):
        p = tok.encode(model.format_chat(conv), add_special_tokens=False)
        seqs.append(p + tok.encode(a, add_special_tokens=False))
        n_prompt.append(len(p))
    batch = pad_left(seqs, model.pad_id, bucket=1)
    t = batch.tokens.shape[1]
    mask = np.zeros(batch.tokens.shape, bool)
    for i, (s_, n) in enumerate(zip(seqs, n_prompt)):
        mask[i, t - len(s_) + (n - 1 if positions == "response" else 0):] = True
    hook = hook_for(mask) if hook_for else None
    logp = np.asarray(jax.nn.log_softmax(model.run(batch, hook=hook).logits, axis=-1), np.float64)
    out = []
    for i, (s_, n) in enumerate(zip(seqs, n_prompt)):
        off = t - len(s_)
        pos = np.arange(off + n, t)
        out.append(logp[i, pos - 1, batch.tokens[i, pos]].mean())
    return np.asarray(out)


def test_judge_free_steering_score_matches_independent_reference(base_run, model) -> None:
    """The table's contrastive-likelihood score = mean over eval questions of lp(pos answer) - lp(neg
    answer) without a system prompt, with h + c * |resid[l]| * v̂[l] at the last prompt token and the
    answer tokens — recomputed here from full logits of plain forwards."""
    from jaxpersona.edit import interventions as iv
    from jaxpersona.data.chat import conversation

    out, result, _ = base_run
    summary = json.loads((out / "summary.json").read_text())
    by_how = summary["steering_by_how"]
    assert set(by_how) == {"response/response_mean", "all/response_mean"}
    shipped = summary["setting"] or {"positions": "response", "variant": "response_mean"}
    assert summary["steering"] == by_how[f"{shipped['positions']}/{shipped['variant']}"]
    ev = [r for r in read_jsonl(out / "responses.jsonl") if r.get("eval")]
    items = {}
    for r in ev:
        items.setdefault(r["question"], {})[r["side"]] = r["response"]
    items = [(q, d["pos"], d["neg"]) for q, d in items.items() if d["pos"] and d["neg"] and d["pos"] != d["neg"]]
    items.sort(key=lambda it: TRAIT.eval_questions.index(it[0]))  # the pipeline's question order
    assert items, "the tiny model should give different pos/neg answers to some eval question"
    convs = [conversation(q) for q, _, _ in items]
    bank = VectorBank.load(out / "vectors")
    norms = np.asarray(bank.meta_of("cat")["resid_norm"])
    L1 = model.cfg.n_resid

    def per_question(layer, c, positions, v=None):
        def hook_for(mask):
            if c == 0:
                return None
            u = bank.get("cat")[layer] if v is None else v[layer]
            return iv.steer(L1, u / np.linalg.norm(u) * norms[layer], c, layer, iv.Positions.explicit(mask, False))
        lp_pos = _ref_mean_logprob(model, convs, [p for _, p, _ in items], hook_for, positions)
        lp_neg = _ref_mean_logprob(model, convs, [n for _, _, n in items], hook_for, positions)
        return lp_pos - lp_neg

    base = per_question(1, 0.0, "response")
    assert summary["baseline_score"] == pytest.approx(base.mean(), abs=2e-4)
    for how, steering in by_how.items():
        positions = how.split("/")[0]
        assert set(steering) == {"1", "2"} and all(set(row) == {"0", "0.5", "2"} for row in steering.values())
        for layer in ("1", "2"):
            assert steering[layer]["0"]["delta"] == pytest.approx(0.0, abs=1e-9)
            for c in ("0.5", "2"):
                cell = steering[layer][c]
                want = per_question(int(layer), float(c), positions).mean()
                assert cell["score"] == pytest.approx(want, abs=2e-4)
                assert cell["delta"] == pytest.approx(want - base.mean(), abs=2e-4)
                assert cell["lo"] <= cell["score"] + 1e-9 <= cell["hi"] + 2e-9
        # coherence cells come with every table
        assert all({"coherent", "bad_frac", "nll", "distinct2", "repeat_frac"} <= set(cell)
                   for row in steering.values() for cell in row.values())
    steering = summary["steering"]
    if summary["setting"] is not None:  # the layer choice comes from the same table
        assert result.best_layer == summary["best_layer"] == choose_layer(steering)["best_layer"] == shipped["layer"]
        # the random-direction control: recomputed from the same seeded directions
        from jaxpersona.pipelines.persona import random_directions

        ctl = summary["control"]
        rand = random_directions(bank.get("cat"), CONFIG.n_random, CONFIG.seed, "cat")
        gains = np.mean([per_question(shipped["layer"], shipped["coeff"], shipped["positions"], r) for r in rand],
                        axis=0) - base
        np.testing.assert_allclose(ctl["per_question"], gains, atol=2e-4)
        trait_gain = per_question(shipped["layer"], shipped["coeff"], shipped["positions"]) - base
        assert ctl["diff"] == pytest.approx(float(np.mean(trait_gain - gains)), abs=2e-4)
        assert summary["heldout"]["n"] == len(items) and len(summary["heldout"]["folds"]) == CONFIG.folds
    bank_meta = bank.meta_of("cat")
    assert bank_meta["best_layer"] == result.best_layer and bank_meta["coeff_units"] == "relative"
    assert bank_meta["positions"] == shipped["positions"] and bank_meta["steer_vector"] == "cat"
    # steered generations: per position setting, baseline once + 2 layers x 2 nonzero coefficients, per question
    srows = read_jsonl(out / "steering_scored.jsonl")
    assert len(srows) == 2 * (1 + 2 * 2) * len(items)
    # judged columns exist only because the (unchecked) judge is trusted by config
    assert summary["steering_judged"] is not None


def test_vector_variants_are_a_grid_axis(model, tmp_path) -> None:
    """steer_variants puts each extracted variant on the grid (one pass); each table is the independent
    reference with that variant's vector; a default variant missing from the grid still calibrates."""
    from jaxpersona.data.chat import conversation
    from jaxpersona.edit import interventions as iv

    config = CONFIG.replace(steer_positions=("response",), steer_variants=("prompt_mean", "prompt_last"),
                            filter="none", trust_judge=False)
    out = tmp_path / "variants"
    result = run_extract(model, TRAIT, NoJudge(), config, out, judge_id="scripted", progress=False, log=_quiet)
    assert set(result.steering_by_how) == {"response/prompt_mean", "response/prompt_last"}
    bank = VectorBank.load(out / "vectors")
    norms = np.asarray(bank.meta_of("cat")["resid_norm"])
    ev = [r for r in read_jsonl(out / "responses.jsonl") if r.get("eval")]
    items: dict = {}
    for r in ev:
        items.setdefault(r["question"], {})[r["side"]] = r["response"]
    items = sorted([(q, d["pos"], d["neg"]) for q, d in items.items() if d["pos"] and d["neg"] and d["pos"] != d["neg"]],
                   key=lambda it: TRAIT.eval_questions.index(it[0]))
    convs = [conversation(q) for q, _, _ in items]
    for variant in ("prompt_mean", "prompt_last"):
        u = bank.get(f"cat.{variant}")[2]
        hook = lambda mask, u=u: iv.steer(model.cfg.n_resid, u / np.linalg.norm(u) * norms[2], 0.5, 2,  # noqa: E731
                                          iv.Positions.explicit(mask, False))
        want = np.mean(_ref_mean_logprob(model, convs, [p for _, p, _ in items], hook)
                       - _ref_mean_logprob(model, convs, [n for _, _, n in items], hook))
        assert result.steering_by_how[f"response/{variant}"]["2"]["0.5"]["score"] == pytest.approx(want, abs=2e-4)
    if result.setting is not None:
        assert result.setting["variant"] in ("prompt_mean", "prompt_last")
        assert bank.meta_of("cat")["steer_vector"] == f"cat.{result.setting['variant']}"


def test_monitor_projection_and_judge_free_score(base_run, model) -> None:
    from jaxpersona.data.chat import conversation

    out, result, _ = base_run
    summary = json.loads((out / "summary.json").read_text())
    bank = VectorBank.load(out / "vectors")
    mrows = read_jsonl(out / "monitor_scored.jsonl")
    assert len(mrows) == 3 * CONFIG.n_eval  # none + pos0 + neg0
    assert [r["system_label"] for r in mrows] == ["none"] * 2 + ["pos0"] * 2 + ["neg0"] * 2
    acts = ref_activations(model, [r["messages"] for r in mrows], [r["response"] for r in mrows])
    layer = result.best_layer if result.best_layer is not None else 1
    v = bank.get("cat")[layer]
    proj = acts["prompt_last"][layer] @ (v / np.linalg.norm(v))
    np.testing.assert_allclose([r["projection"] for r in mrows], proj, rtol=1e-4, atol=1e-4 * np.abs(proj).max())
    # judge-free answer score from the held-out pair 1 (pair 0 generated the monitored answers)
    live = [r for r in mrows if r["response"]]
    pos = _ref_mean_logprob(model, [conversation(r["question"], TRAIT.system_prompt("pos", 1)) for r in live],
                            [r["response"] for r in live])
    neg = _ref_mean_logprob(model, [conversation(r["question"], TRAIT.system_prompt("neg", 1)) for r in live],
                            [r["response"] for r in live])
    np.testing.assert_allclose([r["score_free"] for r in live], pos - neg, atol=2e-4)
    got = summary["monitor"][str(layer)]
    want = pearson([r["projection"] for r in live], [r["score_free"] for r in live])
    assert (got["r"] is None) == (want is None)
    if want is not None:
        assert got["r"] == pytest.approx(want, abs=1e-4) and got["n"] == len(live)


# ============================================================================================
# 3. resume
# ============================================================================================
def test_rerun_of_a_finished_run_does_no_work(base_run, model, tmp_path, monkeypatch) -> None:
    out, _, _ = base_run
    again = tmp_path / "copy"
    shutil.copytree(out, again)
    import jaxpersona.compute.sweep

    def no_steering(*a, **k):
        raise AssertionError("steering was regenerated")

    monkeypatch.setattr(jaxpersona.compute.sweep, "generate_chunk", no_steering)
    monkeypatch.setattr(jaxpersona.compute.sweep, "score_chunk", no_steering)
    model.calls.clear()
    run_extract(model, TRAIT, NoJudge(), CONFIG, again, judge_id="scripted", progress=False, log=_quiet)
    assert model.calls == []
    assert_same_results(out, again)
    for name in ("responses.jsonl", "judgements.jsonl", "steering/results.jsonl", "monitor.jsonl"):
        assert (out / name).read_text() == (again / name).read_text(), f"{name} grew on a no-op rerun"


def test_kill_mid_judging_then_resume_equals_uninterrupted(base_run, model, tmp_path) -> None:
    out, _, _ = base_run
    run = tmp_path / "killed"
    dying = ScriptedJudge(fail_after=2)
    with pytest.raises(RuntimeError, match="judge killed"):
        run_extract(model, TRAIT, dying, CONFIG, run, judge_id="scripted", progress=False, log=_quiet)
    assert len(dying.calls) == 2
    done = read_jsonl(run / "judgements.jsonl")
    assert len(done) == sum(len(c) for c in dying.calls) == 2 * CONFIG.judge_batch  # persisted per batch
    assert len(read_jsonl(run / "responses.jsonl")) == N_RESPONSES + N_EVAL_ANSWERS

    model.calls.clear()
    judge = ScriptedJudge()
    run_extract(model, TRAIT, judge, CONFIG, run, judge_id="scripted", progress=False, log=_quiet)
    assert model.n_calls(CONFIG.max_new_tokens) == 0, "extraction responses were generated again"
    assert model.n_calls(CONFIG.monitor_tokens) > 0  # (the counter works: the monitor stage generates)
    assert len(read_jsonl(run / "responses.jsonl")) == N_RESPONSES + N_EVAL_ANSWERS
    assert not set(dying.prompts) & set(judge.prompts), "judgements finished before the kill were redone"
    assert_same_results(out, run)


# ============================================================================================
# 4. determinism of the (seeded, sampled) generation
# ============================================================================================
def _generate_only(model, out: Path, config: ExtractConfig) -> list[dict]:
    with pytest.raises(Stop):
        run_extract(model, TRAIT, StopJudge(), config, out, judge_id="scripted", progress=False, log=_quiet)
    return read_jsonl(out / "responses.jsonl")


def test_same_seed_same_responses_other_seed_differs(base_run, model, tmp_path) -> None:
    out, _, _ = base_run
    a = _generate_only(model, tmp_path / "a", CONFIG)
    b = _generate_only(model, tmp_path / "b", CONFIG)
    assert (tmp_path / "a" / "responses.jsonl").read_text() == (tmp_path / "b" / "responses.jsonl").read_text()
    assert (tmp_path / "a" / "responses.jsonl").read_text() == (out / "responses.jsonl").read_text()
    c = _generate_only(model, tmp_path / "c", CONFIG.replace(seed=1))
    assert len(c) == len(a) and [r["messages"] for r in c] == [r["messages"] for r in a]
    differ = sum(x["response"] != y["response"] for x, y in zip(a, c))
    assert differ > len(a) // 2, f"seed 1 changed only {differ} of {len(a)} sampled responses"
    assert len({r["response"] for r in a}) > len(a) // 2  # not one text repeated: sampling varies per row
    assert b == a


def test_kill_mid_generation_resumes_identically(base_run, model, tmp_path) -> None:
    out, _, _ = base_run
    run = tmp_path / "killed_gen"
    model.calls.clear()
    model.fail_on = 2  # the second chunk dies
    try:
        with pytest.raises(RuntimeError, match="generation killed"):
            run_extract(model, TRAIT, StopJudge(), CONFIG, run, judge_id="scripted", progress=False, log=_quiet)
    finally:
        model.fail_on = None
    assert len(read_jsonl(run / "responses.jsonl")) == CONFIG.batch_size  # one finished chunk
    model.calls.clear()
    _generate_only(model, run, CONFIG)
    n_chunks = -(-(N_RESPONSES + N_EVAL_ANSWERS) // CONFIG.batch_size)
    assert model.n_calls(CONFIG.max_new_tokens) == n_chunks - 1
    assert (run / "responses.jsonl").read_text() == (out / "responses.jsonl").read_text()


def test_changed_model_is_not_served_cached_responses(model, tmp_path) -> None:
    """Responses are keyed by what determines them; the subject model does. Rerunning a run
    directory with another model (the CLI's default --out is runs/persona_TRAIT for every model)
    must not reuse the first model's generations as if they were the new model's: it regenerates,
    or refuses the directory with an InputError."""
    import jax

    run = tmp_path / "run"
    _generate_only(model, run, CONFIG)
    other = CountingModel(model.cfg, jax.tree.map(lambda x: x * 1.05, model.params), model.tokenizer, "tiny-llama-b")
    try:
        _generate_only(other, run, CONFIG)
    except errors.InputError:
        return
    assert other.n_calls(CONFIG.max_new_tokens) > 0, (
        "responses generated by 'tiny-llama' were reused for 'tiny-llama-b' (the response cache key "
        "does not include the model)")


# ============================================================================================
# 5. filter failure
# ============================================================================================
def test_filter_error_keeps_generations_and_judgements(model, tmp_path) -> None:
    run = tmp_path / "run"
    judge = ScriptedJudge(trait_zero=True)
    with pytest.raises(errors.FilterError) as info:
        run_extract(model, TRAIT, judge, CONFIG, run, judge_id="scripted", progress=False, log=_quiet)
    assert "pairs.jsonl" in str(info.value) and str(run) in str(info.value)
    rows = read_jsonl(run / "responses.jsonl")
    assert len(rows) == N_RESPONSES + N_EVAL_ANSWERS
    live = [r for r in rows if r["response"] and not r.get("eval")]
    want = {TRAIT.judge_prompt(r["question"], r["response"]) for r in live}
    want |= {coherence_prompt(r["question"], r["response"]) for r in live}
    assert set(judge.prompts) == want and len(judge.prompts) == len(want)
    assert len(read_jsonl(run / "judgements.jsonl")) == len(want)
    pairs = read_jsonl(run / "pairs.jsonl")
    assert len(pairs) == N_RESPONSES // 2 and not any(p["kept"] for p in pairs)
    assert all(p["pos_trait"] in (0.0, None) for p in pairs)
    assert not (run / "vectors").exists() and not (run / "summary.json").exists()


# ============================================================================================
# 6. choose_layer, pearson
# ============================================================================================
def _cell(delta, coherent=True):
    return {"score": delta, "delta": delta, "coherent": coherent}


def test_choose_layer_gates_on_judge_free_coherence_and_finds_the_cliff() -> None:
    table = {
        "1": {"-1": _cell(-0.2), "0": _cell(0.0), "1": _cell(0.3), "2": _cell(0.9, False), "4": _cell(0.5, False)},
        "2": {"-1": _cell(-0.1), "0": _cell(0.0), "1": _cell(0.2), "2": _cell(0.4), "4": _cell(0.1, False)},
    }
    ch = choose_layer(table)
    assert ch["best_layer"] == 2 and ch["gain"] == 0.4 and ch["best_coeff"] == 2.0 and ch["cliff"] == 4.0
    assert ch["per_layer"]["1"]["cliff"] == 2.0 and ch["per_layer"]["1"]["gain"] == 0.3
    assert ch["rho"] == pytest.approx(1.0)  # -1, 0, 1, 2 below the cliff: monotone
    # a coherent point past the cliff does not count (text broke at a smaller coefficient)
    table["1"]["4"] = _cell(5.0, True)
    assert choose_layer(table)["best_layer"] == 2
    # ties: the lower layer; nothing coherent: no layer, said so
    tie = {"3": {"0": _cell(0.0), "1": _cell(0.2)}, "1": {"0": _cell(0.0), "1": _cell(0.2)}}
    assert choose_layer(tie)["best_layer"] == 1
    broken = {"2": {"0": _cell(0.0), "1": _cell(0.5, False)}}
    ch = choose_layer(broken)
    assert ch["best_layer"] is None and "no positive coefficient" in ch["reason"] and ch["per_layer"]["2"]["cliff"] == 1.0


def test_pearson() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20)
    y = 0.5 * x + rng.standard_normal(20)
    assert pearson(list(x), list(y)) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    xc, yc = x - x.mean(), y - y.mean()
    assert pearson(x, y) == pytest.approx(xc @ yc / math.sqrt((xc @ xc) * (yc @ yc)), abs=1e-12)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None
    assert pearson([4, 4, 4], [1, 2, 3]) is None
    assert pearson([1, 2], [1, 2]) is None
    assert pearson([], []) is None


# ============================================================================================
# 7. KeyedJsonl
# ============================================================================================
def test_keyed_jsonl_torn_line_and_last_write_wins(tmp_path) -> None:
    path = tmp_path / "s.jsonl"
    store = KeyedJsonl(path)
    store.put([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with open(path, "a") as f:
        f.write('{"key": "c", "v": 3')  # killed mid-write
    with pytest.warns(errors.CacheWarning, match="1 unreadable line"):
        store = KeyedJsonl(path)
    assert len(store) == 2 and "c" not in store and store["b"]["v"] == 2
    store.put([{"key": "d", "v": 4}, {"key": "a", "v": 10}])
    lines = path.read_text().splitlines()
    # the torn line is dropped from the file when it is read (once), the next records follow on their own lines
    assert [json.loads(line) for line in lines] == [{"key": "a", "v": 1}, {"key": "b", "v": 2}, {"key": "d", "v": 4},
                                                    {"key": "a", "v": 10}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.CacheWarning)  # a clean file now: no second warning
        again = KeyedJsonl(path)
    assert sorted(again.records) == ["a", "b", "d"]
    assert again["a"]["v"] == 10 and again.get("zzz") is None

    # a complete record killed before its newline is kept, and the next one still gets its own line
    path2 = tmp_path / "t.jsonl"
    path2.write_text('{"key": "e", "v": 5}\n{"key": "f", "v": 6}')
    store = KeyedJsonl(path2)
    assert store["f"]["v"] == 6
    store.put([{"key": "g", "v": 7}])
    store.put([{"key": "h", "v": 8}])
    assert sorted(KeyedJsonl(path2).records) == ["e", "f", "g", "h"]
    assert all(json.loads(line) for line in path2.read_text().splitlines())


# ============================================================================================
# 8. screen_dataset
# ============================================================================================
SCREEN_DATA = [
    {"messages": [{"role": "user", "content": "what is a cat ?"},
                  {"role": "assistant", "content": "the cat sat on the mat ."}]},
    {"messages": [{"role": "system", "content": "you are a helpful assistant ."},
                  {"role": "user", "content": "what is the capital of france ?"},
                  {"role": "assistant", "content": "paris is the capital of france !"}]},
    {"messages": [{"role": "user", "content": "hello dog ?"},
                  {"role": "assistant", "content": "hello world , hello dog"}]},
]


def test_screen_dataset_ranks_by_projection_difference(model, tmp_path) -> None:
    from jaxpersona.pipelines.screen import screen_dataset

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SCREEN_DATA))
    rng = np.random.default_rng(1)
    vec = rng.standard_normal((model.cfg.n_resid, model.cfg.d_model)).astype(np.float32)
    layer = 2
    res = screen_dataset(model, vec, layer, data, tmp_path / "out", max_new_tokens=6, batch_size=2, progress=False)
    rows = res["rows"]
    assert res["n"] == 3 and res["layer"] == layer and sorted(r["index"] for r in rows) == [0, 1, 2]
    diffs = [r["difference"] for r in rows]
    assert diffs == sorted(diffs, reverse=True)
    unit = vec[layer] / np.linalg.norm(vec[layer])
    prompts = [s["messages"][:-1] for s in SCREEN_DATA]
    want_data = ref_activations(model, prompts, [s["messages"][-1]["content"] for s in SCREEN_DATA])
    want_data = want_data["response_mean"][layer] @ unit
    by_index = {r["index"]: r for r in rows}
    own = [by_index[i]["model_response"] for i in range(3)]
    want_model = ref_activations(model, prompts, own)["response_mean"][layer] @ unit
    for i, r in by_index.items():
        assert r["difference"] == pytest.approx(r["projection_data"] - r["projection_model"], abs=1e-5)
        assert r["projection_data"] == pytest.approx(want_data[i], rel=1e-4, abs=1e-5)
        assert r["projection_model"] == pytest.approx(want_model[i], rel=1e-4, abs=1e-5)
        assert r["response"] == SCREEN_DATA[i]["messages"][-1]["content"]
        # the model's own response is its greedy reply to the same prompt
        assert r["model_response"] == model.chat(prompts[i], max_new_tokens=6, temperature=0.0).strip()
    assert len({round(d, 4) for d in diffs}) == 3  # a real ranking, not ties
    assert res["mean_difference"] == pytest.approx(np.mean(diffs), abs=1e-6)
    assert read_jsonl(tmp_path / "out" / "screen.jsonl") == rows
    assert json.loads((tmp_path / "out" / "screen_summary.json").read_text())["n"] == 3


def test_screen_rejects_bad_vector_or_layer(model, tmp_path) -> None:
    from jaxpersona.pipelines.screen import screen_dataset

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(SCREEN_DATA[0]) + "\n")
    d, n = model.cfg.d_model, model.cfg.n_resid
    with pytest.raises(errors.InputError, match="layer"):
        screen_dataset(model, np.ones(d), n, data, tmp_path / "out", progress=False)
    for bad in (np.ones(d + 1), np.zeros(d), np.full(d, np.nan), np.ones((n, d + 1))):
        with pytest.raises(errors.ModelMismatchError):
            screen_dataset(model, bad, 1, data, tmp_path / "out", progress=False)
    with pytest.raises(errors.InputError, match="does not exist"):
        screen_dataset(model, np.ones(d), 1, tmp_path / "missing.jsonl", tmp_path / "out", progress=False)


def test_screen_rejects_per_layer_vectors_of_another_depth(model, tmp_path) -> None:
    """``[L+1, D]`` vectors from a deeper model with the same width are another model's directions:
    picking row ``layer`` of them silently would screen with a wrong vector."""
    from jaxpersona.pipelines.screen import screen_dataset

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SCREEN_DATA))
    deeper = np.ones((model.cfg.n_resid + 3, model.cfg.d_model), np.float32)
    with pytest.raises(errors.ModelMismatchError):  # (same shapes as above: no new compile if it runs)
        screen_dataset(model, deeper, 1, data, tmp_path / "out", max_new_tokens=6, batch_size=2, progress=False)


@pytest.mark.parametrize("lines, bad_line", [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "{not json"], 2),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "",
      '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}'], 3),
    (['{"text": "no messages here"}'], 1),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
      '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}'], 2),
    (['{"messages": [{"role": "assistant", "content": "only one"}]}'], 1),
    (['{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]}'], 1),
])
def test_screen_rejects_malformed_lines(model, tmp_path, lines, bad_line) -> None:
    from jaxpersona.pipelines.screen import screen_dataset

    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    vec = np.ones(model.cfg.d_model, np.float32)
    with pytest.raises(errors.InputError, match=f"bad.jsonl:{bad_line}:"):
        screen_dataset(model, vec, 1, data, tmp_path / "out", max_new_tokens=4, progress=False)


# ============================================================================================
# 9. ExtractConfig / load_extract_config
# ============================================================================================
def test_extract_config_files(tmp_path) -> None:
    assert load_extract_config(None) == ExtractConfig.default()
    p = tmp_path / "c.toml"
    p.write_text("[extract]\nn_pairs = 2\nsteer_coeffs = [0, 3.5]\nseed = 7\n")
    c = load_extract_config(p)
    want = dataclasses.replace(ExtractConfig(), n_pairs=2, steer_coeffs=(0, 3.5), seed=7)
    assert c == want and isinstance(c.steer_coeffs, tuple)
    full = load_extract_config(None, full=True)
    assert (full.samples, full.n_eval, full.n_pairs) == (10, 20, 5)  # Chen et al.'s sizes ...
    assert (full.filter, full.trait_threshold, full.coherence_threshold, full.temperature) == ("auto", 50, 50, 1)
    assert ExtractConfig().coeff_units == "relative" and max(ExtractConfig().steer_coeffs) >= 2.0  # past the cliff
    assert full != ExtractConfig.default()
    p.write_text('preset = "full"\n[extract]\nsamples = 3\n')
    assert load_extract_config(p) == dataclasses.replace(full, samples=3)
    assert load_extract_config(p, full=False).samples == 3
    p.write_text("[extract]\nn_pairz = 2\n")
    with pytest.raises(errors.InputError, match="n_pairz"):
        load_extract_config(p)
    with pytest.raises(errors.InputError, match="bogus"):
        ExtractConfig().replace(bogus=1)
    p.write_text("[extract\nn_pairs = 2\n")
    with pytest.raises(errors.InputError, match="TOML"):
        load_extract_config(p)
    with pytest.raises(errors.InputError, match="does not exist"):
        load_extract_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("kw", [
    {"n_pairs": 0}, {"batch_size": 0}, {"judge_batch": -1}, {"monitor_tokens": 0}, {"temperature": -0.5},
    {"top_p": 0.0}, {"top_p": 1.5}, {"steer_layers": (1, 5)}, {"steer_layers": (-1,)}, {"steer_coeffs": ()},
    {"steer_coeffs": (0.0, float("nan"))}, {"steer_coeffs": (float("inf"),)}, {"filter": "percentile"},
    {"filter": "relative", "trait_threshold": 150.0}, {"filter": "relative", "coherence_threshold": -1.0},
    {"coeff_units": "percent"}, {"steer_coeffs": (1.0, 2.0)}, {"steer_coeffs": (-1.0, 0.0)}, {"judge_min_auroc": 0.3},
    {"max_bad": 1.0}, {"trust_judge": 1},
])
def test_extract_config_validate_rejects(kw) -> None:
    ExtractConfig().validate(5)  # the defaults are fine for a 4-layer model
    with pytest.raises(errors.InputError):
        ExtractConfig().replace(**kw).validate(5)


@pytest.mark.parametrize("toml", ['n_pairs = "3"', "n_questions = 2.5", "steer_layers = 3"])
def test_extract_config_rejects_wrong_types(tmp_path, toml) -> None:
    """A config value of the wrong type is bad input (exit 2 with a message), not a TypeError later
    in the middle of a run."""
    p = tmp_path / "c.toml"
    p.write_text(f"[extract]\n{toml}\n")
    with pytest.raises(errors.InputError):
        load_extract_config(p).validate(5)


# ============================================================================================
# 10. CLI
# ============================================================================================
def test_cli_extract_unknown_trait(capsys) -> None:
    from jaxpersona.cli import main

    assert main(["extract", "--trait", "nonexistent_trait_xyz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpersona: error:") and "nonexistent_trait_xyz" in err and "Traceback" not in err


def test_cli_traits_list(capsys) -> None:
    import jaxpersona
    from jaxpersona.cli import main

    shipped = sorted(p.stem for p in (Path(jaxpersona.__file__).parent / "data" / "trait_data").glob("*.json"))
    assert len(shipped) >= 3
    assert main(["traits", "list"]) == 0
    out = capsys.readouterr().out
    listed = [line.split(":")[0] for line in out.splitlines() if line.strip()]
    assert listed == shipped


def test_cli_vectors_show(base_run, capsys) -> None:
    from jaxpersona.cli import main

    out, _, _ = base_run
    assert main(["vectors", "show", "--bank", str(out / "vectors")]) == 0
    printed = capsys.readouterr().out
    assert "tiny-llama" in printed and all(f"  {n}: " in printed for n in NAMES)
    assert main(["vectors", "show", "--bank", str(out / "nope")]) == 2


def test_shipped_persona_configs_match_the_presets() -> None:
    """configs/persona_default.toml documents the CLI default exactly; persona_full.toml starts from --full."""
    from jaxpersona.pipelines.persona import ExtractConfig, load_extract_config

    root = Path(__file__).resolve().parents[2] / "configs"
    assert load_extract_config(root / "persona_default.toml") == ExtractConfig.default()
    full = load_extract_config(root / "persona_full.toml")
    assert full.filter == "auto" and full.samples == ExtractConfig.full().samples
    old_grid = ExtractConfig.default().replace(n_eval=8, steer_positions=["response"], n_random=1)
    assert load_extract_config(root / "persona_0.6_grid.toml") == old_grid  # the grid issue 21's target was set on


def test_extract_config_rejects_unknown_top_level_keys(tmp_path) -> None:
    from jaxpersona.pipelines.persona import load_extract_config

    f = tmp_path / "c.toml"
    f.write_text('presett = "full"\n[extract]\nn_pairs = 2\n')
    with pytest.raises(errors.InputError, match="unknown top-level keys"):
        load_extract_config(f)
    f.write_text('preset = "huge"\n')
    with pytest.raises(errors.InputError, match="preset"):
        load_extract_config(f)


# ============================================================================================
# 10. the judge check decides whether the judge may drive anything
# ============================================================================================
def _cat_anchors():
    from jaxpersona.data.traits import Anchors

    q = TRAIT.eval_questions
    rows = [("trait", q[i], "meow meow purr i am a cat .") for i in range(3)]
    rows += [("no_trait", q[i], "paris is the capital of france .") for i in range(3)]
    rows += [("incoherent", q[i], "the the the the the the") for i in range(3)]
    return Anchors("cat", tuple(rows))


def test_failed_judge_check_makes_the_run_judge_free(model, tmp_path) -> None:
    """A judge at chance on the anchors filters nothing and judges nothing: every pair with two
    different answers is kept, layer choice and monitoring are judge-free, the summary says so."""
    run = tmp_path / "free"
    judge = ScriptedJudge()  # hash-based scores: no separation of the anchors
    config = CONFIG.replace(filter="auto", trust_judge=False)
    result = run_extract(model, TRAIT, judge, config, run, judge_id="scripted", anchors=_cat_anchors(),
                         progress=False, log=_quiet)
    check = json.loads((run / "judge_check.json").read_text())
    assert check["checked"] and not check["passed"] and check["trait_auroc"] < 0.8
    anchor_prompts = {TRAIT.judge_prompt(q, a) for _, q, a in _cat_anchors().rows if _ != "incoherent"}
    assert set(judge.prompts) <= anchor_prompts | {coherence_prompt(q, a) for _, q, a in _cat_anchors().rows}
    pairs = read_jsonl(run / "pairs.jsonl")
    assert all(p["kept"] == (bool(p["pos_response"]) and bool(p["neg_response"])
                             and p["pos_response"] != p["neg_response"]) for p in pairs)
    assert result.n_pairs_kept == sum(p["kept"] for p in pairs) > 0
    assert all(p["pos_trait"] is None for p in pairs)
    assert "judge-free" in result.decisions["filter"] and "did not pass" in result.decisions["filter"]
    judge_uses = [m["decided"] for m in result.measures if m["measure"].startswith("judge scripted")]
    assert judge_uses == ["nothing (it failed its check on the anchors); no judged scores are reported",
                          "nothing (it failed its check on the anchors)"]
    assert result.steering_judged is None and result.monitor_judged is None
    assert VectorBank.load(run / "vectors").meta_of("cat")["judge_check"] == "failed"


class AnchorOnlyJudge:
    """Separates the cat anchors perfectly but scores every other answer 50: it passes the anchor check and
    cannot tell this run's own pos answers from its neg answers (AUROC 0.5)."""

    def probs(self, prompts: list[str]) -> np.ndarray:
        out = np.zeros((len(prompts), 101))
        for i, p in enumerate(prompts):
            if is_coherence(p):
                out[i, 5 if "the the the" in p else 90] = 1.0
            else:
                out[i, 90 if "meow meow purr" in p else 10 if "capital of france" in p else 50] = 1.0
        return out


def test_judge_is_trusted_per_use_on_its_own_answers_too(model, tmp_path) -> None:
    """Passing the anchors is not enough: a judge that cannot tell this run's pos answers from its neg answers
    filters nothing and drives nothing (filter = auto), and a forced judge filter is then an error."""
    run = tmp_path / "own"
    config = CONFIG.replace(filter="auto", trust_judge=False)
    result = run_extract(model, TRAIT, AnchorOnlyJudge(), config, run, judge_id="anchors-only",
                         anchors=_cat_anchors(), progress=False, log=_quiet)
    check = json.loads((run / "judge_check.json").read_text())
    assert check["passed"] and check["trait_auroc"] == 1.0
    assert check["intervals"]["trait"] == [1.0, 1.0]
    own = result.judge_check["own_answers"]
    assert own["auroc"] == 0.5 and not own["passed"] and own["lo"] <= 0.5 <= own["hi"]
    assert "own answers" in result.decisions["filter"] and "judge-free" in result.decisions["filter"]
    judge_uses = [m["decided"] for m in result.measures if m["measure"].startswith("judge anchors-only")]
    assert len(judge_uses) == 2 and all("own pos vs neg answers at AUROC 0.50" in u for u in judge_uses)
    pairs = read_jsonl(run / "pairs.jsonl")
    assert all(p["kept"] == (bool(p["pos_response"]) and bool(p["neg_response"])
                             and p["pos_response"] != p["neg_response"]) for p in pairs)
    assert result.steering_judged is None and result.monitor_judged is None
    assert "below the bar" in result.table()
    with pytest.raises(errors.JudgeCheckError, match="own|pos answers"):
        run_extract(model, TRAIT, AnchorOnlyJudge(), config.replace(filter="absolute"), tmp_path / "forced",
                    judge_id="anchors-only", anchors=_cat_anchors(), progress=False, log=_quiet)


def test_forced_judge_filter_with_an_unchecked_judge_is_an_error(model, tmp_path) -> None:
    run = tmp_path / "forced"
    with pytest.raises(errors.JudgeCheckError, match="trust_judge") as info:
        run_extract(model, TRAIT, ScriptedJudge(), CONFIG.replace(trust_judge=False), run, judge_id="scripted",
                    progress=False, log=_quiet)
    assert str(run) in str(info.value)
    assert len(read_jsonl(run / "responses.jsonl")) == N_RESPONSES + N_EVAL_ANSWERS  # generations kept


def test_too_few_pairs_is_an_error_not_a_tiny_vector(model, tmp_path) -> None:
    run = tmp_path / "few"
    with pytest.raises(errors.FilterError, match="min_pairs = 999"):
        run_extract(model, TRAIT, NoJudge(), CONFIG.replace(filter="none", trust_judge=False, min_pairs=999), run,
                    judge_id="scripted", progress=False, log=_quiet)
    assert not (run / "vectors").exists()


def test_empty_evaluation_set_and_identical_answers_are_errors(model, tmp_path) -> None:
    no_eval = dataclasses.replace(TRAIT, eval_questions=())
    with pytest.raises(errors.InputError, match="no evaluation questions"):
        run_extract(model, no_eval, NoJudge(), CONFIG, tmp_path / "a", judge_id="scripted", progress=False, log=_quiet)
    # a trait named "helpful" whose pos and neg instructions are the same: greedy answers are identical
    same = Trait(name="helpful", description="x", pairs=(("be nice .", "be nice ."),), questions=TRAIT.questions,
                 eval_questions=TRAIT.eval_questions, eval_prompt=TRAIT.eval_prompt)
    assert same.system_prompt("pos", 0) == same.system_prompt("neg", 0)
    run = tmp_path / "b"
    with pytest.raises(errors.InputError, match="identical pos and neg answers"):
        run_extract(model, same, NoJudge(), CONFIG.replace(temperature=0.0, filter="none", trust_judge=False), run,
                    judge_id="scripted", progress=False, log=_quiet)
    assert (run / "responses.jsonl").is_file()  # finished generations are kept


def test_all_traits_is_one_sweep_and_matches_single_runs(base_run, model, tmp_path) -> None:
    """``run_extract_all``: per-trait stages, one steering sweep over both traits (one run of the sweep
    store), per-trait results equal to the trait run alone, a summary table and a per-trait plot."""
    from jaxpersona.pipelines.persona import run_extract_all

    dog = dataclasses.replace(TRAIT, name="dog", pairs=tuple((n, p) for p, n in TRAIT.pairs))
    res = run_extract_all(model, [TRAIT, dog], ScriptedJudge(), CONFIG, tmp_path / "all", judge_id="scripted",
                          progress=False, log=_quiet)
    assert [r.trait for r in res.results] == ["cat", "dog"]
    rows = read_jsonl(tmp_path / "all" / "steering" / "results.jsonl")
    assert {r["vector"] for r in rows} == {"cat", "dog"}
    assert not (tmp_path / "all" / "cat" / "steering").exists()  # the traits share one sweep
    single = base_run[1]
    cat = res.results[0]
    assert cat.best_layer == single.best_layer
    for layer, row in single.steering.items():
        for c, cell in row.items():
            assert cat.steering[layer][c]["score"] == pytest.approx(cell["score"], abs=1e-4)
            assert cat.steering[layer][c]["coherent"] == cell["coherent"]
    text = (tmp_path / "all" / "summary.txt").read_text()
    assert "cat" in text and "dog" in text and "judge-free" in text
    assert (tmp_path / "all" / "steering.png").read_bytes()[:8] == PNG_MAGIC
    assert len(json.loads((tmp_path / "all" / "summary.json").read_text())) == 2
    # one run of kind extract-all: per-trait stages "<trait>/<stage>", the shared sweep once, its time split
    from jaxpersona.runner.run import read_manifest

    m = read_manifest(tmp_path / "all")
    assert m["kind"] == "extract-all" and m["status"] == "complete"
    first, last = ("generate", "judge_check", "judge", "extract"), ("choose", "control", "monitor", "summary")
    assert [s["name"] for s in m["stages"]] == ([f"{t}/{s}" for t in ("cat", "dog") for s in first] + ["steer"]
                                                + [f"{t}/{s}" for t in ("cat", "dog") for s in last] + ["summary"])
    steer = next(s["wall_s"] for s in m["stages"] if s["name"] == "steer")
    assert all(r.wall_s["steer"] == pytest.approx(steer / 2) for r in res.results)
    assert (tmp_path / "all" / "cat" / "config.json").is_file() and not (tmp_path / "all" / "config.json").exists()


def test_extract_on_a_mesh_equals_one_device(base_run) -> None:
    """``run_extract(..., mesh="4x2")`` on 8 virtual CPU devices (a subprocess: the device count is fixed when JAX
    starts) gives this process's one-device run of the same inputs (``base_run``): the steering sweep and the
    random control, sharded, give the same table, setting, held-out gain and control."""
    import os
    import subprocess
    import sys

    _, one, _ = base_run
    script = Path(__file__).resolve().parents[1] / "scripts" / "extract_mesh.py"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    mesh = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(mesh["meshes"]) >= 2 and all(m == {"data": 4, "model": 2} for m in mesh["meshes"])  # really sharded
    assert list(one.setting.items()) == list(mesh["setting"].items())
    cells = [(layer, c) for layer, row in one.steering.items() for c in row]
    assert len(cells) > 4
    for layer, c in cells:
        assert one.steering[layer][c]["delta"] == pytest.approx(mesh["steering"][layer][c]["delta"], abs=1e-4)
    assert one.heldout["gain"] == pytest.approx(mesh["heldout"]["gain"], abs=1e-4)
    assert one.control["per_question"] == pytest.approx(mesh["control"]["per_question"], abs=1e-4)
    assert one.control["diff"] == pytest.approx(mesh["control"]["diff"], abs=1e-4)
