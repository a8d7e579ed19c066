"""Faults in regimes and screen run directories, on the tiny llama.

* every cached stage file cut short (half its bytes, as a full disk or a copy killed mid-way leaves it) is
  recomputed on the rerun with exactly one :class:`~jaxpersona.errors.CacheWarning`, nothing else is redone,
  and the summary is the same (wall seconds aside);
* the cache keys, the answers' keys and the trainers' resume fingerprints are pinned to the values the
  pre-layering code (jaxpersona 0.4, flat modules) wrote for the same run, so a directory it wrote resumes
  without recomputation: a change of any key fails here;
* ``run.json`` of a finished run records its kind, status and stages.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.artifacts.records import KeyedJsonl
from jaxpersona.compute.handle import Model, model_fingerprint
from test_pipeline import SCREEN_DATA, full_word_tokenizer

SMALL = dict(n_pairs=1, n_train_questions=4, n_eval_questions=2, max_new_tokens=6, batch_size=4, bipo_steps=3,
             bipo_batch=2, n_boot=50, n_splits=20, trainers=("plain", "steer"), datasets=("trait",))
# train_eot=False: the 0.4 trainer (response tokens only), which is how a 0.4 directory's training resumes and what
# its keys were computed with; the 0.7 default (train_eot=True) is a different training and gets other keys (below)
TRAIN_SMALL = dict(rank=2, epochs=1, batch_size=2, save_every=1, lr=1e-2, warmup_steps=0, train_eot=False)
CACHED = ("answers.jsonl", "prompt_vectors.npz", "evaluation.npz", "bipo.npz", "grid.npz", "composition.npz")
STAGES = ["data", "prompt_vectors", "fine_tune", "evaluate", "bipo", "compare", "write"]

# Written by /work/base (commit 7941f5d, before the layered packages) for this run on this model (CPU).
PINNED_FP = "332bfd168befc90a184f171a"
PINNED_NPZ = {"prompt_vectors.npz": "eb8dfbe647ff1313c28449c3", "evaluation.npz": "ee0369d1442c553621298848",
              "bipo.npz": "06fad3b079274907b2266175", "grid.npz": "63680c551605e7062c897f18",
              "composition.npz": "02c61944ec0ceaa06b94d1c2"}
PINNED_ANSWERS = (44, "b277f16b2e7d12ea6a779600")  # number of answer records, digest of their sorted keys
PINNED_TRAIN = {"plain-trait": "ba9dd18af4ca3b8f5a8961d1", "steer-trait": "d67da3fc6cd283a0d29b5514"}
PINNED_SCREEN = ["81051a2e9c28bde3545bad62", "d83f3ba8ba375fdaf4f9b3c0", "e5df41724dd41b746a688e31"]
# The 0.4 key recipes on fixed inputs (independent of the model and the backend's numbers).
RECIPES = {"answer": "898b48b3c8a1c99f947c7f63", "answers": "01a03f04026dce8507e6a1a4",
           "answers_b": "30eff3aeb765623f17ae9338", "prompt_vectors.npz": "7b448820c5e8428d7c2bb6a3",
           "evaluation.npz": "cb5e9963d01273cd88b9d49d", "bipo.npz": "46038ceff93883f526434417",
           "grid.npz": "9795b8737699f7de3ab0b5ce", "grid_none": "0fb1dc2ee8ba5b58f5d01e91",
           "composition.npz": "463586c4d51fd44da03a2e65", "screen": "501fa55b7c010a836e6fe7f5"}
CPU = jax.default_backend() == "cpu"  # the pinned run values hold for the CPU's generations


@pytest.fixture(scope="module")
def model(tiny_llama) -> Model:
    return Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


def _configs() -> tuple[Any, Any]:
    from jaxpersona.compute.train import TrainConfig
    from jaxpersona.pipelines.regimes import RegimesConfig

    return RegimesConfig().replace(**SMALL), TrainConfig().replace(**TRAIN_SMALL)


def _run(model: Model, out: Path) -> dict[str, Any]:
    from jaxpersona.data.traits import load_trait
    from jaxpersona.pipelines.regimes import run_regimes

    rc, tc = _configs()
    return run_regimes(model, load_trait("evil"), rc, tc, out, trait_b=load_trait("optimistic"), progress=False,
                       log=lambda _: None)


def _same(a: dict[str, Any]) -> str:
    """The summary without its wall seconds, as comparable text."""
    return json.dumps({k: v for k, v in a.items() if k != "wall_seconds"}, sort_keys=True, default=float)


def _cut(path: Path) -> None:
    """Keep the first half of ``path``'s bytes; a JSONL file is cut inside a line (a torn line)."""
    data = path.read_bytes()
    n = len(data) // 2
    while path.suffix == ".jsonl" and data[n - 1 : n] == b"\n":
        n += 1
    path.write_bytes(data[:n])


