"""Run directories written before ``run.json`` existed (jaxpersona < 0.5): recognised once, here only.

The rules are the file patterns each pipeline wrote; :func:`adopt` writes the directory's ``run.json``
so nothing after it needs to guess again. Used by :func:`jaxpersona.runner.run.open_run` (resuming an
old directory) and by ``jaxpersona report`` (showing one); nothing else recognises a run by its files.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxpersona.artifacts.records import atomic_write

ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")


def json_or_none(path: Path) -> Any:
    """Parsed JSON of ``path``, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config_has(d: Path, *keys: str) -> bool:
    cfg = json_or_none(d / "config.json")
    return isinstance(cfg, dict) and all(k in cfg for k in keys)


def is_bank(d: Path) -> bool:
    """Whether ``d`` looks like a :class:`~jaxpersona.artifacts.bank.VectorBank` directory (Orbax, two items)."""
    return (d / "bank").is_dir() and (d / "vectors").is_dir() and (d / "_CHECKPOINT_METADATA").is_file()


# kind -> how a pre-0.5 directory of that kind looks; the first match wins
RULES: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    ("regimes", lambda d: (d / "regimes.json").is_file()),
    ("space", lambda d: (d / "capping.json").is_file() or (d / "pca.json").is_file()),
    ("consistency", lambda d: (d / "generations.jsonl").is_file() or _config_has(d, "seeds", "temperatures")),
    ("extract-all", lambda d: isinstance(json_or_none(d / "summary.json"), list) and (d / "steering").is_dir()),
    ("extract", lambda d: _config_has(d, "trait", "steer_coeffs") or ((d / "steering").is_dir() and is_bank(d / "vectors"))),
    ("sweep", lambda d: (d / "config.toml").is_file() and any((d / f).is_file() for f in
                                                              ("results.jsonl", "results.csv", "vectors.npy"))),
    ("finetune", lambda d: (d / "log.jsonl").is_file() and ((d / "adapters").is_dir() or (d / "ckpt").is_dir())),
    ("screen", lambda d: (d / "screen_summary.json").is_file() or (d / "screen.jsonl").is_file()),
    ("trait-data", lambda d: (d / "trait.jsonl").is_file() and (d / "neutral.jsonl").is_file()),
    ("bank", is_bank),
)


def recognise(run_dir: Path) -> str | None:
    """The kind of a pre-``run.json`` directory by the old file rules, or None."""
    for kind, matches in RULES:
        if matches(run_dir):
            return kind
    return None


def adopt(run_dir: Path, write: bool = True) -> dict[str, Any] | None:
    """A manifest for a pre-``run.json`` directory (written as its ``run.json`` when ``write``), or None when
    no rule recognises it.

    A bare vector bank is recognised (kind ``bank``) but nothing is written into it: it is an Orbax
    checkpoint, not a run directory, and is recognised from its own layout every time. Writing can
    fail (a read-only directory): the :class:`OSError` is the caller's to handle."""
    run_dir = Path(run_dir)
    kind = recognise(run_dir)
    if kind is None:
        return None
    files = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    mtime = max((p.stat().st_mtime for p in files), default=run_dir.stat().st_mtime)
    manifest = {"schema_version": 1, "kind": kind, "status": "unknown", "argv": None, "seeds": {},
                "config_digest": None, "started": None,
                "ended": datetime.datetime.fromtimestamp(mtime, datetime.UTC).isoformat(timespec="seconds"),
                "attempt": 0, "stages": [], "package": {"name": "jaxpersona", "version": "<0.5"},
                "legacy": {"recognised_by": "pre-0.5 file rules (jaxpersona.runner.legacy)"}}
    if write and kind != "bank":
        text = json.dumps(manifest, indent=1)
        atomic_write(run_dir / "run.json", lambda tmp: tmp.write_text(text))
    return manifest
