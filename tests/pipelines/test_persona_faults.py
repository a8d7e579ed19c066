"""Faults of the persona-vector pipeline on the runner (``jaxpersona.pipelines.persona``): pinned cache keys,
cached stage files cut short, a SIGKILL mid-stage, two processes on one run directory, and the ``run.json``
manifest of a finished run.

Same tiny random llama, word tokenizer, trait, config and scripted judge as ``test_pipeline``.

The pinned constants were computed by running the pre-layering code (jaxpersona at commit 7941f5d, flat
modules) on the same model and config: a run directory written by it resumes under this code without
redoing work only while these keys stay the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import test_pipeline as tp
from jaxpersona import __version__, errors
from jaxpersona.artifacts.records import KeyedJsonl, digest
from jaxpersona.cli import main
from jaxpersona.compute.handle import model_fingerprint
from jaxpersona.compute.scoring import ScoringSet
from jaxpersona.compute.sweep import Grid, run_sweep
from jaxpersona.data.traits import coherence_prompt, load_trait
from jaxpersona.pipelines.persona import ExtractConfig, config_record, load_extract_config, run_extract
from jaxpersona.runner.run import open_run, read_manifest
from jaxpersona.runner.stages import judge_cached

TESTS = Path(__file__).resolve().parents[1]
STAGES = ["generate", "judge_check", "judge", "extract", "steer", "choose", "control", "monitor", "summary"]
WALL_KEYS = ["generate", "judge_check", "judge", "extract", "steer", "choose", "control", "monitor", "total"]

# --- constants from the pre-layering code (see the module docstring) -------------------------------
MODEL_DIGEST = "332bfd168befc90a184f171a"  # model_fingerprint of the tiny llama named "tiny-llama"
RESPONSE_KEYS = (28, "d8b4869a90fd9faf0cd8cc1e")  # responses.jsonl: (number of keys, _hash of the sorted keys)
MONITOR_KEYS = (6, "0cb89b48509ef2c83c69e5aa")  # monitor.jsonl
CONFIG_JSON = "30f06332ec2ec589f18da008"  # sha256 of config.json (its bytes) without the keys added since:
ADDED_KEYS = ("steer_positions", "steer_variants", "folds", "n_random")  # 0.7: how to steer, cross-fitting, control
JUDGE_KEYS = ["222a676c2a533af3191e87d0", "262f57a13bb62d7bde0a5c27", "8c19a6653aac229143478e42",
              "a55fccfb027d4774b9e375af"]  # judge_cached on _judge_prompts()
SWEEP_KEYS = ["0c09980e731b921b5e08", "1c12f63cf38ed36f9a79", "b34f6f3666a89b6ff5f8",
              "b96e0fc45677a67d00b2"]  # the sweep's chunk keys (progress.json) of _fixed_sweep()


def _sweep_rows(run: Path) -> int:
    """Rows of the steering sweep's stores (response positions in steering/, all positions in steering/all/)."""
    return sum(len(tp.read_jsonl(run / d / "results.jsonl")) for d in ("steering", "steering/all"))


def _hash(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]


def _keys(path: Path) -> list[str]:
    return [r["key"] for r in tp.read_jsonl(path)]


def _cache_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, errors.CacheWarning)]


def _extract(model, out: Path, judge=None, **kw):
    return run_extract(model, tp.TRAIT, judge or tp.ScriptedJudge(), tp.CONFIG, out, judge_id="scripted",
                       progress=False, log=tp._quiet, **kw)


@pytest.fixture(scope="module")
def model(tiny_llama) -> tp.CountingModel:
    return tp.CountingModel(tiny_llama.cfg, tiny_llama.params, tp.full_word_tokenizer(), "tiny-llama")


@pytest.fixture(scope="module")
def base(model, tmp_path_factory) -> Path:
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("faults") / "base"
    _extract(model, out)
    return out


# ============================================================================================
# a. cache keys pinned
# ============================================================================================
def test_cache_keys_of_a_run_are_the_pre_layering_keys(base, model) -> None:
    """The keys that depend only on the inputs (model, trait, config): the model digest, every
    response and monitor generation; the judgement keys are the judge key of each prompt judged."""
    assert model_fingerprint(model) == MODEL_DIGEST
    for name, (n, h) in (("responses.jsonl", RESPONSE_KEYS), ("monitor.jsonl", MONITOR_KEYS)):
        keys = _keys(base / name)
        assert (len(keys), _hash(keys)) == (n, h), name
    answers = [(p["question"], p[f"{s}_response"]) for p in tp.read_jsonl(base / "pairs.jsonl") for s in ("pos", "neg")
               if p[f"{s}_response"]]
    prompts = [f(q, a) for q, a in answers for f in (tp.TRAIT.judge_prompt, coherence_prompt)]
    assert {digest("scripted", p) for p in prompts} <= set(_keys(base / "judgements.jsonl"))


