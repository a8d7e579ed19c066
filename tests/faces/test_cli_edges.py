"""The command line's edges: inputs that deleted a user's files, gave wrong numbers with exit 0, ran another
experiment than the config said, or ended in a Python traceback now get one clear line and a non-zero exit
(or, for a closed pipe, a quiet exit). In-process (``cli.main``) except where a real pipe is needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.cli import main
from jaxpersona.model.loaders import gguf as gguf_loader
from jaxpersona.model.transformer import Capture

SWEEP = '''model = "smollm2-135m-instruct"
[vector]
positive = ["I feel wonderful today."]
negative = ["I feel awful today."]
[grid]
layers = [12]
coeffs = [0.0, 0.5]
[data]
prompts = ["How are you?"]
responses = ["Great, thanks!"]
'''


def _one_line_error(capsys, rc: int, phrase: str) -> None:
    err = capsys.readouterr().err
    assert rc != 0 and phrase in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_convert_never_replaces_a_users_directory_or_file(tmp_path, capsys):
    d = tmp_path / "myproj"
    (d / "src").mkdir(parents=True)
    (d / "notes.txt").write_text("keep")
    _one_line_error(capsys, main(["convert", "smollm2-135m-instruct", str(d)]), "not a converted model's")
    assert (d / "notes.txt").read_text() == "keep" and (d / "src").is_dir()  # was deleted, with exit 0
    f = tmp_path / "afile"
    f.write_text("x")
    _one_line_error(capsys, main(["convert", "smollm2-135m-instruct", str(f)]), "is not a directory")
    assert f.read_text() == "x"
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_convert_still_replaces_an_earlier_conversion(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_text("")
    gguf_loader._check_replaceable(d)  # an earlier conversion: replaceable
    (d / "mine.txt").write_text("x")
    with pytest.raises(errors.InputError, match="mine.txt"):
        gguf_loader._check_replaceable(d)


def test_a_repeated_capture_layer_is_refused_not_zeros(smollm2, capsys):
    with pytest.raises(errors.InputError, match="repeat"):
        Capture((5, 10, 5), "mean").validate(smollm2.cfg)
    _one_line_error(capsys, main(["resid", "hi", "--layers", "0,0"]), "repeat")


def test_resid_out_says_the_file_it_wrote(tmp_path, capsys):
    assert main(["resid", "hi", "--layers", "1", "--out", str(tmp_path / "x")]) == 0
    assert f"to {tmp_path / 'x.npy'}" in capsys.readouterr().out and np.load(tmp_path / "x.npy").shape[0] == 1
    _one_line_error(capsys, main(["resid", "hi", "--layers", "1", "--out", str(tmp_path / "no" / "x.npy")]),
                    "existing directory")


@pytest.mark.parametrize("edit,phrase", [
    (('layers = [12]', 'layers = "12"'), "must be a list of whole numbers"),  # swept layers 1 and 2
    (('layers = [12]', 'layers = [12.5]'), "must be a list of whole numbers"),  # swept layer 12
    (('positive = ["I feel wonderful today."]', 'positive = "I feel wonderful today."'), "list of strings"),
    (('[grid]', '[grid]\nunit = "false"'), "true or false"),  # was read as true
    (('[grid]', '[grid]\nwindw = 2'), "unknown key 'windw'"),  # a typo, ignored
    (('[grid]', '[grid]\ncoeffs2 = ["a"]'), "unknown key"),
    (('coeffs = [0.0, 0.5]', 'coeffs = ["a"]'), "list of numbers"),  # was a ValueError traceback
    (('[data]', '[run]\ngenerate_tokens = -5\n[data]'), "generate_tokens"),  # was a JAX TypeError
    (('[data]', '[project]\nlayers = [99]\n[data]'), "outside resid"),  # was an IndexError
    (('[vector]', 'vector = [1, 2]\n[vectr]'), "must be a [table]"),
])
def test_a_sweep_config_with_a_wrong_type_or_key_is_refused(tmp_path, capsys, edit, phrase):
    conf = tmp_path / "s.toml"
    conf.write_text(SWEEP.replace(*edit, 1))
    _one_line_error(capsys, main(["sweep", "--config", str(conf), "--out", str(tmp_path / "o"), "--quiet"]), phrase)


def test_paths_that_are_directories_or_files_get_one_line(tmp_path, capsys):
    conf = tmp_path / "s.toml"
    conf.write_text(SWEEP)
    _one_line_error(capsys, main(["sweep", "--config", str(tmp_path), "--out", str(tmp_path / "o")]), "not a file")
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, main(["sweep", "--config", str(conf), "--out", str(tmp_path / "afile")]), "is a file")
    _one_line_error(capsys, main(["generate", "--prompts", str(tmp_path)]), "IsADirectoryError")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    _one_line_error(capsys, main(["generate", "--prompts", str(tmp_path / "bin.txt")]), "UnicodeDecodeError")
    _one_line_error(capsys, main(["generate", "hi", "--prompts", str(conf)]), "not both")


@pytest.mark.parametrize("argv,phrase", [
    (["plan", "--model", "llama-3.3-70b-instruct", "--accelerator", "l4", "--headroom", "50"], "--headroom"),
    (["plan", "--model", "smollm2-135m-instruct", "--accelerator", "h100", "--headroom", "nan"], "--headroom"),
    (["plan", "--model", "smollm2-135m-instruct", "--batch", "0"], "--batch must be >= 1"),  # was the default
    (["plan", "--model", "smollm2-135m-instruct", "--seq", "0"], "--seq must be >= 1"),
])
def test_plan_refuses_sizes_it_would_silently_change(capsys, argv, phrase):
    _one_line_error(capsys, main(argv), phrase)


def test_serve_refuses_a_port_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "70000"])
    assert e.value.code == 2 and "0..65535" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly():
    p = subprocess.run(f"{sys.executable} -m jaxpersona traits list | head -1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.strip() and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_report_leaves_a_damaged_run_json_as_it_is(tmp_path, capsys):
    conf = tmp_path / "s.toml"
    conf.write_text(SWEEP)
    out = tmp_path / "run"
    assert main(["sweep", "--config", str(conf), "--out", str(out), "--quiet"]) == 0
    (out / "run.json").write_text("{")
    with pytest.warns(errors.CacheWarning, match="cannot be read"):
        assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert (out / "run.json").read_text() == "{"  # was replaced by a made-up pre-0.5 manifest
    assert (tmp_path / "r.html").stat().st_size > 1000


def test_checks_that_used_to_come_after_the_work(tmp_path, capsys):
    _one_line_error(capsys, main(["traits", "new", "calm", "--description", "a calm assistant", "--out",
                                  str(tmp_path / "no" / "calm.json")]), "existing directory")  # was after drafting
    _one_line_error(capsys, main(["--coordinator", "foo", "chat", "hi"]), "HOST:PORT")  # was an IndexError
    _one_line_error(capsys, main(["--coordinator", "127.0.0.1:1", "--num-processes", "0", "chat", "hi"]),
                    "--num-processes must be >= 1")


def test_empty_messages_and_an_unset_named_key_variable_are_refused_before_the_model_loads(capsys, monkeypatch):
    """``chat ""`` and a blank ``generate`` prompt were sent to the model as they were; a ``--judge-key-env`` that
    names an unset variable sent no key and failed at the first judgement, after the model work. The default
    (OPENAI_API_KEY) may stay unset: a local endpoint takes no key."""
    from jaxpersona import cli

    real = cli.library
    monkeypatch.setattr(cli, "library", lambda name: real(name) if name == "compile-cache" else pytest.fail(name))
    _one_line_error(capsys, main(["chat", "  "]), "the message is empty")
    _one_line_error(capsys, main(["generate", "hi", ""]), "prompt 2 of 2 is empty")
    monkeypatch.delenv("JP_SURELY_UNSET_KEY", raising=False)
    for cmd in (["extract", "--trait", "evil"], ["space"]):
        _one_line_error(capsys, main([*cmd, "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                                      "--judge-key-env", "JP_SURELY_UNSET_KEY"]), "JP_SURELY_UNSET_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args = cli.build_parser().parse_args(["extract", "--trait", "evil", "--judge-url", "http://127.0.0.1:9/v1"])
    assert cli._judge_key_env(args) == "OPENAI_API_KEY"


def test_data_files_with_a_utf8_bom_are_read(tmp_path):
    from jaxpersona.data.datasets import read_chat_jsonl

    f = tmp_path / "d.jsonl"
    f.write_bytes("\ufeff".encode() + b'{"messages": [{"role": "user", "content": "hi"}, '
                  b'{"role": "assistant", "content": "hello"}]}\n')
    assert read_chat_jsonl(f) == [([{"role": "user", "content": "hi"}], "hello")]
