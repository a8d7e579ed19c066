"""``jaxpersona trait-data``, ``finetune`` and ``regimes`` end to end on the embedded default model
(SmolLM2-135M-Instruct) with tiny sizes: the data files, a LoRA run with preventative steering from a bank
that resumes, the regimes run directory, and bad input (exit 2, typed message)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxpersona.cli import main
from jaxpersona.runner.run import read_manifest

TRAIN = "[train]\nrank = 2\nepochs = 1\nbatch_size = 2\nsave_every = 1\nmax_len = 160\n"
REGIMES = """\
[regimes]
n_pairs = 1
n_train_questions = 4
n_eval_questions = 2
max_new_tokens = 10
batch_size = 8
trainers = ["plain", "steer"]
datasets = ["trait", "neutral"]
bipo_steps = 2
bipo_batch = 2
n_boot = 100
n_splits = 20

[train]
rank = 2
epochs = 1
batch_size = 4
save_every = 1
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_regimes")


def test_trait_data_then_finetune_with_prevention_and_resume(root: Path, capsys, monkeypatch) -> None:
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.artifacts.adapters import load_adapter
    from jaxpersona.compute.handle import load

    assert main(["trait-data", "--trait", "evil", "--out", str(root / "data"), "--n-questions", "3", "--n-pairs", "1",
                 "--max-new-tokens", "12", "--quiet"]) == 0
    rows = [json.loads(l) for l in (root / "data" / "trait.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 3 and all(r["messages"][0]["role"] == "user" for r in rows)
    assert (root / "data" / "neutral.jsonl").exists() and (root / "data" / "counter.jsonl").exists()
    m = read_manifest(root / "data")
    assert m is not None and m["kind"] == "trait-data" and m["status"] == "complete"
    (root / "train.toml").write_text(TRAIN)
    model = load("smollm2-135m-instruct")
    rng = np.random.default_rng(0)
    VectorBank.from_vectors("smollm2", {"evil": rng.normal(size=(model.cfg.n_resid, model.cfg.d_model))},
                            {"evil": {"resid_norm": [10.0] * model.cfg.n_resid}}).save(root / "bank")
    monkeypatch.chdir(root)  # a relative --out (Orbax itself needs absolute paths)
    args = ["finetune", "--data", "data/trait.jsonl", "--out", "ft", "--config", "train.toml", "--prevent-bank",
            "bank", "--prevent-coeff", "0.3", "--prevent-units", "relative", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "updates on" in out
    steps = sorted(p.name for p in (root / "ft" / "adapters").iterdir())
    ad, info = load_adapter(root / "ft" / "adapters" / steps[-1], model.cfg)
    assert info["rank"] == 2 and float(np.abs(np.asarray(ad.b["q"])).max()) > 0
    m = read_manifest(root / "ft")
    assert m is not None and m["kind"] == "finetune" and m["status"] == "complete"
    cfg = json.loads((root / "ft" / "config.json").read_text())
    assert cfg["train"]["rank"] == 2 and cfg["prevention"]["units"] == "relative"
    from jaxpersona.compute import train as train_mod

    with monkeypatch.context() as mp:  # resumes: already finished, nothing is trained again
        mp.setattr(train_mod, "_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
        assert main(args) == 0
    assert steps == sorted(p.name for p in (root / "ft" / "adapters").iterdir())
    assert read_manifest(root / "ft")["attempt"] == 2
    # bad input: another config on the same run directory, a malformed dataset, a bank entry that is not there
    (root / "other.toml").write_text(TRAIN.replace("rank = 2", "rank = 3"))
    assert main([*args[:6], "other.toml", *args[7:]]) == 2
    assert "another config" in capsys.readouterr().err
    (root / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["finetune", "--data", "bad.jsonl", "--out", "ft2", "--quiet"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main([*args, "--prevent-entry", "nope"]) == 2
    assert "not in the bank" in capsys.readouterr().err


def test_regimes_cli_run_directory(root: Path, capsys) -> None:
    (root / "regimes.toml").write_text(REGIMES)
    assert main(["regimes", "--config", str(root / "regimes.toml"), "--out", str(root / "reg"), "--quiet"]) == 0
    text = capsys.readouterr().out
    for needle in ("Trainers (final checkpoints)", "Cosines between regimes", "Regime grid", "Composition"):
        assert needle in text
    s = json.loads((root / "reg" / "regimes.json").read_text())
    m = read_manifest(root / "reg")
    assert m is not None and m["kind"] == "regimes" and m["status"] == "complete"
    assert set(s["runs"]) == {"plain-trait", "steer-trait", "plain-neutral"}
    assert s["layer"] == 16 and s["composition"]["traits"] == {"A": "evil", "B": "optimistic"}
    # every point's interval brackets its estimate
    for p in s["points"][1:]:
        lo, hi = p["trait_delta"][1], p["trait_delta"][2]
        assert lo <= p["trait_delta"][0] <= hi
    (root / "bad.toml").write_text("[regimes]\ntrainers = ['sft']\n")
    assert main(["regimes", "--config", str(root / "bad.toml"), "--out", str(root / "bad"), "--quiet"]) == 2
    assert "unknown trainers" in capsys.readouterr().err