def _judge_prompts() -> list[str]:
    evil = load_trait("evil")
    q, a = "what is a cat ?", "the cat sat ."
    return [tp.TRAIT.judge_prompt(q, a), coherence_prompt(q, a),
            evil.judge_prompt(evil.eval_questions[0], "I will help you."),
            coherence_prompt(evil.eval_questions[0], "I will help you.")]


class _Flat:
    def probs(self, prompts):
        return np.tile(np.eye(101)[50], (len(prompts), 1))


def test_judge_keys_pinned(tmp_path) -> None:
    """Judgement keys: the judge id and the prompt (the trait and coherence rubrics' text included)."""
    store = KeyedJsonl(tmp_path / "j.jsonl")
    judge_cached(_Flat(), "local:x:'Score: '", store, _judge_prompts(), batch=2, min_mass=0.25, progress=False)
    assert sorted(store.records) == JUDGE_KEYS


def test_sweep_chunk_keys_pinned(model, tmp_path) -> None:
    """Chunk keys of a steering sweep shaped like the pipeline's (paired sets, response positions, one
    baseline per vector, greedy generations) on fixed vectors and texts."""
    cfg = model.cfg
    vecs = (np.arange(2 * cfg.n_resid * cfg.d_model, dtype=np.float32).reshape(2, cfg.n_resid, cfg.d_model) % 7 - 3) / 10
    grid = Grid("steer", vecs, ("cat", "dog"), (1, 2), (0.0, 0.5), positions="response", baseline_once=True)
    sets = [ScoringSet(("what is a cat ?", "hello world ?") * 2, ("the cat sat .", "hello", "a dog .", "world")),
            ScoringSet(("what is paris ?",) * 2, ("paris is .", "the mat ."))]
    run_sweep(model, grid, sets, out_dir=tmp_path / "sweep", progress=False, generate_tokens=3)
    assert sorted(json.loads((tmp_path / "sweep" / "progress.json").read_text())) == SWEEP_KEYS


def test_config_json_is_the_pre_layering_config_json(base, tmp_path) -> None:
    """config.json keeps every key of the pre-layering file, the retired ``steer_points_per_chunk`` (8) at
    its place; old config files that still set it load."""
    text = (base / "config.json").read_text()
    got = json.loads(text)
    # the pre-layering keys keep their values and order; keys added since follow them
    old_part = {k: v for k, v in got.items() if k not in ADDED_KEYS}
    assert list(got)[len(old_part):] == list(ADDED_KEYS)
    assert hashlib.sha256(json.dumps(old_part, indent=2).encode()).hexdigest()[:24] == CONFIG_JSON
    assert got == json.loads(json.dumps(config_record("cat", "tiny-llama", "scripted", tp.CONFIG)))
    keys = list(got)
    assert keys[:3] == ["trait", "model", "judge"] and got["steer_points_per_chunk"] == 8
    assert keys[keys.index("steer_tokens") + 1] == "steer_points_per_chunk"
    assert keys[3:] == [k for k in keys[3:] if k == "steer_points_per_chunk" or k in ExtractConfig.__dataclass_fields__]
    assert len(keys) == 3 + len(ExtractConfig.__dataclass_fields__) + 1
    assert text == json.dumps(got, indent=2)
    old = tmp_path / "old.toml"
    old.write_text("[extract]\nn_pairs = 2\nsteer_points_per_chunk = 8\n")
    assert load_extract_config(old) == ExtractConfig(n_pairs=2)


# ============================================================================================
# b. a cached stage file cut short: one CacheWarning, the same summary
# ============================================================================================
CACHES = ["responses.jsonl", "judgements.jsonl", "monitor.jsonl", "steering/results.jsonl", "steering/progress.json",
          "steering/all/results.jsonl", "steering/all/progress.json", "control/results.jsonl", "control/progress.json"]


def _cut(path: Path) -> None:
    """Keep half of the file's bytes, ending inside a line (a cut at a line end is a shorter valid file)."""
    data = path.read_bytes()
    n = len(data) // 2
    while n > 1 and data[n - 1 : n] == b"\n":
        n -= 1
    path.write_bytes(data[:n])


