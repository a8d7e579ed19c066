"""Append-only keyed JSONL records: the resume mechanism of long runs.

Every finished unit of work (a generated response, a judgement, ...) is one JSON line with a
``key``. Writes are flushed and fsync-ed before the run moves on, so a killed run loses at most the
unit in flight; a rerun reads the file back and skips every key it already has. A torn last line
(killed mid-write) is ignored. :func:`cached_arrays` keeps a stage's arrays (an ``.npz``) under the key of
what they were computed from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors

TMP_TAG = ".jaxpersona-tmp-"  # temporary files and folders of atomic writes carry this in their name


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's content, or an :class:`~jaxpersona.errors.InputError` naming ``what`` it was meant to be."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise errors.InputError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise errors.InputError(f"{what} {path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def digest(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (keys for cached work)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class KeyedJsonl:
    """``{key: record}`` backed by an append-only JSONL file (last write of a key wins)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        self._torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                self._torn = f.read(1) != b"\n"
        if self.path.exists():
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn final line from a killed run
                    if isinstance(rec, dict) and "key" in rec:
                        self.records[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.records[key]

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str, default: Any = None) -> Any:
        return self.records.get(key, default)

    def put(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (each with a ``key``) durably."""
        records = list(records)
        if not records:
            return
        with open(self.path, "a") as f:
            if self._torn:  # end the torn line so the next record starts on its own
                f.write("\n")
                self._torn = False
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r["key"]] = r


def cached_arrays(path: Path, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``compute()`` saved to ``path`` (npz) under ``key``; reloaded while the key matches."""
    if path.exists():
        got = np.load(path, allow_pickle=False)
        if str(got["key"]) == key:
            return {k: got[k] for k in got.files if k != "key"}
    out = compute()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=np.asarray(key), **out)
    tmp.replace(path)
    return out


def remove_quietly(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        with contextlib.suppress(OSError):
            p.unlink()


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_TAG}{uuid.uuid4().hex[:12]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)
