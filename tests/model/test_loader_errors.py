"""HF model directories without a usable tokenizer get a typed, one-line error (never a transformers
traceback or a silent one-token fallback tokenizer), and the CLI does not print transformers'
"PyTorch was not found" advisory when torch is absent.

Model directories are copies of the session's tiny random Llama (``conftest.tiny_zoo``: config.json,
generation_config.json and model.safetensors, no tokenizer files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jaxpersona
from jaxpersona import errors
from jaxpersona.model.loaders.hf import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_tokenizer_dir(tmp_path: Path, tiny_llama) -> Path:
    """Config and weights, but no tokenizer files at all."""
    d = tmp_path / "model"
    shutil.copytree(tiny_llama.path, d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    return d


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


# --------------------------------------------------------------------------------------------
# missing / unusable tokenizer files
# --------------------------------------------------------------------------------------------
def test_python_api_names_the_missing_tokenizer_files(no_tokenizer_dir: Path) -> None:
    with pytest.raises(errors.ModelNotFoundError) as info:
        jaxpersona.load(no_tokenizer_dir)
    msg = str(info.value)
    assert str(no_tokenizer_dir) in msg and "no usable tokenizer" in msg
    assert "tokenizer.json" in msg and "tokenizer_config.json" in msg and "copy" in msg
    assert "\n" not in msg


def test_cli_missing_tokenizer_is_one_line_exit_2(no_tokenizer_dir: Path) -> None:
    proc = _run(["-m", "jaxpersona", "chat", "hi", "--model", str(no_tokenizer_dir)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxpersona: error: ")
    assert str(no_tokenizer_dir) in lines[0] and "tokenizer.json" in lines[0]


@pytest.mark.parametrize(
    "present, missing",
    [(["vocab.json"], "merges.txt"), (["merges.txt"], "vocab.json"), (["tokenizer_config.json"], "tokenizer.json")],
)
def test_partial_tokenizer_files_name_what_is_missing(no_tokenizer_dir: Path, present: list[str], missing: str) -> None:
    for name in present:
        (no_tokenizer_dir / name).write_text("{}" if name.endswith(".json") else "#version: 0.2\n")
    with pytest.raises(errors.ModelNotFoundError, match="no usable tokenizer") as info:
        load_tokenizer(no_tokenizer_dir)
    assert missing in str(info.value)


def test_degenerate_tokenizer_is_refused(no_tokenizer_dir: Path) -> None:
    """A tokenizer.json that maps 'hello world' to one unknown id would run the model on garbage."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(
        no_tokenizer_dir
    )
    with pytest.raises(errors.ModelNotFoundError, match="degenerate tokenizer") as info:
        jaxpersona.load(no_tokenizer_dir)
    assert str(no_tokenizer_dir) in str(info.value) and "tokenizer.json" in str(info.value)


def test_corrupt_tokenizer_json_is_typed(no_tokenizer_dir: Path) -> None:
    (no_tokenizer_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(errors.CorruptCheckpointError, match="cannot load the tokenizer") as info:
        load_tokenizer(no_tokenizer_dir)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# directories with a tokenizer still load
# --------------------------------------------------------------------------------------------
def test_dir_with_tokenizer_json_loads(no_tokenizer_dir: Path, word_tokenizer) -> None:
    word_tokenizer().save_pretrained(no_tokenizer_dir)
    model = jaxpersona.load(no_tokenizer_dir)
    ids = model.tokenizer.encode("hello world", add_special_tokens=False)
    assert len(ids) == 2 and model.tokenizer.unk_token_id not in ids
    assert model.tokenizer.padding_side == "left"


def test_dir_with_bpe_vocab_files_only_loads(no_tokenizer_dir: Path) -> None:
    """vocab.json + merges.txt (no tokenizer.json) is a usable tokenizer: the file check lets it through."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the cat sat on the mat"] * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])  # fmt: skip
    bpe.save_model(str(no_tokenizer_dir))
    (no_tokenizer_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    )
    assert not (no_tokenizer_dir / "tokenizer.json").exists()
    tok = load_tokenizer(no_tokenizer_dir)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert len(tok) >= 256 and ids and tok.decode(ids) == "hello world"


# --------------------------------------------------------------------------------------------
# no "PyTorch was not found" advisory
# --------------------------------------------------------------------------------------------
def test_cli_without_torch_does_not_print_the_pytorch_advisory(no_tokenizer_dir: Path, word_tokenizer) -> None:
    word_tokenizer().save_pretrained(no_tokenizer_dir)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # `import torch` fails and find_spec("torch") is None, as without torch
        from jaxpersona.cli import main
        rc = main(["resid", "hello world", "--layers", "0", "--model", {str(no_tokenizer_dir)!r}])
        import transformers
        from transformers.utils import import_utils
        assert not import_utils.is_torch_available(), "torch was not blocked"
        # other transformers warnings are not silenced
        transformers.logging.get_logger("transformers").warning("another transformers warning")
        sys.exit(rc)
        """
    )
    proc = _run(["-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resid[0]: shape [1, 64]" in proc.stdout
    assert "PyTorch was not found" not in proc.stderr
    assert "another transformers warning" in proc.stderr