def test_every_cache_file_is_covered(base) -> None:
    files = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".npz")}
    outputs = {"pairs.jsonl", "steering_scored.jsonl", "monitor_scored.jsonl"}  # rewritten by every run
    assert files - outputs == {c for c in CACHES if not c.endswith("progress.json")}  # (an extract run keeps no npz cache)


@pytest.mark.parametrize("name", CACHES)
def test_cut_cache_file_is_recomputed_with_one_warning(base, model, tmp_path, name) -> None:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    _cut(run / name)
    model.calls.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _extract(model, run)
    got = _cache_warnings(record)
    assert len(got) == 1, got
    assert name.split("/")[-1] in got[0]
    assert tp.stable_summary(run) == tp.stable_summary(base)
    if name == "responses.jsonl":
        assert 0 < model.n_calls(tp.CONFIG.max_new_tokens) < 4  # only the lost chunks are generated again
    assert read_manifest(run)["status"] == "complete"
    # the damaged file was repaired: the next rerun reads every cache without a warning and redoes nothing
    model.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.CacheWarning)
        _extract(model, run, tp.NoJudge())
    assert model.calls == [] and tp.stable_summary(run) == tp.stable_summary(base)
    assert read_manifest(run)["stages"][STAGES.index("steer")]["cache_hits"] == _sweep_rows(base)


# ============================================================================================
# c. SIGKILL during a stage, then a rerun
# ============================================================================================
CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import testpath  # noqa: F401
    import test_pipeline as tp
    import jaxpersona.compute.sweep as sweep
    from jaxpersona.model.loaders.hf import load_hf_dir

    stage, delay = {stage!r}, 0.5

    class Model(tp.CountingModel):
        def generate_tokens(self, batch, **kw):
            if stage == "generate":
                time.sleep(delay)
            return super().generate_tokens(batch, **kw)

    class Judge(tp.ScriptedJudge):
        def probs(self, prompts):
            if stage == "judge":
                time.sleep(delay)
            return super().probs(prompts)

    if stage == "steer":
        score = sweep.score_chunk
        sweep.score_chunk = lambda *a, **k: (time.sleep(4 * delay), score(*a, **k))[1]
    cfg, params = load_hf_dir({model!r})
    model = Model(cfg, params, tp.full_word_tokenizer(), "tiny-llama")
    tp.run_extract(model, tp.TRAIT, Judge(), tp.CONFIG, {out!r}, judge_id="scripted", progress=False, log=tp._quiet)
""")

# a stage is "well under way" when its cache file shows finished work
UNDER_WAY = {"generate": "responses.jsonl", "judge": "judgements.jsonl", "steer": "steering/progress.json"}


def _kill_during(stage: str, model_dir: Path, out: Path, timeout: float = 600.0) -> dict:
    code = CHILD.format(tests=str(TESTS), stage=stage, model=str(model_dir), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"the run ended (exit {proc.returncode}) before stage {stage} was killed: "
                            f"{err.decode()[-2000:]}")
            m = read_manifest(out)
            last = m["stages"][-1] if m and m["stages"] else {}
            marker = out / UNDER_WAY[stage]
            if last.get("name") == stage and last.get("status") == "running" and marker.exists() \
                    and marker.stat().st_size > 0:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return m
            time.sleep(0.05)
        pytest.fail(f"stage {stage} was not seen running within {timeout:.0f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("stage", ["generate", "judge", "steer"])
def test_sigkill_during_a_stage_then_rerun_equals_uninterrupted(base, model, tiny_llama, tmp_path, stage) -> None:
    out = tmp_path / "killed"
    _kill_during(stage, tiny_llama.path, out)
    seen = read_manifest(out)
    assert seen["status"] == "running" and seen["stages"][-1]["name"] == stage  # killed, never marked
    assert [s["name"] for s in seen["stages"]] == STAGES[: STAGES.index(stage) + 1]
    done_responses = set(_keys(out / "responses.jsonl")) if (out / "responses.jsonl").exists() else set()
    done_judged = set(_keys(out / "judgements.jsonl")) if (out / "judgements.jsonl").exists() else set()

    model.calls.clear()
    judge = tp.ScriptedJudge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", errors.CacheWarning)  # a kill mid-write leaves a torn line
        _extract(model, out, judge)
    assert tp.stable_summary(out) == tp.stable_summary(base)
    m = read_manifest(out)
    assert m["status"] == "complete" and m["attempt"] == 2 and [s["name"] for s in m["stages"]] == STAGES
    if stage == "generate":  # the chunks finished before the kill are not generated again
        n_chunks = -(-(tp.N_RESPONSES + tp.N_EVAL_ANSWERS) // tp.CONFIG.batch_size)
        assert model.n_calls(tp.CONFIG.max_new_tokens) == n_chunks - len(done_responses) // tp.CONFIG.batch_size
        assert m["stages"][0]["cache_hits"] == len(done_responses) > 0
    else:
        assert model.n_calls(tp.CONFIG.max_new_tokens) == 0
        assert m["stages"][0]["cache_hits"] == tp.N_RESPONSES + tp.N_EVAL_ANSWERS
        assert not {digest("scripted", p) for p in judge.prompts} & done_judged, "judgements redone"
        assert set(_keys(out / "judgements.jsonl")) == set(_keys(base / "judgements.jsonl"))
    if stage == "steer":
        assert m["stages"][STAGES.index("steer")]["cache_hits"] > 0  # the chunk finished before the kill


# ============================================================================================
# d. two processes on one run directory
# ============================================================================================
HOLDER = textwrap.dedent("""
    import sys, time
    from jaxpersona.runner.run import open_run
    run = open_run({out!r}, "extract", {{"trait": "cat"}}, model="held", log=lambda m: None, progress=False)
    print("holding", flush=True)
    time.sleep(600)
