"""Faults in ``space`` and ``consistency`` run directories (on the tiny llama): every cached stage file cut
short is recomputed with one :class:`~jaxpersona.errors.CacheWarning` and the same summary; a ``space``
process SIGKILLed in the middle of a stage resumes to the summary of an uninterrupted run; a directory
from before ``run.json`` resumes without redoing work; the cache keys are the pre-0.5 ones (pinned); a
finished run's ``run.json``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.data.roles import load_roles
from jaxpersona.pipelines import space
from jaxpersona.pipelines.consistency import ConsistencyConfig, run_consistency
from jaxpersona.pipelines.space import SpaceConfig, run_space
from jaxpersona.runner.run import read_manifest
from test_pipeline import CountingModel, full_word_tokenizer, read_jsonl
from test_space import SCRIPTS, SPACE, TEMPLATE, RoleJudge, make_role_dir

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent

# Cache keys written by the pre-move code (jaxpersona at 7941f5d, flat modules) for these runs: a change in
# any of them would make every existing run directory redo its work.
PINNED = {
    "model_fingerprint": "332bfd168befc90a184f171a",
    "responses": "4b1094788009f16ad9b50e92",  # sha256 of the 18 sorted responses.jsonl keys, first 24 hex
    "activations": "a2c84cedd48b76a113807f59",
    "drift": "5e8960ca98ec2f29242548e1",
    "judgements": "15e730d4dce7b465aae26eaf",  # sha256 of the 14 sorted judgements.jsonl keys (judge "role")
}
SPACE_STAGES = ["generate", "judge", "activations", "vectors", "capping", "drift", "plots", "summary"]
CONS = dict(n_personas=3, n_questions=2, seeds=3, temperatures=(1.0,), max_new_tokens=5, batch_size=4, n_boot=200,
            turn_scripts=1, turn_tokens=4, mix_questions=2)


def _keys_digest(path: Path) -> str:
    keys = sorted(r["key"] for r in read_jsonl(path))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


def _no_wall(summary: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in summary.items() if k != "wall_s"}, sort_keys=True, default=float)


def _cut(path: Path) -> None:
    """Keep the first half of the file's bytes; for JSONL, end inside a record (neither just after a line
    nor just before its newline: a whole last record would parse)."""
    data = path.read_bytes()
    n = len(data) // 2
    while path.suffix == ".jsonl" and n > 1 and b"\n" in (data[n - 1:n], data[n:n + 1]):
        n -= 1
    path.write_bytes(data[:n])


def _one_cache_warning(record: Any) -> None:
    got = [w for w in record if issubclass(w.category, errors.CacheWarning)]
    assert len(got) == 1, [str(w.message) for w in got]


@pytest.fixture(scope="module")
def model(tiny_llama) -> CountingModel:
    return CountingModel(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(TEMPLATE), "tiny-llama")


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory) -> dict[str, Any]:
    """An uninterrupted judge-free run and a judged one (the judge passes its role check)."""
    root = tmp_path_factory.mktemp("space_faults")
    roles = load_roles(make_role_dir(root))
    config = SpaceConfig().replace(**SPACE)
    plain = run_space(model, roles, SCRIPTS, None, config, root / "plain", progress=False, log=lambda _: None)
    answers = read_jsonl(root / "plain" / "answers.jsonl")
    role_ans = {a["response"] for a in answers if a["role"] != "default" and a["response"]}
    dflt_ans = {a["response"] for a in answers if a["role"] == "default"}
    judge = RoleJudge({f"answer : {a}" for a in role_ans - dflt_ans})
    (root / "judged").mkdir()
    shutil.copy(root / "plain" / "responses.jsonl", root / "judged" / "responses.jsonl")
    judged = run_space(model, roles, SCRIPTS, judge, config, root / "judged", judge_id="role", progress=False,
                       log=lambda _: None)
    assert judged.summary["judge"]["passed"]
    return {"root": root, "roles": roles, "config": config, "judge": judge, "plain": plain.summary,
            "judged": judged.summary}


def _rerun(model, runs, src: str, dst: Path, **kw: Any) -> dict[str, Any]:
    judge = runs["judge"] if src == "judged" else None
    return run_space(model, runs["roles"], SCRIPTS, judge, runs["config"], dst, judge_id="role" if judge else "none",
                     progress=False, log=lambda _: None, **kw).summary


# ============================================================================================
# keys, run.json, legacy directories
# ============================================================================================
def test_cache_keys_are_the_pre_move_ones(runs, model) -> None:
    from jaxpersona.compute.handle import model_fingerprint

    root = runs["root"]
    assert model_fingerprint(model) == PINNED["model_fingerprint"]
    assert _keys_digest(root / "plain" / "responses.jsonl") == PINNED["responses"]
    with np.load(root / "plain" / "activations.npz") as got:
        assert str(got["key"]) == PINNED["activations"]
    assert [r["key"] for r in read_jsonl(root / "plain" / "drift.jsonl")] == [PINNED["drift"]]
    assert _keys_digest(root / "judged" / "judgements.jsonl") == PINNED["judgements"]
    with np.load(root / "judged" / "activations.npz") as got:
        assert str(got["key"]) == PINNED["activations"]


def test_finished_space_run_has_its_manifest(runs) -> None:
    m = read_manifest(runs["root"] / "plain")
    assert m is not None and m["kind"] == "space" and m["status"] == "complete" and m["attempt"] == 1
    assert [s["name"] for s in m["stages"]] == SPACE_STAGES
    assert all(s["status"] == "complete" and s["wall_s"] >= 0 for s in m["stages"])
    assert m["model"]["digest"] == PINNED["model_fingerprint"] and m["seeds"] == {"seed": 0}
    arts = {a for s in m["stages"] for a in s["artifacts"]}
    assert {"activations.npz", "answers.jsonl", "pca.json", "capping.json", "summary.json", "summary.txt"} <= arts
    assert set(runs["plain"]["wall_s"]) == {*SPACE_STAGES[:6], "total"}
    judged = read_manifest(runs["root"] / "judged")
    assert judged["stages"][0]["cache_hits"] == 18  # every answer came from the copied responses.jsonl


def test_directory_from_before_run_json_resumes_without_redoing_work(runs, model, tmp_path, monkeypatch) -> None:
    out = tmp_path / "old"
    shutil.copytree(runs["root"] / "plain", out)
    for name in ("run.json", ".run.lock"):
        (out / name).unlink()
    monkeypatch.setattr(space, "run_drift", lambda *a, **k: (_ for _ in ()).throw(AssertionError("drift redone")))
    model.calls.clear()
    again = _rerun(model, runs, "plain", out)
    assert model.calls == [] and _no_wall(again) == _no_wall(runs["plain"])
    m = read_manifest(out)
    assert m["legacy"] and m["status"] == "complete"
    hits = {s["name"]: s["cache_hits"] for s in m["stages"]}
    assert hits["generate"] == 18 and hits["activations"] == 1 and hits["drift"] == 1


# ============================================================================================
# cached stage files cut short
# ============================================================================================
@pytest.mark.parametrize("src, name", [("plain", "responses.jsonl"), ("plain", "activations.npz"),
                                       ("plain", "drift.jsonl"), ("judged", "judgements.jsonl")])
def test_space_cache_cut_short_is_recomputed(runs, model, tmp_path, src, name) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / src, out)
    _cut(out / name)
    model.calls.clear()
    with pytest.warns(errors.CacheWarning) as record:
        again = _rerun(model, runs, src, out)
    _one_cache_warning(record)
    assert _no_wall(again) == _no_wall(runs[src])
    hits = {s["name"]: s["cache_hits"] for s in read_manifest(out)["stages"]}
    if name == "responses.jsonl":
        assert model.calls and hits["generate"] < 18
    elif name == "activations.npz":
        assert hits["activations"] == 0
    elif name == "drift.jsonl":
        assert hits["drift"] == 0
    with np.load(out / "activations.npz") as got:  # whatever was redone, the cache is whole again
        assert str(got["key"]) == PINNED["activations"]


@pytest.fixture(scope="module")
def cons_model(tiny_llama) -> CountingModel:
    return CountingModel(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


@pytest.fixture(scope="module")
def cons_run(cons_model, runs) -> dict[str, Any]:
    """An uninterrupted consistency run with a bank, turns (on the plain space run) and mixtures."""
    cfg = cons_model.cfg
    bank = VectorBank(np.random.default_rng(4).normal(size=(2, cfg.n_resid, cfg.d_model)), ("x", "y"), "tiny")
    config = ConsistencyConfig().replace(**CONS)
    out = runs["root"] / "cons"
    s = run_consistency(cons_model, config, out, bank=bank, space_dir=runs["root"] / "plain", scripts=SCRIPTS,
                        progress=False, log=lambda _: None)
    assert s["turns"] and s["mixtures"]
    return {"out": out, "bank": bank, "config": config, "summary": s, "space": runs["root"] / "plain"}


def test_finished_consistency_run_has_its_manifest(cons_run) -> None:
    m = read_manifest(cons_run["out"])
    assert m["kind"] == "consistency" and m["status"] == "complete"
    assert [s["name"] for s in m["stages"]] == ["T=1", "turns", "mixtures", "summary"]
    assert set(cons_run["summary"]["wall_s"]) == {"T=1", "turns", "mixtures", "total"}


@pytest.mark.parametrize("name", ["generations.jsonl", "turns.jsonl", "mixtures.jsonl"])
def test_consistency_cache_cut_short_is_recomputed(cons_run, cons_model, tmp_path, name) -> None:
    out = tmp_path / "run"
    shutil.copytree(cons_run["out"], out)
    _cut(out / name)
    with pytest.warns(errors.CacheWarning) as record:
        again = run_consistency(cons_model, cons_run["config"], out, bank=cons_run["bank"], space_dir=cons_run["space"],
                                scripts=SCRIPTS, progress=False, log=lambda _: None)
    _one_cache_warning(record)
    assert _no_wall(again) == _no_wall(cons_run["summary"])
    stage = {"generations.jsonl": "T=1", "turns.jsonl": "turns", "mixtures.jsonl": "mixtures"}[name]
    hits = {s["name"]: s["cache_hits"] for s in read_manifest(out)["stages"]}
    assert hits[stage] < {"T=1": 2, "turns": 1, "mixtures": 1}[stage]  # 6 prompts in chunks of 4: 2 chunks


# ============================================================================================
# SIGKILL in the middle of a stage
# ============================================================================================
CHILD = """
import json, sys, time
from pathlib import Path
sys.path[:0] = [{tests!r}, {repo!r}]
import testpath  # noqa: F401
import numpy as np
from test_pipeline import CountingModel, full_word_tokenizer
from test_space import SCRIPTS, SPACE, TEMPLATE
from jaxpersona.data.roles import load_roles
from jaxpersona.model.loaders.hf import load_hf_dir
from jaxpersona.pipelines import space
from jaxpersona.pipelines.space import SpaceConfig, run_space