def _one_cache_warning(rec: Any) -> None:
    cache = [str(w.message) for w in rec if issubclass(w.category, errors.CacheWarning)]
    assert len(cache) == 1, cache


def _no_retraining(monkeypatch) -> None:
    from jaxpersona.compute import train as train_mod

    monkeypatch.setattr(train_mod, "_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("regimes_faults") / "ref"
    return out, _run(model, out)


def test_run_json_of_a_finished_regimes_run(model, finished) -> None:
    from jaxpersona.runner.run import read_manifest

    out, s = finished
    m = read_manifest(out)
    assert m is not None and m["kind"] == "regimes" and m["status"] == "complete" and m["attempt"] == 1
    assert [st["name"] for st in m["stages"]] == STAGES
    assert all(st["status"] == "complete" and st["wall_s"] >= 0 for st in m["stages"])
    assert m["seeds"] == {"seed": 0, "train": 0} and m["model"]["digest"] == model_fingerprint(model)
    arts = {a for st in m["stages"] for a in st["artifacts"]}
    assert {"prompt_vectors.npz", "evaluation.npz", "bipo.npz", "grid.npz", "composition.npz", "regimes.json",
            "regimes.txt", "data/trait.jsonl"} <= arts
    assert list(s["wall_seconds"]) == [*STAGES[:-1], "total"]
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg) == {"model", "regimes", "train"} and cfg["regimes"]["trainers"] == ["plain", "steer"]
    assert json.loads((out / "regimes.json").read_text())["wall_seconds"] == s["wall_seconds"]


def test_key_recipes_are_those_of_0_4() -> None:
    from jaxpersona.artifacts.records import digest
    from jaxpersona.pipelines import regimes as R

    rc, tc = _configs()
    rc = rc.replace(trainers=R.TRAINERS, datasets=R.DATASETS)  # the recipes were pinned with the default plans
    fp, ak = "fp0", "ak0"
    tr = {"pos": [["a", "b"]], "neg": [["c", "d"]], "plain": [["e", "f"]], "AB:pos": [["g", "h"]],
          "AB:neg": [["i", "j"]]}
    ev = {"pos": [["k", "l"]], "neg": [["m", "n"]], "plain": [["o", "p"]]}
    ekey = R.evaluation_key(fp, [("plain-trait", 1), ("steer-trait", 2)], rc, tc, ak)
    got = {"answer": digest("regime-answer", fp, "evil", "pos", "You are evil.", "why?", 1, 6, 0.7, 0),
           "answers": R.answers_key(tr, ev), "answers_b": R.answers_key(tr, ev, ev, ev),
           "prompt_vectors.npz": R.prompt_vectors_key(fp, rc, ak), "evaluation.npz": ekey,
           "bipo.npz": R.bipo_key(fp, (16,), rc, ak), "grid.npz": R.grid_key(ekey, "optimistic"),
           "grid_none": R.grid_key(ekey, None), "composition.npz": R.composition_key(fp, rc, ak),
           "screen": digest("screen", fp, [{"role": "user", "content": "hi"}], 64)}
    assert got == RECIPES


def test_cache_keys_and_train_fingerprints_are_those_of_0_4(model, finished) -> None:
    from jaxpersona.compute.train import run_fingerprint
    from jaxpersona.data.datasets import read_dataset
    from jaxpersona.pipelines.regimes import prevention_intervention

    out, s = finished
    keys = {}
    for name in PINNED_NPZ:
        with np.load(out / name) as z:
            keys[name] = str(z["key"])
    answers = sorted(KeyedJsonl(out / "answers.jsonl").records)
    rc, tc = _configs()
    with np.load(out / "prompt_vectors.npz") as z:
        pd = {k: z[k] for k in z.files}
    layer = s["layer"]
    v = pd["A"].mean(0)[layer]
    u = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)  # as the pipeline normalises it
    prev = prevention_intervention(model.cfg.n_resid, u * pd["norms"][layer], rc.prevention, rc.prevention_coeff,
                                   layer)
    trait = read_dataset(out / "data" / "trait.jsonl")
    fps = {"plain-trait": run_fingerprint(model, tc, trait, None, None),
           "steer-trait": run_fingerprint(model, tc, trait, None, prev)}
    assert model_fingerprint(model) == PINNED_FP
    if not CPU:
        pytest.skip("the pinned answers (and every key computed from them) are the CPU's generations")
    assert keys == PINNED_NPZ
    assert (len(answers), hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:24]) == PINNED_ANSWERS
    assert fps == PINNED_TRAIN
    # the 0.7 default trains the end-of-turn token: another fingerprint and evaluation key, never a 0.4 one
    eot = tc.replace(train_eot=True)
    assert run_fingerprint(model, eot, trait, None, None) != fps["plain-trait"]
    from jaxpersona.pipelines.regimes import evaluation_key

    snaps = [("plain-trait", 1)]
    assert evaluation_key("fp", snaps, rc, eot, "a") != evaluation_key("fp", snaps, rc, tc, "a")