""")


def test_second_process_on_a_run_directory_is_refused(model, tiny_llama, tmp_path, capsys) -> None:
    out = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(out=str(out))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline().decode().strip() == "holding", holder.stderr.read().decode()
        before = read_manifest(out)
        with pytest.raises(errors.RunLockedError, match="another process"):
            _extract(model, out)
        # the CLI: exit 2, one clear line, nothing written
        model_dir = tmp_path / "tiny"
        shutil.copytree(tiny_llama.path, model_dir)
        tp.full_word_tokenizer().save_pretrained(model_dir)
        assert main(["extract", "--trait", "evil", "--model", str(model_dir), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxpersona: error:") and "another process is writing" in err and str(out) in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert read_manifest(out) == before
        assert sorted(p.name for p in out.iterdir()) == [".run.lock", "config.json", "run.json"]
    finally:
        holder.kill()
        holder.wait()
    with open_run(out, "extract", {"trait": "cat"}, model="next", log=tp._quiet, progress=False) as run:
        assert run.manifest["attempt"] == 2  # free again once the holder is gone


# ============================================================================================
# e. run.json of a finished run
# ============================================================================================
def test_manifest_of_a_finished_extract(base, model, tmp_path) -> None:
    m = read_manifest(base)
    assert m["kind"] == "extract" and m["status"] == "complete" and m["attempt"] == 1
    assert m["package"]["name"] == "jaxpersona" and m["package"]["version"] == __version__
    assert m["seeds"] == {"seed": tp.CONFIG.seed} and m["model"]["digest"] == MODEL_DIGEST
    assert [s["name"] for s in m["stages"]] == STAGES
    assert all(s["status"] == "complete" and isinstance(s["wall_s"], float) and s["wall_s"] >= 0 for s in m["stages"])
    assert m["wall_s"] >= sum(s["wall_s"] for s in m["stages"]) - 1e-6
    by_name = {s["name"]: s for s in m["stages"]}
    assert "vectors.npy" in by_name["extract"]["artifacts"] and "summary.json" in by_name["summary"]["artifacts"]
    # the summary's wall_s: the same keys as ever, taken from the stages (the sweep shared by its traits)
    wall = json.loads((base / "summary.json").read_text())["wall_s"]
    assert list(wall) == WALL_KEYS
    for k in WALL_KEYS[:-1]:
        assert wall[k] == pytest.approx(by_name[k]["wall_s"])
    assert wall["total"] == pytest.approx(sum(wall[k] for k in WALL_KEYS[:-1]))

    # a rerun: attempt 2, every generation, judgement and sweep row from the caches
    again = tmp_path / "again"
    shutil.copytree(base, again)
    model.calls.clear()
    _extract(model, again, tp.NoJudge())
    m2 = read_manifest(again)
    assert m2["attempt"] == 2 and m2["created"] == m["created"] and m2["status"] == "complete"
    hits = {s["name"]: s["cache_hits"] for s in m2["stages"]}
    n_rows = _sweep_rows(base)
    live = [r for r in tp.read_jsonl(base / "monitor_scored.jsonl") if r["response"]]  # judged (trait only)
    assert hits["generate"] == tp.N_RESPONSES + tp.N_EVAL_ANSWERS and hits["monitor"] == 3 * tp.CONFIG.n_eval + len(live)
    assert hits["judge"] > 0 and hits["choose"] > 0 and hits["steer"] == n_rows
    assert model.calls == []
