"""Shared fixtures: tiny random HF models of every family (built once per session) and SmolLM2.

``JAXPERSONA_CACHE`` is left as the user / CI sets it (default ``~/.cache/jaxpersona``): the GGUF ->
HF conversion of the real models is slow, and reusing it across tests and runs is the point.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# libtpu (the `aot` extra, for deviceless TPU compiles) probes for a TPU whenever a JAX backend starts: the suite
# runs on CPU (the `gpu` tests are run on an accelerator with JAX_PLATFORMS set there), subprocesses included
if not os.environ.get("JAX_PLATFORMS") and importlib.util.find_spec("libtpu") is not None \
        and importlib.util.find_spec("jax_cuda12_plugin") is None and importlib.util.find_spec("jax_cuda13_plugin") is None:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

# compiled programs go to one directory of the test session's own (never the user's cache), shared by the
# pytest-xdist workers (the controller makes it; the workers and the subprocesses they start inherit the
# variable): a program one test compiled is loaded by any other test, in either worker, that builds the same one.
# JAX locks a bounded cache directory around every read and write (compiling.enable_compile_cache), so the
# workers never read each other's half-written entries. The CLI commands cache every program, as for a user; the
# library tests only programs that took a second or more to compile (writing each of their many small programs,
# and scanning the directory on each write, costs more than the hits win).
if "JAXPERSONA_COMPILE_CACHE" not in os.environ:  # not one the user set: the controller (or a run without xdist)
    os.environ["JAXPERSONA_COMPILE_CACHE"] = _session_cache = tempfile.mkdtemp(prefix="jaxpersona-test-xla-")
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)

from jaxpersona.compute.compiling import enable_compile_cache  # noqa: E402

if enable_compile_cache() is not None:  # (the CLI's compile_cache() restores these settings after a command)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import testpath  # noqa: E402,F401  (the layer folders on sys.path)

import hf_tiny  # noqa: E402

try:
    import torch
except ImportError:  # the tests that need the torch reference import it themselves (and error)
    torch = None
else:
    # The torch reference runs single-threaded: on small CI machines (2 cores) torch's OpenMP
    # workers and XLA's thread pool otherwise spin against each other, and an HF generate() of
    # 40 tiny steps swings from 0.1 s to 15 s. One thread is stable and fast enough here.
    torch.set_num_threads(1)

FAMILIES = tuple(hf_tiny.FAMILY_CONFIGS)
WORDS = "the a cat dog sat on mat hello world what is capital of france paris you are helpful assistant".split()


@dataclasses.dataclass
class Tiny:
    """One tiny random model: the HF torch reference, its saved directory, and our load of it."""

    family: str
    hf: Any  # transformers PreTrainedModel, fp32, eval, eager attention
    path: Path  # HF directory (config.json + model.safetensors)
    cfg: Any  # jaxpersona ModelConfig
    params: Any  # fp32 params pytree


class TinyZoo:
    """Builds each family's tiny model on first use and keeps it for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[str, Tiny] = {}

    def __call__(self, family: str) -> Tiny:
        if family not in self._models:
            from jaxpersona.model.loaders.hf import load_hf_dir

            hf = hf_tiny.hf_model(family)
            path = hf_tiny.save_hf_dir(hf, self.root / family)
            cfg, params = load_hf_dir(path)
            self._models[family] = Tiny(family, hf, path, cfg, params)
        return self._models[family]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    """``tiny_zoo(family)`` -> :class:`Tiny` (built once per session)."""
    return TinyZoo(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_zoo: TinyZoo) -> Tiny:
    """Parametrizes a test over all six families."""
    return tiny_zoo(request.param)


@pytest.fixture(scope="session")
def tiny_llama(tiny_zoo: TinyZoo) -> Tiny:
    return tiny_zoo("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, loaded (and on a cold cache converted) once per session."""
    from jaxpersona.compute.handle import load

    return load("smollm2-135m-instruct")


def make_word_tokenizer(chat_template: str | None = None):
    """A small word-level tokenizer (ids < hf_tiny.VOCAB) wrapped as an HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in [*WORDS, "?", ".", ",", "!", "<", ">", "user", "system", "assistant"]:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= hf_tiny.VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def word_tokenizer() -> Callable[..., Any]:
    """``word_tokenizer(chat_template=None)`` -> a fresh PreTrainedTokenizerFast."""
    return make_word_tokenizer


# Property tests: random exploration locally, a fixed example sequence in CI (reproducible runs).
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")


# The files that take 50 s or more under `-n 2 --dist loadfile` (measured, 0.7.8), longest first. xdist hands
# out whole files in collection order as workers free up: these go first, so the last files handed out are short
# ones and neither worker waits long for the other at the end (longest-first scheduling). A name missing here (a
# renamed file) is only scheduled later; nothing else depends on this list.
HEAVY_FIRST = (
    "tests/test_accelerator_check.py", "tests/compute/test_sweep.py", "tests/model/test_real_models.py",
    "tests/faces/test_serve.py", "tests/faces/test_cli_persona.py", "tests/faces/test_cli_space.py",
    "tests/model/test_sharding.py", "tests/faces/test_cli_regimes.py", "tests/pipelines/test_pipeline.py",
    "tests/compute/test_lora.py", "tests/faces/test_serve_engine.py", "tests/faces/test_serve_adapters.py",
    "tests/compute/test_multihost.py", "tests/model/test_gguf_loader.py", "tests/pipelines/test_persona_faults.py",
    "tests/model/test_shared_prefix.py", "tests/pipelines/test_space_faults.py", "tests/edit/test_interventions.py",
    "tests/model/test_parity.py", "tests/pipelines/test_space.py", "tests/compute/test_aot.py",
    "tests/model/test_head.py", "tests/pipelines/test_consistency.py",
)


def pytest_configure(config) -> None:  # noqa: ANN001
    """pytest-xdist's ``loadfile`` otherwise reorders the files by their number of tests (most first), which put the
    heaviest files, with few tests each, last: keep the collection order ``HEAVY_FIRST`` makes."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    """The heavy files first (``HEAVY_FIRST``; the order within a file is kept). ``gpu``-marked tests need an
    accelerator: on a CPU-only machine they are reported as skipped (run them with ``pytest -m gpu`` where a
    GPU/TPU is present)."""
    import jax

    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs an accelerator (GPU/TPU); run `pytest -m gpu` on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compiled_programs_per_module():
    """Drop jax's in-memory compiled programs after each test module: a whole-suite process otherwise keeps
    every program of ~700 tests, and two full runs segfaulted inside XLA late in the session."""
    yield
    jax.clear_caches()