stage, marker = {stage!r}, Path({marker!r})

def stall():
    marker.write_text(stage)
    time.sleep(600)

cfg, params = load_hf_dir({model_dir!r})
model = CountingModel(cfg, params, full_word_tokenizer(TEMPLATE), "tiny-llama")
if stage == "generate":  # the first chunk of answers is stored, the second never comes
    real = model.generate_tokens
    def generate_tokens(batch, **kw):
        if model.calls:
            stall()
        return real(batch, **kw)
    model.generate_tokens = generate_tokens
elif stage == "activations":  # killed while the npz is being written
    real_savez = np.savez
    def savez(f, *a, **kw):
        real_savez(f, *a, **kw)
        f.flush()
        stall()
    np.savez = savez
elif stage == "drift":
    space.run_drift = lambda *a, **k: stall()
run_space(model, load_roles({roles!r}), SCRIPTS, None, SpaceConfig().replace(**SPACE), {out!r}, progress=False,
          log=lambda _: None)
"""


def _wait_for_stall(proc: subprocess.Popen, out: Path, marker: Path, stage: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = read_manifest(out)
        if marker.exists() and m and m["stages"] and m["stages"][-1]["name"] == stage \
                and m["stages"][-1]["status"] == "running":
            return
        if proc.poll() is not None:
            raise AssertionError(f"the child ended ({proc.returncode}) before stalling in {stage}: "
                                 f"{proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"the child never stalled in {stage}")


@pytest.mark.parametrize("stage", ["generate", "activations", "drift"])
def test_sigkill_during_a_stage_resumes_to_the_same_summary(runs, model, tiny_llama, tmp_path, stage) -> None:
    out, marker = tmp_path / "run", tmp_path / "stalled"
    script = CHILD.format(tests=str(TESTS), repo=str(REPO), stage=stage, marker=str(marker),
                          model_dir=str(tiny_llama.path), roles=str(runs["root"] / "roles"), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_stall(proc, out, marker, stage)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = read_manifest(out)
    assert killed["status"] == "running" and killed["stages"][-1]["name"] == stage
    assert killed["stages"][-1]["status"] == "running"
    if stage == "generate":
        assert 0 < len(read_jsonl(out / "responses.jsonl")) < 18
    if stage == "activations":
        assert not (out / "activations.npz").exists()  # only a temporary file was being written
    model.calls.clear()
    again = _rerun(model, runs, "plain", out)
    assert _no_wall(again) == _no_wall(runs["plain"])
    m = read_manifest(out)
    assert m["status"] == "complete" and m["attempt"] == 2
    assert [s["name"] for s in m["stages"]] == SPACE_STAGES