@pytest.mark.parametrize("name", CACHED)
def test_cached_stage_file_cut_short_is_recomputed_once(model, finished, tmp_path, monkeypatch, name) -> None:
    ref, s = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    before = {n: (out / n).read_bytes() for n in CACHED}
    _cut(out / name)
    _no_retraining(monkeypatch)
    with pytest.warns(errors.CacheWarning, match=name) as rec:
        again = _run(model, out)
    _one_cache_warning(rec)
    assert _same(again) == _same(s)
    assert _same(json.loads((out / "regimes.json").read_text())) == _same(s)
    for n, b in before.items():  # the other caches untouched; the cut one whole again
        if n != name:
            assert (out / n).read_bytes() == b, n
    if name.endswith(".npz"):
        with np.load(out / name) as z:
            assert str(z["key"]) == PINNED_NPZ[name] or not CPU
    else:  # every answer is back
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", errors.CacheWarning)  # the torn line itself may still be in the file
            got = KeyedJsonl(out / name).records
        assert {k: r["response"] for k, r in got.items()} == {
            k: r["response"] for k, r in KeyedJsonl(ref / name).records.items()}
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "complete" and m["attempt"] == 2 and [st["name"] for st in m["stages"]] == STAGES


def _screen(model: Model, data: Path, out: Path) -> dict[str, Any]:
    from jaxpersona.pipelines.screen import screen_dataset

    vec = np.random.default_rng(1).standard_normal((model.cfg.n_resid, model.cfg.d_model)).astype(np.float32)
    return screen_dataset(model, vec, 2, data, out, max_new_tokens=6, batch_size=2, progress=False)


def test_screen_own_responses_cut_short_are_regenerated_once(model, tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SCREEN_DATA))
    out = tmp_path / "screen"
    first = _screen(model, data, out)
    m = json.loads((out / "run.json").read_text())
    assert m["kind"] == "screen" and m["status"] == "complete"
    assert [st["name"] for st in m["stages"]] == ["generate", "project", "write"]
    if CPU:
        assert sorted(KeyedJsonl(out / "own_responses.jsonl").records) == PINNED_SCREEN
    rows, summary = (out / "screen.jsonl").read_bytes(), (out / "screen_summary.json").read_bytes()
    _cut(out / "own_responses.jsonl")
    with pytest.warns(errors.CacheWarning, match="own_responses.jsonl") as rec:
        again = _screen(model, data, out)
    _one_cache_warning(rec)
    assert again == first
    assert (out / "screen.jsonl").read_bytes() == rows and (out / "screen_summary.json").read_bytes() == summary
    assert json.loads((out / "run.json").read_text())["attempt"] == 2


def test_finetune_run_resumes_a_killed_training(model, tmp_path, monkeypatch) -> None:
    """A ``finetune`` run killed after one update resumes from the trainer's checkpoint to the same adapter
    as an uninterrupted run; run.json records the failed attempt, then the complete one."""
    from jaxpersona.compute import train as train_mod
    from jaxpersona.pipelines import regimes as R
    from jaxpersona.runner.run import read_manifest

    ex = [([{"role": "user", "content": q}], a) for q, a in (
        ("hello world", "the cat sat on the mat ."), ("what is the capital of france ?", "paris is ."),
        ("you are a cat", "a dog sat on a mat"), ("what is a mat ?", "the mat is a mat !"))]
    _, tc = _configs()
    whole = R.run_finetune(model, ex, tc, tmp_path / "whole", progress=False, log=lambda _: None)

    def killed(*a: Any, **k: Any) -> Any:
        train_mod.train(*a, **k, stop_after=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        R.run_finetune(model, ex, tc, tmp_path / "b", progress=False, log=lambda _: None)
    m = read_manifest(tmp_path / "b")
    assert m["kind"] == "finetune" and m["status"] == "failed" and m["stages"][0]["status"] == "failed"
    monkeypatch.undo()
    resumed = R.run_finetune(model, ex, tc, tmp_path / "b", progress=False, log=lambda _: None)
    assert (resumed.steps, resumed.checkpoints) == (whole.steps, whole.checkpoints) and whole.steps > 1
    assert [r["step"] for r in resumed.log] == [r["step"] for r in whole.log]
    for x, y in zip(jax.tree.leaves(resumed.adapter), jax.tree.leaves(whole.adapter)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    m = read_manifest(tmp_path / "b")
    assert m["status"] == "complete" and m["attempt"] == 2 and "legacy" not in m
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"] == json.loads(
        (tmp_path / "whole" / "config.json").read_text())["train"]
