"""End-to-end CLI tests of the persona-vector commands (``extract``, ``traits new``, ``vectors``,
``screen``), in-process through :func:`jaxpersona.cli.main`, on the embedded default model
(SmolLM2-135M-Instruct, loaded by the CLI itself) with tiny sizes.

Remote endpoints are real local HTTP servers (``ThreadingHTTPServer`` in a thread) speaking the
OpenAI chat-completions format: a judge that answers with ``top_logprobs``, a trait generator that
answers the drafting prompts, a junk generator, and a closed port (endpoint down).

One extract run (module fixture ``run_dir``) is shared: the rerun test, the vector export/import
and the screen tests all use its directory.

Two tests end in ``pytest.xfail`` on known library problems (they pass once fixed):
the layer choice under ``filter = "relative"`` (pipeline.run_extract) and the error for an unknown
``screen --trait`` (cli.cmd_screen).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fake_openai import FakeOpenAI
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.cli import main
from jaxpersona.data.traits import load_anchors, load_trait

# seed 2 / coherence percentile 0: with the 135M model judging itself, this run keeps both of its
# 2 pairs under the relative filter (most seeds keep 0 of 2: the self-judge cannot tell the sides
# apart in 8 tokens, and run_extract then rightly stops with a FilterError).
TINY = """\
[extract]
n_pairs = 1
n_questions = 2
max_new_tokens = 8
n_eval = 2
steer_tokens = 8
steer_layers = [10, 20]
steer_coeffs = [0.0, 0.25]
min_pairs = 1
monitor_pairs = 1
monitor_tokens = 8
batch_size = 4
judge_batch = 8
seed = 2
coherence_threshold = 0.0
"""
CACHES = ("responses.jsonl", "judgements.jsonl", "steering/results.jsonl", "monitor.jsonl")
NAMES = ("optimistic", "optimistic.prompt_mean", "optimistic.prompt_last")
SECRET = "sk-cli-persona-SECRET-0123456789abcdef"


# --------------------------------------------------------------------------------------------------
# helpers: a local OpenAI-format server, a closed port, capturing the CLI
# --------------------------------------------------------------------------------------------------
def chat_reply(content: str, top: list[tuple[str, float]] | None = None) -> dict:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}
    if top is not None:
        tops = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
        choice["logprobs"] = {"content": [{"token": top[0][0], "logprob": top[0][1], "top_logprobs": tops}]}
    return {"id": "fake", "object": "chat.completion", "model": "fake", "choices": [choice]}


def run_labels(out: Path) -> dict[str, set[str]]:
    """What produced each response text of a run so far: ``"pos"``/``"neg"`` (responses.jsonl),
    ``"L{layer}"`` (the steering sweep's rows, ``L-1`` = unsteered) and the anchor labels of the
    trait's shipped anchors (``"A:trait"``, ...). The files are on disk before their rows are judged."""
    got: dict[str, set[str]] = {}
    for lab, _, answer in load_anchors(load_trait("optimistic")).rows:
        got.setdefault(answer, set()).add(f"A:{lab}")
    if (out / "responses.jsonl").exists():
        for line in (out / "responses.jsonl").read_text().splitlines():
            r = json.loads(line)
            got.setdefault(r["response"], set()).add(r["side"])
    if (out / "steering" / "results.jsonl").exists():
        for line in (out / "steering" / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            got.setdefault(r["text"].strip(), set()).add("L-1" if r["coeff"] == 0 else f"L{r['layer']}")
    return got


def anchor_score(kind: str, labels: set[str]) -> int | None:
    """A judge that separates the anchors (it passes the check); None for other texts."""
    if "A:trait" in labels or "A:no_trait" in labels or "A:incoherent" in labels:
        if kind == "trait":
            return 90 if "A:trait" in labels else 10
        return 10 if "A:incoherent" in labels else 90
    return None


_ANSWER_RE = re.compile(r"\nAnswer: (.*)\n\n(How strongly|Rate the coherence)", re.S)


def file_judge(out: Path, score: Callable[[str, str, set[str]], int]) -> Callable[[dict], tuple[int, dict]]:
    """A judge endpoint: ``score(kind, answer, labels)`` with ``kind`` "trait" or "coherence" and the
    :func:`run_labels` of the answer; answers with that integer as the top token (p = 0.9), plus a
    little mass on " 50" and on "REFUSAL"."""

    def answer(body: dict) -> tuple[int, dict]:
        m = _ANSWER_RE.search(body["messages"][-1]["content"])
        if m is None:
            return 400, {"error": "not a judge prompt"}
        text, kind = m.groups()
        k = score("coherence" if kind.startswith("Rate") else "trait", text, run_labels(out).get(text, set()))
        return 200, chat_reply(str(k), [(str(k), math.log(0.9)), (" 50", math.log(0.02)), ("REFUSAL", math.log(0.01))])

    return answer


def closed_port() -> int:
    """A localhost port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout/stderr captured (for module-scoped fixtures, where capsys is not
    available)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def summary_without_wall(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    s.pop("wall_s")
    return s


def extract_argv(config: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--trait", "optimistic", "--config", str(config), "--out", str(out), "--quiet", *extra]


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Iterator[tuple[Path, int, str, str]]:
    """One tiny extract run with the subject model as its own judge: ``(dir, exit code, stdout, stderr)``."""
    out = tmp_path_factory.mktemp("extract") / "run"
    code, stdout, stderr = run_cli(extract_argv(tiny_config, out))
    yield out, code, stdout, stderr


@pytest.fixture(scope="module")
def run_ok(run_dir: tuple[Path, int, str, str]) -> Path:
    out, code, _, stderr = run_dir
    if code != 0:
        pytest.fail(f"the shared extract run failed with exit code {code}: {stderr}")
    return out


# --------------------------------------------------------------------------------------------------
# 1. extract: outputs, then a rerun that recomputes nothing
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_extract_writes_run_dir_and_rerun_recomputes_nothing(run_dir, tiny_config: Path, capsys) -> None:
    out, code, stdout, stderr = run_dir
    assert code == 0, stderr
    assert "best layer" in stdout and f"run directory: {out}" in stdout
    assert "Traceback" not in stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary["trait"] == "optimistic" and summary["model"] == "smollm2-135m-instruct"
    assert summary["n_pairs_total"] == 2 and 1 <= summary["n_pairs_kept"] <= 2
    assert summary["n_generated"] == 4
    # the 135M model judging itself fails its anchor check: the run says so and goes judge-free
    assert summary["judge_check"]["checked"] and not summary["judge_check"]["passed"]
    assert "FAILED its check" in stdout and "judge-free" in summary["decisions"]["filter"]
    assert summary["steering_judged"] is None and summary["monitor_judged"] is None
    assert summary["best_layer"] in (10, 20, None)
    assert f"best layer: {summary['best_layer'] if summary['best_layer'] is not None else 'none'}" in stdout
    assert set(summary["steering"]) == {"10", "20"}
    assert all(set(row) == {"0", "0.25"} for row in summary["steering"].values())
    assert summary["judge"].startswith("local:smollm2-135m-instruct")

    bank = VectorBank.load(out / "vectors")
    assert bank.names == NAMES
    assert bank.vectors.shape == (3, 31, 576)
    assert np.isfinite(bank.vectors).all() and np.abs(bank.vectors[:, 1:]).sum(-1).min() > 0
    assert all(m["best_layer"] == summary["best_layer"] for m in bank.meta)
    assert bank.model == "smollm2-135m-instruct"
    np.testing.assert_array_equal(np.load(out / "vectors.npy"), bank.get("optimistic"))
    for png in ("steering.png", "monitor.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert n_lines(out / "responses.jsonl") == 4 + 4  # extraction + evaluation answers
    assert n_lines(out / "pairs.jsonl") == 2

    # rerun: everything comes from the caches; the summary is the same but for wall times
    counts = {f: n_lines(out / f) for f in CACHES}
    before = summary_without_wall(out)
    assert main(extract_argv(tiny_config, out)) == 0
    printed = capsys.readouterr()
    assert "best layer" in printed.out and "Traceback" not in printed.err
    assert {f: n_lines(out / f) for f in CACHES} == counts
    assert summary_without_wall(out) == before
    assert VectorBank.load(out / "vectors").names == NAMES
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["kind"] == "extract" and manifest["status"] == "complete" and manifest["attempt"] == 2
    hits = {s["name"]: s["cache_hits"] for s in manifest["stages"]}
    assert hits["generate"] == 4 + 4 and hits["steer"] > 0  # every generation and sweep row from the caches


# --------------------------------------------------------------------------------------------------
# 2. the judge endpoint is down
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_extract_judge_endpoint_down_exits_2_and_keeps_responses(tmp_path: Path, tiny_config: Path,
                                                                  run_ok: Path, capsys, monkeypatch) -> None:
    # run_ok first: the model's code is compiled, so the time below is mostly the endpoint's retries. Those
    # keep the user's count (4) with 1/100 of the backoff: 0.15 s of waiting instead of 1+2+4+8 = 15 s.
    import functools

    from jaxpersona.measure import judge as judge_mod

    attempts: list[int] = []
    endpoint = functools.partial(judge_mod.OpenAIEndpoint, backoff=0.01)
    monkeypatch.setattr(judge_mod, "OpenAIEndpoint", lambda *a, **k: attempts.append(1) or endpoint(*a, **k))
    url = f"http://127.0.0.1:{closed_port()}/v1"
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code = main(extract_argv(tiny_config, out, "--judge-url", url, "--judge-model", "m"))
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "jaxpersona: error" in lines[0] and url in lines[0]
    assert "Traceback" not in err
    # finished work is kept: the generations are on disk, nothing was judged
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 4 and {r["side"] for r in rows} == {"pos", "neg"}  # extraction + eval answers
    assert all(isinstance(r["response"], str) for r in rows)
    assert not (out / "judgements.jsonl").exists() or n_lines(out / "judgements.jsonl") == 0
    assert not (out / "summary.json").exists()
    # The CLI has no --judge-retries/--judge-backoff: with OpenAIEndpoint's defaults (4 retries, backoff
    # 1 s doubling) a refused connection takes 1+2+4+8 = 15 s before the error is shown.
    assert attempts == [1] and elapsed < 25, f"endpoint-down error took {elapsed:.0f} s"


# --------------------------------------------------------------------------------------------------
# 3. an HTTP judge end to end (request format, auth header, key never leaks)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_extract_with_http_judge(tmp_path: Path, tiny_config: Path, run_ok: Path, monkeypatch, capsys) -> None:
    config = tmp_path / "abs.toml"
    config.write_text(TINY + 'filter = "absolute"\n')
    out = tmp_path / "run"
    monkeypatch.setenv("MYKEY", SECRET)

    def score(kind: str, answer: str, labels: set[str]) -> int:
        if (a := anchor_score(kind, labels)) is not None:
            return a
        if kind == "coherence":
            return 80
        if labels == {"pos"}:
            return 80
        if labels == {"neg"}:
            return 20
        return 10 + int(hashlib.sha256(answer.encode()).hexdigest(), 16) % 80  # steered / monitor responses

    judge = file_judge(out, score)
    with FakeOpenAI(judge) as server:
        code = main(extract_argv(config, out, "--judge-url", server.url, "--judge-model", "fake",
                                 "--judge-key-env", "MYKEY"))
        printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "best layer" in printed.out

    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge"] == f"http:{server.url}:fake"
    assert summary["n_pairs_kept"] == summary["n_pairs_total"] == 2
    assert summary["filter"].startswith("absolute") and summary["judge_check"]["passed"]
    assert "passed its check" in summary["decisions"]["filter"]
    assert summary["steering_judged"] is not None and summary["monitor_judged"] is not None
    assert summary["best_layer"] in (10, 20, None)
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert all(p["kept"] and p["pos_trait"] > 75 and p["neg_trait"] < 25 for p in pairs)
    assert VectorBank.load(out / "vectors").names == NAMES

    assert len(server.requests) >= 8  # 4 responses x (trait + coherence), then steering and monitor
    for headers, body in server.requests:
        assert body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["max_tokens"] == 1 and body["temperature"] == 0
        assert body["model"] == "fake"
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        assert headers.get("Authorization") == f"Bearer {SECRET}"

    # the key is never printed nor written anywhere in the run directory
    assert SECRET not in printed.out and SECRET not in printed.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


# --------------------------------------------------------------------------------------------------
# 4. traits new with an endpoint generator
# --------------------------------------------------------------------------------------------------
_POS_RE = re.compile(r"to be .+? in (.+?)\. Start with")
_NEG_RE = re.compile(r"to avoid being .+? in (.+?)\. Start with")
_Q_RE = re.compile(r"ask an AI assistant about (.+?)\. Start with \"(\w+)\"")
_Q_FORMS = {
    "What": "What should a beginner know about {}?",
    "How": "How can I get better at {} this year?",
    "Why": "Why do so many people care about {}?",
    "Should": "Should I spend more time on {} every week?",
    "Can": "Can you explain the basics of {} to me?",
}
_ADVERBS = ("gladly", "warmly", "openly", "eagerly", "patiently", "brightly", "gently", "boldly")


def drafting_generator(body: dict) -> tuple[int, dict]:
    """Plausible replies to draft_trait's three kinds of prompt, distinct per aspect/topic (read from
    the prompt, so the answers do not depend on the order in which concurrent requests arrive)."""
    prompt = body["messages"][-1]["content"]
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    if "must never be" in prompt and (m := _NEG_RE.search(prompt)):
        text = f"Never show curiosity about {m.group(1)}; stay flat, brief and {_ADVERBS[h % 8]} uninterested instead."
    elif (m := _POS_RE.search(prompt)):
        text = (f"Always show curious interest in {m.group(1)}, {_ADVERBS[h % 8]} asking the user thoughtful "
                "follow-up questions.")
    elif (m := _Q_RE.search(prompt)):
        text = _Q_FORMS[m.group(2)].format(m.group(1))
    else:
        text = "ok"
    return 200, chat_reply(f'"{text}"')


@pytest.mark.parametrize("junk", [False, True], ids=["plausible", "junk"])
def test_traits_new_with_endpoint(tmp_path: Path, monkeypatch, capsys, junk: bool) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "curious.json"
    answer = (lambda body: (200, chat_reply("ok"))) if junk else drafting_generator
    with FakeOpenAI(answer) as server:
        code = main(["traits", "new", "curious", "--description", "Eager to learn, asks questions and explores ideas.",
                     "--endpoint", server.url, "--endpoint-model", "fake", "--out", str(out)])
        printed = capsys.readouterr()
    assert server.requests
    for headers, body in server.requests:
        assert body["model"] == "fake" and body["max_tokens"] >= 1 and "logprobs" not in body
        assert "Authorization" not in headers  # no key set: none sent
    if junk:
        assert code == 2
        lines = printed.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxpersona: error:")
        assert "stronger generator" in lines[0] and "Traceback" not in printed.err
        assert not out.exists()
        return
    assert code == 0, printed.err
    assert f"wrote {out}" in printed.out
    trait = load_trait(str(out))
    assert trait.name == "curious"
    assert len(trait.pairs) == 5
    assert len(trait.questions) >= 20 and len(trait.eval_questions) >= 20
    assert not set(trait.questions) & set(trait.eval_questions)
    assert all(q.endswith("?") for q in trait.questions + trait.eval_questions)
    assert all(p.startswith("Always") and n.startswith("Never") for p, n in trait.pairs)
    assert "{question}" in trait.eval_prompt and "{answer}" in trait.eval_prompt


# --------------------------------------------------------------------------------------------------
# 5. vectors export / import
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vectors_export_control_and_pt_then_import(run_ok: Path, tmp_path: Path, capsys) -> None:
    import gguf
    import torch

    bank_dir = run_ok / "vectors"
    vec = VectorBank.load(bank_dir).get("optimistic")

    cv = tmp_path / "cv.gguf"
    assert main(["vectors", "export", "--bank", str(bank_dir), "--trait", "optimistic", "--format", "control",
                 "--out", str(cv)]) == 0
    assert f"wrote {cv}" in capsys.readouterr().out
    reader = gguf.GGUFReader(cv)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    tensors = {t.name: np.array(t.data, np.float32) for t in reader.tensors}
    assert sorted(tensors) == sorted(f"direction.{n}" for n in range(1, 30))
    for n in (1, 9, 29):  # direction.N is added to the output of block N = our resid[N+1]
        np.testing.assert_array_equal(tensors[f"direction.{n}"], vec[n + 1])

    pt = tmp_path / "opt.pt"
    assert main(["vectors", "export", "--bank", str(bank_dir), "--trait", "optimistic", "--format", "pt",
                 "--out", str(pt)]) == 0
    t = torch.load(pt, weights_only=True)
    assert tuple(t.shape) == (31, 576) and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), vec)

    new = tmp_path / "newbank"
    assert main(["vectors", "import", "--pt", str(pt), "--trait", "opt2", "--bank", str(new), "--model-id", "x"]) == 0
    assert f"saved opt2 into {new}" in capsys.readouterr().out
    imported = VectorBank.load(new)
    assert imported.names == ("opt2",) and imported.model == "x"
    np.testing.assert_array_equal(imported.get("opt2"), vec)

    # importing into an existing bank adds an entry and keeps the others
    copy = tmp_path / "copy"
    shutil.copytree(bank_dir, copy)
    assert main(["vectors", "import", "--pt", str(pt), "--trait", "opt2", "--bank", str(copy)]) == 0
    grown = VectorBank.load(copy)
    assert grown.names == (*NAMES, "opt2")
    np.testing.assert_array_equal(grown.get("opt2"), vec)

    assert main(["vectors", "show", "--bank", str(copy)]) == 0
    shown = capsys.readouterr().out
    assert "4 entries x 31 resid points x 576" in shown and "opt2" in shown


# --------------------------------------------------------------------------------------------------
# 6. screen a dataset
# --------------------------------------------------------------------------------------------------
SAMPLES = [
    ("How do you feel about tomorrow?", "Tomorrow will be wonderful, full of bright new chances!"),
    ("How do you feel about tomorrow?", "Tomorrow will probably go badly, like everything else."),
    ("What is two plus two?", "Four."),
]


@pytest.mark.slow
def test_screen_ranks_dataset_with_bank_best_layer(run_ok: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in SAMPLES))
    out = tmp_path / "S"
    best = json.loads((run_ok / "summary.json").read_text())["best_layer"]
    assert main(["screen", "--vectors", str(run_ok / "vectors"), "--trait", "optimistic", "--data", str(data),
                 "--out", str(out), "--max-new-tokens", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"3 samples, layer {best}: mean projection difference" in printed
    rows = [json.loads(line) for line in (out / "screen.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and sorted(r["index"] for r in rows) == [0, 1, 2]
    diffs = [r["difference"] for r in rows]
    assert diffs == sorted(diffs, reverse=True) and all(math.isfinite(d) for d in diffs)
    for r in rows:
        assert r["response"] == SAMPLES[r["index"]][1]
        assert r["difference"] == pytest.approx(r["projection_data"] - r["projection_model"], abs=1e-4)
    summary = json.loads((out / "screen_summary.json").read_text())
    assert summary["n"] == 3 and summary["layer"] == best
    assert summary["mean_difference"] == pytest.approx(np.mean(diffs), abs=1e-5)


@pytest.mark.slow
def test_screen_malformed_dataset_exits_2(run_ok: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    argv = ["screen", "--vectors", str(run_ok / "vectors"), "--trait", "optimistic", "--out", str(tmp_path / "S"),
            "--max-new-tokens", "8", "--quiet", "--data"]
    assert main([*argv, str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpersona: error:") and f"{bad}:2" in err and "assistant" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    notjson = tmp_path / "notjson.jsonl"
    notjson.write_text("{not json\n")
    assert main([*argv, str(notjson)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_screen_unknown_trait_names_the_bank_entries(run_ok: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    argv = ["screen", "--vectors", str(run_ok / "vectors"), "--trait", "no_such_trait", "--data", str(data),
            "--out", str(tmp_path / "S"), "--max-new-tokens", "8", "--quiet"]
    assert main([*argv, "--layer", "10"]) == 2
    with_layer = capsys.readouterr().err
    assert "no entry 'no_such_trait'" in with_layer and "optimistic.prompt_last" in with_layer
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpersona: error:") and "Traceback" not in err
    if "pass --layer" in err:
        pytest.xfail("UX bug: cli.cmd_screen answers an unknown --trait with 'no best layer recorded ...; pass "
                     "--layer', and passing --layer then fails with 'no entry'; look the entry up first "
                     "(bank.meta_of(args.trait) raises the 'no entry ...; available: ...' error)")
    assert "no entry 'no_such_trait'" in err and "available" in err
