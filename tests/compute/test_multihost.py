"""Multi-host, as documented (``init_distributed`` / ``--coordinator``: one process per host), simulated with
4 local CPU processes x 2 virtual devices each (jax.distributed, gloo collectives): a steering sweep sharded over
all 8 devices returns the rows one process computes alone, and one LoRA training step (the trainer's loss and
AdamW, params sharded on a (data 8, model 1) mesh, the batch split over the processes) gives one process's loss,
gradients and updated adapter factors. Every process is time-boxed, so a hang fails instead of stalling."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
NPROC, DEVICES_EACH = 4, 2
TIMEOUT = 240  # seconds for all the processes of one test (about 25 s on 2 cores)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(devices: int | None) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(script: str, multi_argv, one_argv) -> None:
    """Start NPROC processes of ``script`` (``multi_argv(pid)``, DEVICES_EACH CPU devices each) and, beside them,
    the one-process reference (``one_argv``: pid -1, one device); wait for all within TIMEOUT. On a timeout or a
    failure every process still running is killed and the test fails."""
    runs = [(pid, multi_argv(pid), DEVICES_EACH) for pid in range(NPROC)] + [(-1, one_argv, None)]
    procs = [(pid, subprocess.Popen([sys.executable, script, *argv], env=_env(devices), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)) for pid, argv, devices in runs]
    try:
        for pid, p in procs:
            try:
                _, err = p.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {pid} did not finish in {TIMEOUT} s (a collective hung?)")
            assert p.returncode == 0, f"process {pid}: {err[-3000:]}"
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def hf_dir(tiny_llama) -> str:
    return str(tiny_llama.path)


def test_four_processes_of_two_devices_give_the_sweep_rows_of_one(hf_dir, tmp_path) -> None:
    script = str(SCRIPTS / "multiprocess_sweep.py")
    port = _free_port()
    _run(script, lambda pid: [str(pid), port, hf_dir, str(tmp_path / "multi.json"), str(NPROC)],
         ["-1", port, hf_dir, str(tmp_path / "one.json")])
    multi, one = json.loads((tmp_path / "multi.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert multi["processes"] == NPROC and multi["devices"] == NPROC * DEVICES_EACH
    assert one["processes"] == 1 and one["devices"] == 1
    assert len(multi["rows"]) == len(one["rows"]) == 2 * 2 * 4 * 3  # vectors x layers x coeffs x prompts
    for a, b in zip(multi["rows"], one["rows"]):
        assert {k: v for k, v in a.items() if k != "logprob"} == {k: v for k, v in b.items() if k != "logprob"}
        assert abs(a["logprob"] - b["logprob"]) <= 1e-5


def test_four_processes_of_two_devices_give_the_training_step_of_one(hf_dir, tmp_path) -> None:
    script = str(SCRIPTS / "multiprocess_train.py")
    port = _free_port()
    multi_out, one_out = tmp_path / "multi.json", tmp_path / "one.json"
    _run(script, lambda pid: [str(NPROC), str(pid), port, hf_dir, str(multi_out)],
         ["1", "-1", port, hf_dir, str(one_out)])
    multi, one = json.loads(multi_out.read_text()), json.loads(one_out.read_text())
    assert multi["processes"] == NPROC and multi["devices"] == NPROC * DEVICES_EACH and multi["param_devices"] == 8
    assert one["processes"] == 1
    # each process built only its own devices' rows of the batch of 16: disjoint, together the whole batch
    rows = [json.loads(Path(f"{multi_out}.p{p}.json").read_text())["rows"] for p in range(NPROC)]
    assert all(len(r) == 16 // NPROC for r in rows)
    assert sorted(sum(rows, [])) == list(range(16))
    assert abs(multi["loss"] - one["loss"]) <= 1e-5 and abs(multi["ce"] - one["ce"]) <= 1e-5
    assert one["moved"] > 1e-4  # the step changed the factors
    m, o = np.load(f"{multi_out}.npz"), np.load(f"{one_out}.npz")
    assert sorted(m.files) == sorted(o.files) and len(m.files) == 2 * 2 * 7  # (new, grad) x (a, b) x 7 targets
    for k in m.files:
        assert m[k].shape == o[k].shape, k
        assert float(np.abs(m[k] - o[k]).max()) <= 1e-5, k
