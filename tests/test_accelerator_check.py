"""scripts/accelerator_check.sh in its tiny mode, on this (CPU) machine: every section runs its code with small
configs and appends one JSON line (numbers, or an explicit skip reason where an accelerator is needed), and a
section killed by its time box is recorded as such while the others' lines are kept."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "accelerator_check.sh"
SECTIONS = ("pytest_gpu", "bf16_parity", "mfu_mbu", "big_prefill", "plan_vs_peak", "sweep_vs_hf", "serve")


def _run(out: Path, timeout: int, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    import sys

    r = subprocess.run(["bash", str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", **env})
    return r, [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _numbers(rec: dict) -> list[float]:
    """Every finite number in a record, nested dicts included (the device info and bookkeeping left out)."""
    found: list[float] = []

    def walk(x) -> None:
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            found.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk({k: v for k, v in rec.items() if k not in ("device", "wall_s", "tiny", "time")})
    return found


@pytest.mark.slow
def test_tiny_mode_records_every_section(tmp_path) -> None:
    r, recs = _run(tmp_path / "check.jsonl", timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    by = {}
    for rec in recs:
        by.setdefault(rec["section"], []).append(rec)
    assert set(by) == set(SECTIONS), (set(SECTIONS) - set(by))
    for rec in recs:
        assert "error" not in rec, rec
        assert rec["tiny"] is True
        assert isinstance(rec.get("skipped"), str) or _numbers(rec), rec
    # on a CPU: pytest -m gpu needs an accelerator; everything else ran its code on small shapes
    assert by["pytest_gpu"][0]["skipped"] == "no accelerator"
    parity = by["bf16_parity"][0]
    assert set(parity["models"]) == {"llama", "qwen2"}
    assert parity["max_abs_diff"] < 0.1 and parity["top1_agreement"] >= 0.9  # bf16, both on the same device
    m = by["mfu_mbu"][0]
    assert m["prefill"]["flops"] > 0 and m["prefill"]["seconds"] > 0 and m["decode"]["bytes_per_step"] > 0
    assert m["mfu"] is None and m["peak_note"]  # no peak known for a CPU: said so, not made up
    assert [b["model"] for b in by["big_prefill"]] == ["qwen3-32b", "gemma-2-27b-it"]
    for b in by["big_prefill"]:
        assert b["planned_bytes"] > b["param_bytes"] > 0 and b["prefill_s"] > 0
    assert [p["stage"] for p in by["plan_vs_peak"]] == ["prefill", "sweep", "train", "decode"]
    for p in by["plan_vs_peak"]:  # the stage's AOT program ran on inputs made from its abstract ones
        assert p["planned_bytes"] > 0 and p["run_s"] > 0 and p["backend"] == "cpu-estimate" and p["peak_note"]
    sw = by["sweep_vs_hf"][0]
    assert sw["grid_points"] == 6 and sw["max_abs_logprob_diff"] < 1e-4 and sw["ratio"] > 0  # fp32 on the CPU
    assert by["serve"][0]["tokens_per_s"] > 0
    assert "accelerator check:" in r.stdout and "bf16_parity" in r.stdout  # the summary


def test_a_section_killed_by_its_time_box_is_recorded(tmp_path) -> None:
    """Time boxes of 0.1 s or less (ACCEL_TIME_SCALE): every section is killed, each kill a line of its own."""
    r, recs = _run(tmp_path / "killed.jsonl", timeout=120, ACCEL_TIME_SCALE="0.001")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["section"] for x in recs] == ["pytest_gpu", "bf16_parity", "mfu_mbu", "big_prefill", "big_prefill",
                                            *["plan_vs_peak"] * 4, "sweep_vs_hf", "serve"]
    assert all(x["error"].startswith("timed out after") for x in recs), recs
    assert "ERROR: timed out" in r.stdout


def test_full_mode_without_an_accelerator_skips_every_section(tmp_path) -> None:
    """The real shapes (7B, 32B) are not tried on a CPU: every section says why it did not run."""
    r = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "full.jsonl")], cwd=ROOT, capture_output=True,
                       text=True, timeout=180, env={**os.environ, "PYTHON": __import__("sys").executable,
                                                    "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert {x["section"] for x in recs} == set(SECTIONS) and len(recs) == 11
    assert all(x.get("skipped") == "no accelerator" for x in recs), recs
