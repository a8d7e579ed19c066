"""``jaxpersona space`` and ``jaxpersona capping`` end to end on the embedded default model
(SmolLM2-135M-Instruct) with tiny sizes: the run directory, the capping clamp checks measured on the
real model, a chat under the calibrated caps, resume, and bad input (exit 2, typed message)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxpersona.edit.capping import CapConfig
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.cli import main

TINY = """\
[space]
n_roles = 4
prompts_per_role = 1
n_questions = 2
default_questions = 3
max_new_tokens = 12
batch_size = 8
conversations = 1
drift_tokens = 8
"""


@pytest.fixture(scope="module")
def space_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_space")
    (root / "tiny.toml").write_text(TINY)
    assert main(["space", "--config", str(root / "tiny.toml"), "--out", str(root / "run"), "--quiet"]) == 0
    return root


def test_space_run_directory_and_measures(space_dir: Path) -> None:
    run = space_dir / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["roles"] == 4 and s["role_answers"] == 8 and s["default_answers"] == 12
    bank = VectorBank.load(run / "vectors")
    assert bank.names[:2] == ("assistant_axis", "default") and len(bank.names) == 6
    axis = bank.get("assistant_axis")
    np.testing.assert_allclose(axis, bank.get("default") - bank.vectors[2:].mean(0), atol=1e-4)
    ck = s["capping"]["check"]
    assert ck["tokens_in_range"] > 0 and ck["in_range_bit_identical"] == ck["tokens_in_range"]
    assert ck["below_floor_max_error"] < 1e-3
    cap = CapConfig.load(run / "capping.json")
    assert list(cap.layers) == s["capping"]["layers"] == list(range(22, 26))  # 0.7:0.85 of 30 blocks, +1
    u = axis[cap.layers[0]] / np.linalg.norm(axis[cap.layers[0]])
    np.testing.assert_allclose(cap.directions[0], u, atol=1e-5)
    assert np.all(np.isinf(cap.ceilings))
    d = s["drift"]
    assert d["probe_answers_total"] == 1 and set(d["variants"]) == {"unsteered", "capped", "capped_assistant", "kv_edit"}
    recs = [json.loads(l) for l in (run / "drift.jsonl").read_text().splitlines()][0]["records"]
    assert len(recs) == 4 * 7  # 4 variants x (6 turns + the probe)
    summary = (run / "summary.txt").read_text()
    assert "cos(axis, PC1)" in summary and "bit-identical" in summary and "no judge" in summary


def test_space_rerun_resumes(space_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["space", "--config", str(space_dir / "tiny.toml"), "--out", str(space_dir / "run")]) == 0
    out = capsys.readouterr().out
    assert "activations of 20 answers: cached" in out and "drift over 1 conversations: cached" in out


def test_capping_show_and_chat_under_caps(space_dir: Path, capsys) -> None:
    cap = space_dir / "run" / "capping.json"
    assert main(["capping", "show", str(cap)]) == 0
    assert "resid[22]: clamp" in capsys.readouterr().out
    assert main(["chat", "Who are you?", "--cap", str(cap), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()


def test_space_bad_input_exits_2(space_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[space]\ncap_percentile = 100\n")
    assert main(["space", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "(0, 100)" in capsys.readouterr().err
    roles = tmp_path / "roles"
    roles.mkdir()
    (roles / "ghost.json").write_text('{"instruction": [{"pos": "You are a ghost."},]}')
    assert main(["space", "--roles", str(roles), "--config", str(space_dir / "tiny.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "ghost.json" in capsys.readouterr().err
    other = CapConfig.load(space_dir / "run" / "capping.json")
    import dataclasses

    wrong = dataclasses.replace(other, n_resid=other.n_resid + 2)
    wrong.save(tmp_path / "other.json")
    assert main(["chat", "hi", "--cap", str(tmp_path / "other.json"), "--max-new-tokens", "2"]) == 2
    assert "does not fit" in capsys.readouterr().err


CONS = """\
[consistency]
n_personas = 2
n_questions = 2
seeds = 2
temperatures = [1.0]
max_new_tokens = 8
batch_size = 4
n_boot = 200
mix_questions = 0
"""


def test_consistency_cli_with_space_bank(space_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "c.toml").write_text(CONS)
    bank = str(space_dir / "run" / "vectors")
    assert main(["consistency", "--config", str(tmp_path / "c.toml"), "--bank", bank, "--entries", "assistant_axis",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    m = s["results"]["1"]["measures"]
    assert set(m) == {"activation", "proj:assistant_axis", "score:evil"} and all(v["ratio"] > 0 for v in m.values())
    assert "ratio" in capsys.readouterr().out
    assert main(["consistency", "--config", str(tmp_path / "c.toml"), "--bank", bank, "--entries", "nope",
                 "--out", str(tmp_path / "run2")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[consistency]\nseeds = 1\n")
    assert main(["consistency", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run3")]) == 2
    assert ">= 2 seeds" in capsys.readouterr().err
