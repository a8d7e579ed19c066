"""The command line: real runs write what they say, bad input is one line on stderr and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxpersona.cli import main

SMALL_SWEEP = """
model = "smollm2-135m-instruct"
[vector]
name = "joy"
positive = ["I am so happy!", "What a lovely day!"]
negative = ["I am so sad.", "What an awful day."]
[grid]
kind = "steer"
layers = [4, 12]
coeffs = [-6.0, 0.0, 6.0]
[data]
prompts = ["How are you?", "Describe today."]
responses = ["Wonderful, thanks!", "Bright and happy."]
[project]
layers = [12]
"""


def test_sweep_from_config_writes_run_dir_and_resumes(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_SWEEP)
    out = tmp_path / "run"
    assert main(["sweep", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean log-prob" in printed and "slope" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2  # layers x coeffs x prompts
    assert {"logprob", "proj/joy@12", "layer", "coeff"} <= set(rows[0])
    assert np.load(out / "vectors.npy").shape == (1, 31, 576)
    base = [r["logprob"] for r in rows if r["coeff"] == 0.0]
    assert base[:2] == pytest.approx(base[2:], abs=1e-5)  # coeff 0 is the same at both layers
    before = (out / "results.jsonl").read_text()
    assert main(["sweep", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert (out / "results.jsonl").read_text() == before  # resumed: nothing recomputed or appended


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["chat", "hi", "--model", "no-such-model"], "unknown model"),
        (["chat", "hi", "--dtype", "float16"], "not supported"),
        (["generate"], "no prompts"),
        (["generate", "--prompts", "/nonexistent/prompts.txt"], "does not exist"),
        (["resid", "hello", "--layers", "0,99"], "outside resid"),
        (["resid", "hello", "--layers", "a,b"], "comma-separated"),
        (["sweep", "--config", "/nonexistent.toml"], "does not exist"),
        (["convert", "/nonexistent.gguf", "/tmp/x"], "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpersona: error:") and needle in err


def test_sweep_on_a_mesh_equals_one_device(tmp_path: Path) -> None:
    """``jaxpersona sweep --mesh 2x3`` on 8 virtual CPU devices (grid over data, weights tensor parallel over
    model) writes the rows a one-device run writes; a mesh larger than the devices exits 2 with one line."""
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_SWEEP)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    assert main(["sweep", "--config", str(cfg), "--out", str(tmp_path / "one"), "--quiet"]) == 0  # this process
    done = subprocess.run([sys.executable, "-m", "jaxpersona.cli", "sweep", "--config", str(cfg), "--out",
                           str(tmp_path / "mesh"), "--quiet", "--mesh", "2x3"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {name: [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
            for name in ("one", "mesh")}
    assert len(runs["one"]) == len(runs["mesh"]) == 12
    for a, b in zip(runs["one"], runs["mesh"]):
        assert (a["layer"], a["coeff"], a["prompt"]) == (b["layer"], b["coeff"], b["prompt"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
        assert a["proj/joy@12"] == pytest.approx(b["proj/joy@12"], abs=1e-3, rel=1e-5)
    bad = subprocess.run([sys.executable, "-m", "jaxpersona.cli", "sweep", "--config", str(cfg), "--out",
                          str(tmp_path / "bad"), "--mesh", "4x4"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs 16 devices" in bad.stderr and not (tmp_path / "bad").exists()


def test_a_command_on_a_machine_without_a_tpu_prints_no_libtpu_probes() -> None:
    """The ``aot`` extra installs libtpu (the suite has it); on a machine with no TPU and no CUDA plugin, a command
    run with JAX_PLATFORMS unset starts JAX on the CPU, so libtpu's host probes (warnings, an ``E0000 ...
    INVALID_ARGUMENT`` line) never print; JAX_PLATFORMS set by the user stands."""
    import importlib.util

    assert importlib.util.find_spec("libtpu") is not None, "the test extras include libtpu (the aot extra)"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-m", "jaxpersona.cli", "chat", "Hi", "--max-new-tokens", "2"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
    assert "E0000" not in r.stderr and "TPU_ACCELERATOR_TYPE" not in r.stderr, r.stderr[-3000:]


def test_bad_config_files(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [unclosed")
    assert main(["sweep", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    nogrid = tmp_path / "nogrid.toml"
    nogrid.write_text(SMALL_SWEEP.split("[grid]")[0])
    assert main(["sweep", "--config", str(nogrid), "--out", str(tmp_path / "o")]) == 2
    assert "missing 'grid'" in capsys.readouterr().err


def test_module_entry_point_exit_code() -> None:
    r = subprocess.run([sys.executable, "-m", "jaxpersona", "chat", "x", "--model", "nope"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_sweep_relative_units_scale_by_the_datas_residual_norm(tmp_path: Path) -> None:
    """Relative units (the default): the saved vectors have norm |resid[l]| = the mean response-token
    norm of the unsteered residual on the sweep's data, recomputed here from per-token captures."""
    from jaxpersona.data.chat import conversation
    from jaxpersona.compute.handle import load
    from jaxpersona.compute.batching import pad_left
    from jaxpersona.model.transformer import Capture

    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_SWEEP)
    out = tmp_path / "run"
    assert main(["sweep", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    vec = np.load(out / "vectors.npy")[0]
    m = load("smollm2-135m-instruct")
    tok = m.tokenizer
    norms = []
    for p, r in (("How are you?", "Wonderful, thanks!"), ("Describe today.", "Bright and happy.")):
        ids_p = tok.encode(m.format_chat(conversation(p)), add_special_tokens=False)
        ids_r = tok.encode(r, add_special_tokens=False)
        h = np.asarray(m.run(pad_left([ids_p + ids_r], m.pad_id, bucket=1),
                             capture=Capture(tuple(range(m.cfg.n_resid)), "tokens"), logits=False).captured)
        norms.append(np.linalg.norm(h[:, 0, len(ids_p):], axis=-1).mean(axis=1))
    np.testing.assert_allclose(np.linalg.norm(vec, axis=-1), np.mean(norms, axis=0), rtol=1e-4)
    cfg.write_text(SMALL_SWEEP.replace('kind = "steer"', 'kind = "steer"\nunits = "absolute"'))
    assert main(["sweep", "--config", str(cfg), "--out", str(tmp_path / "abs"), "--quiet"]) == 0
    raw = np.load(tmp_path / "abs" / "vectors.npy")[0]
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True),
                               vec / np.linalg.norm(vec, axis=-1, keepdims=True), atol=1e-5)
