"""A run directory: its config, its ``run.json`` manifest, its lock, and timed, cached stages.

Every pipeline runs on this one object::

    with open_run(out_dir, "space", config, model=model, seeds={"seed": config.seed}) as run:
        with run.stage("generate", "generating role answers") as st:
            recs = generate_cached(model, run.records("responses.jsonl"), jobs, ...)
        acts = run.arrays("activations.npz", key, compute)        # atomic; unreadable -> recomputed
        run.write_json("summary.json", summary)

``open_run`` takes an exclusive lock (a second process on the same directory gets
:class:`~jaxpersona.errors.RunLockedError`), writes ``config.json`` and a ``run.json`` manifest with
status ``running``; leaving the ``with`` block marks it ``complete`` (or ``failed`` with the error).
The manifest records the schema version, kind, argv, seeds, the config's digest, start/end times,
the stages in order (wall seconds, compile seconds — tracing, lowering, compiling or loading from the
persistent compile cache — cache hits, artifacts), the package version with its git SHA and
dirty flag, the jax version, devices and process count, and the model's digest. Every write is to a
temporary name renamed into place, so a kill never leaves a half-written file under a final name.
A directory written before the manifest existed is recognised once (:mod:`jaxpersona.runner.legacy`)
and gets its ``run.json`` on its next resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.records import (
    TMP_TAG,
    KeyedJsonl,
    atomic_write,
    digest,
    load_arrays,
    remove_quietly,
    save_arrays,
)
from jaxpersona.compute.compiling import COMPILE_CLOCK, cache_dir_in_use
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.compute.progress import progress_bar
from jaxpersona.runner import legacy
from jaxpersona.version import __version__

SCHEMA_VERSION = 1
MANIFEST = "run.json"
CONFIG = "config.json"
LOCK = ".run.lock"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """``obj`` as JSON at ``path``, written to a temporary name and renamed into place."""
    text = json.dumps(obj, indent=indent, default=default)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of ``run_dir``, or None when it has none (or it cannot be read)."""
    try:
        got = json.loads((Path(run_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def _git(*args: str) -> str | None:
    src = Path(__file__).resolve().parents[2]
    if not (src / ".git").exists():
        return None
    try:
        return subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def package_info() -> dict[str, Any]:
    """Version of jaxpersona, with the git SHA and dirty flag when it runs from a git checkout."""
    sha = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"name": "jaxpersona", "version": __version__, "git_sha": sha, "dirty": None if sha is None else bool(dirty)}


def platform_info() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d.device_kind) for d in jax.devices()], "device_count": jax.device_count(),
            "process_count": jax.process_count(), "process_index": jax.process_index()}


@dataclasses.dataclass
class Stage:
    """One stage of a run while it runs: a progress bar, cache hits and the artifacts it wrote."""

    name: str
    progress: bool
    cache_hits: int = 0
    artifacts: list[str] = dataclasses.field(default_factory=list)
    total: int | None = None
    _bar: Any = None

    @property
    def bar(self) -> Any:
        """The stage's progress bar (over ``total`` units)."""
        if self._bar is None:
            self._bar = progress_bar(self.total or 0, self.name, self.progress)
        return self._bar

    def hit(self, n: int = 1) -> None:
        """Count ``n`` units served from the cache."""
        self.cache_hits += n


