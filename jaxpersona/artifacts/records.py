"""Append-only keyed JSONL records: the resume mechanism of long runs.

Every finished unit of work (a generated response, a judgement, ...) is one JSON line with a
``key``. Writes are flushed and fsync-ed before the run moves on, so a killed run loses at most the
unit in flight; a rerun reads the file back and skips every key it already has. A torn last line
(killed mid-write) is dropped. :func:`load_arrays` / :func:`save_arrays` keep a stage's arrays (an ``.npz``)
under the key of what they were computed from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Iterable, Mapping
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
        bad, good = 0, []
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        bad += 1  # a torn line from a killed run (or a file cut short)
                        continue
                    good.append(line if line.endswith("\n") else line + "\n")
                    if isinstance(rec, dict) and "key" in rec:
                        self.records[rec["key"]] = rec
        if bad:
            # keep only the readable lines, so the next open finds a clean file (and warns no more)
            text = "".join(good)
            atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self._torn = False
            warnings.warn(f"{self.path}: {bad} unreadable line(s) dropped (a run killed mid-write, or a file cut "
                          "short); their work is redone", errors.CacheWarning, stacklevel=2)

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


def load_arrays(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path`` (npz) under ``key``; None when absent or stale, and None with one
    :class:`~jaxpersona.errors.CacheWarning` when the file cannot be read (cut short, corrupt)."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            got = np.load(f, allow_pickle=False)
            if not isinstance(got, np.lib.npyio.NpzFile):
                raise ValueError("not an npz archive")
            with got:
                if str(got["key"]) != key:
                    return None
                return {k: got[k] for k in got.files if k != "key"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"cached {path} could not be read ({type(e).__name__}: {e}); recomputing it",
                      errors.CacheWarning, stacklevel=3)
        return None


def save_arrays(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """``arrays`` and their ``key`` as an npz, written to a temporary name and renamed into place."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            named: Mapping[str, Any] = arrays  # Any: numpy's stub would match the names to savez's own keywords
            np.savez(f, key=np.asarray(key), **named)

    atomic_write(path, write)


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