class Run:
    """An open run directory (see the module docstring). Create with :func:`open_run`."""

    def __init__(self, out: Path, kind: str, manifest: dict[str, Any], lock: Any, *, log: Callable[[str], None],
                 progress: bool) -> None:
        self.out = out
        self.kind = kind
        self.manifest = manifest
        self.log = log
        self.progress = progress
        self._lock = lock
        self._stage: Stage | None = None
        self._t0 = time.perf_counter()
        self._c0 = COMPILE_CLOCK.now()

    # --- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.finish("complete")
        else:
            self.finish("failed", error=f"{type(exc).__name__}: {exc}")

    def finish(self, status: str, error: str | None = None) -> None:
        """Mark the run ``complete`` or ``failed`` and release the directory."""
        wall = time.perf_counter() - self._t0
        c = COMPILE_CLOCK.now() - self._c0
        self.manifest.update(status=status, ended=now(), wall_s=round(wall, 3), compile_s=round(c.seconds, 3),
                             compile_cache={"hits": c.hits, "misses": c.misses,
                                            "dir": cache_dir_in_use()})
        if status == "complete":
            per = ", ".join(f"{k} {v:.1f}s" for k, v in self.compile_time().items() if v >= 0.05)
            self.log(f"compile time: {c.seconds:.1f}s of {wall:.0f}s wall ({per or 'none'}); persistent compile cache "
                     + (f"{c.hits} hits, {c.misses} misses" if cache_dir_in_use() else "off"))
        if error is not None:
            self.manifest["error"] = error[:2000]
        self._save_manifest()
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
                self._lock.close()
            self._lock = None

    def _save_manifest(self) -> None:
        write_json(self.out / MANIFEST, self.manifest, indent=1)

    # --- stages ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, message: str | None = None, *, total: int | None = None) -> Iterator[Stage]:
        """Time a stage, log its line, give it a progress bar (``total`` units), record it in the manifest."""
        if message is not None:
            self.log(message)
        st = Stage(name, self.progress, total=total)
        rec: dict[str, Any] = {"name": name, "status": "running", "started": now()}
        self.manifest["stages"].append(rec)
        self._save_manifest()
        prev, self._stage = self._stage, st
        t0, c0 = time.perf_counter(), COMPILE_CLOCK.now()
        try:
            yield st
        except BaseException:
            rec["status"] = "failed"
            raise
        else:
            rec["status"] = "complete"
        finally:
            self._stage = prev
            if st._bar is not None:
                st._bar.close()
            c = COMPILE_CLOCK.now() - c0
            rec.update(wall_s=round(time.perf_counter() - t0, 3), compile_s=round(c.seconds, 3),
                       compile_cache={"hits": c.hits, "misses": c.misses}, cache_hits=st.cache_hits,
                       artifacts=st.artifacts)
            self._save_manifest()

    def _stage_sums(self, field: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.manifest["stages"]:
            if field in s:
                out[s["name"]] = out.get(s["name"], 0.0) + s[field]
        return out

    def wall(self) -> dict[str, float]:
        """Wall seconds of this attempt's finished stages, by name (summed over repeats of a name)."""
        return self._stage_sums("wall_s")

    def compile_time(self) -> dict[str, float]:
        """Seconds of each finished stage spent tracing, lowering and compiling (or loading compiled programs
        from the persistent cache), by name; the rest of ``wall()`` is run time."""
        return self._stage_sums("compile_s")

    def elapsed(self) -> float:
        """Seconds since this attempt opened the run."""
        return time.perf_counter() - self._t0

    def artifact(self, path: str | Path) -> None:
        """Record ``path`` (written by another module, e.g. a vector bank or a plot) as the current stage's artifact."""
        self._artifact(self.out / path)

    def _artifact(self, path: Path) -> None:
        if self._stage is not None:
            rel = str(path.relative_to(self.out)) if path.is_relative_to(self.out) else str(path)
            self._stage.artifacts.append(rel)

    def _hit(self) -> None:
        if self._stage is not None:
            self._stage.hit()

    # --- cached work and artifacts -------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.out / name

    def records(self, name: str) -> KeyedJsonl:
        """Append-only keyed JSONL records (a torn last line from a kill is ignored)."""
        return KeyedJsonl(self.out / name)

    def record(self, name: str, key: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        """One JSON record cached in the keyed JSONL ``name`` under ``key``: read back when present (a cache hit),
        else ``compute()`` stored durably as ``{"key": key, **compute()}``. Returns the stored record."""
        store = self.records(name)
        if key in store:
            self._hit()
        else:
            store.put([{"key": key, **compute()}])
            self._artifact(store.path)
        return store[key]

    def arrays(self, name: str, key: str, compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``compute()`` cached as ``name`` (npz) under ``key``: reloaded while the key matches, recomputed when
        it differs, or — with one :class:`~jaxpersona.errors.CacheWarning` — when the file cannot be read."""
        path = self.out / name
        got = load_arrays(path, key)
        if got is not None:
            self._hit()
            return got
        out = dict(compute())
        save_arrays(path, key, out)
        self._artifact(path)
        return out

    def write_json(self, name: str, obj: Any, indent: int | None = 2,
                   default: Callable[[Any], Any] | None = None) -> Path:
        path = write_json(self.out / name, obj, indent=indent, default=default)
        self._artifact(path)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = write_text(self.out / name, text)
        self._artifact(path)
        return path

    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> Path:
        return self.write_text(name, "".join(json.dumps(r) + "\n" for r in rows))

    def write_npz(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """``arrays`` as an npz artifact (no cache key: for results, not caches)."""
        path = self.out / name

        def write(tmp: Path) -> None:
            entries: dict[str, Any] = dict(arrays)  # numpy's stub would read a key as savez's allow_pickle
            with open(tmp, "wb") as f:
                np.savez(f, **entries)

        atomic_write(path, write)
        self._artifact(path)
        return path

    def save_npy(self, name: str, array: np.ndarray) -> Path:
        path = self.out / name
        atomic_write(path, lambda tmp: _save_npy(tmp, array))
        self._artifact(path)
        return path


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, array)


def _lock(out: Path) -> Any:
    f = open(out / LOCK, "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise errors.RunLockedError(
            f"another process is writing {out} (its lock {out / LOCK} is held); wait for it to finish, or "
            "choose another output directory") from None
    return f


def open_run(out_dir: str | Path, kind: str, config: Mapping[str, Any], *, model: Model | str | None = None,
             seeds: Mapping[str, int] | None = None, argv: list[str] | None = None,
             log: Callable[[str], None] = print, progress: bool = True,
             write_config: bool = True) -> Run:
    """Open (create or resume) the run directory ``out_dir`` for a run of ``kind`` with ``config``.

    Writes ``config.json`` (``config`` as given) unless ``write_config`` is False, and ``run.json``.
    A directory from before ``run.json`` existed is adopted (its kind recognised by the old rules)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise errors.InputError(f"the output directory {out} is a file; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        for leftover in out.glob(f".*{TMP_TAG}*"):  # an atomic write killed mid-way left its temporary
            remove_quietly(leftover)
        old = read_manifest(out)
        if old is None and any(p.name not in (LOCK,) for p in out.iterdir()):
            old = legacy.adopt(out)
        if old is not None and old.get("kind") not in (None, kind):
            raise errors.InputError(f"{out} holds a {old.get('kind')!r} run, not a {kind!r} run; choose another "
                                    "output directory")
        cfg = json.loads(json.dumps(dict(config), default=str))
        if write_config:
            write_json(out / CONFIG, cfg)
        fp = model if isinstance(model, str) or model is None else model_fingerprint(model)
        manifest = {
            "schema_version": SCHEMA_VERSION, "kind": kind, "status": "running",
            "argv": list(sys.argv if argv is None else argv), "seeds": dict(seeds or {}),
            "config_digest": digest(cfg), "started": now(), "ended": None,
            "attempt": int((old or {}).get("attempt", 0)) + 1,
            "created": (old or {}).get("created") or (old or {}).get("started") or now(),
            "stages": [], "package": package_info(), "platform": platform_info(),
            "model": {"name": getattr(model, "name", None), "digest": fp},
        }
        if old is not None and old.get("legacy"):
            manifest["legacy"] = old["legacy"]
        run = Run(out, kind, manifest, lock, log=log, progress=progress)
        run._save_manifest()
        return run
    except BaseException:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        raise


__all__ = ["CONFIG", "LOCK", "MANIFEST", "Run", "SCHEMA_VERSION", "Stage", "open_run", "read_manifest", "write_json",
           "write_text"]
