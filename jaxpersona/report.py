"""``jaxpersona report RUN_DIR``: one self-contained static HTML page of any run directory.

The page works offline: no network, no external JS/CSS/fonts; figures are embedded as base64
``data:`` URIs and the interactive views are treescope renderings, which carry their own JS.
It shows, generically (whatever files the run wrote, nothing hard-coded), in this order:

1. what kind of run it is (extract, sweep, space, regimes, consistency, finetune, screen, ...), as its
   ``run.json`` manifest records it, with the manifest's status, stages (wall seconds, cache hits),
   package version / git SHA and model digest; and its config (``config.json`` / ``config.toml`` / a
   training checkpoint's config) as tables. A directory written before ``run.json`` existed is
   recognised once by :mod:`jaxpersona.runner.legacy`, which writes its ``run.json``;
2. every text summary (``*.txt``) as a pre block;
3. every PNG the run wrote, embedded, with a caption;
4. interactive treescope views of each Orbax vector bank (read without a model) with a heatmap of
   per-entry norms, and of example intervention pytrees: a ``Steer`` built from the bank's first
   entry (or ``vectors.npy``) and, for a space run, the ``Cap`` hook its ``capping.json`` builds;
5. JSON results as HTML tables, JSONL and CSV files as tables of their first rows (with the total
   count), the arrays in ``.npy`` / ``.npz`` files by shape;
6. a list of the files (Orbax checkpoints and banks as one row each).

Each view carries ``data-rendered`` once the page has loaded: the number of elements treescope's JS put
in its shadow DOM (0 while it still shows its loading message); a view left empty is flagged on the page.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import html
import json
import math
import os
import tomllib
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.edit import interventions as iv
from jaxpersona.edit.capping import CapConfig
from jaxpersona.edit.directions import steering_vectors
from jaxpersona.runner import legacy
from jaxpersona.runner.run import read_manifest
from jaxpersona.version import __version__

__all__ = ["KINDS", "RunKind", "build_report", "detect_kind", "run_manifest", "write_report"]

MAX_ROWS = 25  # rows shown per JSONL / CSV file
OPEN_ROWS = 12  # JSONL / CSV files with at most this many rows are shown expanded
MAX_TABLE_ROWS = 60  # rows shown per table inside a JSON document
MAX_CELL = 160  # characters per table cell
MAX_LIST = 12  # numbers shown inline before a list is summarised
MAX_DEPTH = 5  # nesting rendered as tables; deeper values become compact JSON
MAX_TEXT = 200_000  # characters shown per text file
MAX_JSON_BYTES = 4 << 20  # larger JSON documents are listed, not rendered
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")


# --------------------------------------------------------------------------------------------------
# run kinds: what the run's run.json says (a pre-run.json directory is adopted once by runner.legacy)
# --------------------------------------------------------------------------------------------------
def _is_checkpoint(d: Path) -> bool:
    return any((d / m).exists() for m in _ORBAX_MARKERS)


@dataclasses.dataclass(frozen=True)
class RunKind:
    """How the page presents a kind of run: the manifest's kind id, a display name, the command that
    writes it and what its pipeline does."""

    id: str
    name: str
    command: str
    description: str


KINDS: dict[str, RunKind] = {k.id: k for k in (
    RunKind("regimes", "regimes", "jaxpersona regimes", "one persona under prompting, fine-tuning (LoRA) and "
            "steering (BiPO): regime vectors, trainers with prevention, shifts, cosines, composition"),
    RunKind("space", "space", "jaxpersona space", "persona space and the Assistant Axis: role vectors, PCA, "
            "calibrated capping, drift over multi-turn conversations"),
    RunKind("consistency", "consistency", "jaxpersona consistency", "run-to-run consistency: within/between "
            "persona variance over seeds and temperatures, consistency over turns, persona mixtures"),
    RunKind("extract-all", "extract (all traits)", "jaxpersona extract --all-traits", "persona vectors for several "
            "traits with one batched judge-free steering sweep (one subdirectory per trait)"),
    RunKind("extract", "extract", "jaxpersona extract", "the persona-vector pipeline: contrastive generation, judge "
            "check, extraction, judge-free steering sweep with the coherence cliff, layer choice, monitoring"),
    RunKind("sweep", "sweep", "jaxpersona sweep --config", "a config-file intervention grid: mean log-prob of "
            "target responses per vector x layer x coefficient"),
    RunKind("finetune", "finetune", "jaxpersona finetune", "a LoRA fine-tuning run: loss log, adapter snapshots, "
            "resumable Orbax checkpoints"),
    RunKind("screen", "screen", "jaxpersona screen", "dataset screening by projection difference on a persona "
            "vector"),
    RunKind("trait-data", "trait data", "jaxpersona trait-data", "trait-eliciting and matched neutral chat JSONL"),
    RunKind("bank", "vector bank", "VectorBank.save", "an Orbax vector bank on its own"),
)}
GENERIC = RunKind("", "run (unrecognised kind)", "?", "a directory with run outputs that no known pipeline wrote "
                  "exactly like this; everything recognisable is shown")


def _unknown_kind(kind_id: str) -> RunKind:
    """A kind a newer jaxpersona wrote into ``run.json`` that this report has no presentation for."""
    return RunKind(kind_id, kind_id, "?", f"a {kind_id!r} run (a kind this version of the report does not know); "
                                          "everything recognisable is shown")


def _generic_run(d: Path) -> bool:
    """Something recognisable although no kind matched: a summary, a PNG or a vector bank (a config alone,
    e.g. an HF model directory's ``config.json``, is not enough)."""
    for p in d.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file() and (p.stem == "summary" or p.suffix == ".png"):
            return True
        if p.is_dir() and legacy.is_bank(p):
            return True
    return False


def run_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``run.json``; for a directory written before it existed, the manifest
    :func:`jaxpersona.runner.legacy.adopt` makes from the old file rules (and writes, so the directory is
    recognised once; a read-only directory is recognised without writing). None when neither says."""
    manifest = read_manifest(run_dir)
    if manifest is not None:
        return manifest
    if (run_dir / "run.json").exists():  # there but unreadable: a report reads, it never replaces provenance
        warnings.warn(f"{run_dir / 'run.json'} cannot be read; the page recognises the run by its files and leaves "
                      "run.json as it is", errors.CacheWarning, stacklevel=2)
        return legacy.adopt(run_dir, write=False)
    try:
        return legacy.adopt(run_dir)
    except OSError:  # cannot write there: recognise it for this page only
        return legacy.adopt(run_dir, write=False)


def detect_kind(run_dir: Path) -> tuple[RunKind, dict[str, Any] | None]:
    """The :class:`RunKind` of ``run_dir`` and its manifest (see :func:`run_manifest`; None for a generic run);
    :class:`~jaxpersona.errors.InputError` when it is missing, not a directory, or holds nothing a jaxpersona
    pipeline writes."""
    if not run_dir.exists():
        raise errors.InputError(f"run directory {run_dir} does not exist; pass the directory a jaxpersona command "
                                "wrote (e.g. runs/persona_evil)")
    if not run_dir.is_dir():
        raise errors.InputError(f"{run_dir} is a file, not a run directory; pass the directory a jaxpersona command "
                                "wrote (e.g. runs/persona_evil)")
    manifest = run_manifest(run_dir)
    kind_id = manifest.get("kind") if manifest is not None else None
    if isinstance(kind_id, str) and kind_id:
        return KINDS.get(kind_id) or _unknown_kind(kind_id), manifest
    if _generic_run(run_dir):
        return GENERIC, manifest
    known = ", ".join(k.name for k in KINDS.values())
    raise errors.InputError(f"{run_dir} is not a run directory: nothing in it is recognisable as the output of a "
                            f"jaxpersona command (known kinds: {known}; a run has e.g. summary.txt or summary.json, "
                            "*.png or a vectors/ bank)")


# --------------------------------------------------------------------------------------------------
# walking the run directory
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunFiles:
    """The files of a run directory, by what the report does with them (paths relative to ``root``)."""

    root: Path
    configs: list[Path] = dataclasses.field(default_factory=list)
    texts: list[Path] = dataclasses.field(default_factory=list)
    jsons: list[Path] = dataclasses.field(default_factory=list)
    jsonls: list[Path] = dataclasses.field(default_factory=list)
    csvs: list[Path] = dataclasses.field(default_factory=list)
    arrays: list[Path] = dataclasses.field(default_factory=list)
    pngs: list[Path] = dataclasses.field(default_factory=list)
    banks: list[Path] = dataclasses.field(default_factory=list)
    checkpoints: list[Path] = dataclasses.field(default_factory=list)
    others: list[Path] = dataclasses.field(default_factory=list)

    def all_files(self) -> list[Path]:
        """Every plain file found (checkpoints and banks not included)."""
        return sorted([*self.configs, *self.texts, *self.jsons, *self.jsonls, *self.csvs, *self.arrays,
                       *self.pngs, *self.others], key=_order)


def _order(p: Path) -> tuple[int, str]:
    """Top-level files first, then by path."""
    return len(p.parts), str(p)


_BY_SUFFIX = {".txt": "texts", ".json": "jsons", ".jsonl": "jsonls", ".csv": "csvs", ".npy": "arrays",
              ".npz": "arrays", ".png": "pngs", ".toml": "configs"}


def _iter_dir(d: Path, skip: set[Path]) -> Iterator[tuple[str, Path]]:
    """``(category, path)`` for everything under ``d``, not descending into banks or checkpoints."""
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.name == "__pycache__" or p.resolve() in skip or p.is_symlink():
            continue
        if p.is_dir():
            if legacy.is_bank(p):
                yield "banks", p
            elif _is_checkpoint(p):
                yield "checkpoints", p
            else:
                yield from _iter_dir(p, skip)
        elif p.suffix == ".html":
            continue  # earlier reports
        elif p.name == "config.json":
            yield "configs", p
        else:
            yield _BY_SUFFIX.get(p.suffix, "others"), p


def collect(run_dir: Path, skip: Iterable[Path] = ()) -> RunFiles:
    """Walk ``run_dir`` (the report file itself in ``skip``) and sort its files by category."""
    files = RunFiles(run_dir)
    if legacy.is_bank(run_dir):
        files.banks.append(Path("."))
        return files
    for cat, p in _iter_dir(run_dir, {Path(s).resolve() for s in skip}):
        getattr(files, cat).append(p.relative_to(run_dir))
    for cat in ("configs", "texts", "jsons", "jsonls", "csvs", "arrays", "pngs", "banks", "checkpoints", "others"):
        getattr(files, cat).sort(key=_order)
    return files


# --------------------------------------------------------------------------------------------------
# HTML helpers: values and tables
# --------------------------------------------------------------------------------------------------
def esc(x: Any) -> str:
    """HTML-escaped ``str(x)``."""
    return html.escape(str(x), quote=True)


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "x"


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt_scalar(v: Any) -> str:
    """A scalar as short text: floats to 4 significant digits, None as ``null``."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(v) if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _truncate(s: str, n: int = MAX_CELL) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _list_text(xs: list[Any]) -> str:
    """A list of scalars inline; long numeric lists as a summary (count, first values, range)."""
    if len(xs) <= MAX_LIST:
        return "[" + ", ".join(fmt_scalar(x) for x in xs) + "]"
    nums = [float(x) for x in xs if _is_number(x)]
    head = ", ".join(fmt_scalar(x) for x in xs[:4])
    rng = f"; min {min(nums):.4g}, max {max(nums):.4g}" if len(nums) == len(xs) else ""
    return f"[{len(xs)} values: {head}, …, {fmt_scalar(xs[-1])}{rng}]"


def cell_text(v: Any) -> str:
    """Any JSON value as one short line (for a table cell)."""
    if _is_scalar(v):
        return _truncate(fmt_scalar(v))
    if isinstance(v, list) and all(_is_scalar(x) for x in v):
        return _truncate(_list_text(v))
    return _truncate(json.dumps(v, separators=(",", ":"), default=str))


def _td(v: Any) -> str:
    cls = ' class="n"' if _is_number(v) else ""
    return f"<td{cls}>{esc(cell_text(v))}</td>"


def _is_flat(v: Any) -> bool:
    return _is_scalar(v) or (isinstance(v, list) and all(_is_scalar(x) for x in v))


def _is_records(items: list[Any]) -> bool:
    """A non-empty list of dicts whose values are all scalars or lists of scalars (one table)."""
    return bool(items) and all(isinstance(r, dict) and r and all(_is_flat(x) for x in r.values()) for r in items)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def records_table(rows: list[dict[str, Any]], index: list[str] | None = None, *, total: int | None = None,
                  limit: int = MAX_TABLE_ROWS) -> str:
    """Rows of dicts as one table (columns: the union of keys, in first-seen order)."""
    shown = rows[:limit]
    cols = _columns(shown)
    head = ("<th></th>" if index is not None else "") + "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for i, r in enumerate(shown):
        lead = f"<th>{esc(index[i])}</th>" if index is not None else ""
        body.append("<tr>" + lead + "".join(_td(r[c]) if c in r else "<td></td>" for c in cols) + "</tr>")
    n = len(rows) if total is None else total
    note = f'<p class="note">showing {len(shown)} of {n} rows</p>' if n > len(shown) else ""
    table = f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return f'<div class="scroll">{table}</div>{note}'


def _kv_table(items: Iterable[tuple[Any, Any]], depth: int) -> str:
    rows = []
    for i, (k, v) in enumerate(items):
        if i >= MAX_TABLE_ROWS:
            rows.append(f'<tr><th>…</th><td class="note">{esc("more entries not shown")}</td></tr>')
            break
        rows.append(f"<tr><th>{esc(k)}</th><td>{json_html(v, depth + 1)}</td></tr>")
    return f'<table class="kv"><tbody>{"".join(rows)}</tbody></table>'


def json_html(v: Any, depth: int = 0) -> str:
    """A JSON value as HTML: scalars as text, records as one table, other dicts/lists as nested
    key/value tables (down to :data:`MAX_DEPTH`, then compact JSON)."""
    if _is_flat(v) or depth >= MAX_DEPTH:
        return esc(cell_text(v))
    if isinstance(v, list):
        if _is_records(v):
            return records_table(v)
        return _kv_table(enumerate(v), depth)
    if isinstance(v, dict):
        vals = list(v.values())
        if len(vals) > 1 and _is_records(vals):
            return records_table(vals, index=[str(k) for k in v])
        return _kv_table(v.items(), depth)
    return esc(cell_text(str(v)))


# --------------------------------------------------------------------------------------------------
# file renderers
# --------------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    """A byte count as B / KiB / MiB / GiB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not p.is_symlink())


def _file_heading(rel: Path, level: int = 3, extra: str = "") -> str:
    return f'<h{level} id="f-{_anchor(str(rel))}"><code>{esc(rel)}</code>{extra}</h{level}>'


def render_text(root: Path, rel: Path) -> str:
    """A text file as a pre block (truncated at :data:`MAX_TEXT` characters)."""
    text = (root / rel).read_text(errors="replace")
    note = f'<p class="note">first {MAX_TEXT} of {len(text)} characters</p>' if len(text) > MAX_TEXT else ""
    return _file_heading(rel) + f"<pre>{esc(text[:MAX_TEXT])}</pre>{note}"


def render_json(root: Path, rel: Path) -> str:
    """A JSON document as tables (see :func:`json_html`)."""
    path = root / rel
    if path.stat().st_size > MAX_JSON_BYTES:
        return _file_heading(rel) + f'<p class="note">{_size(path.stat().st_size)}: too large to render here</p>'
    data = legacy.json_or_none(path)
    if data is None:
        return _file_heading(rel) + '<p class="note">not valid JSON</p>'
    return _file_heading(rel) + f'<div class="scroll">{json_html(data)}</div>'


def _head_lines(path: Path, n: int) -> tuple[list[str], int]:
    """The first ``n`` non-empty lines of ``path`` and the total count of non-empty lines."""
    head, total = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if line.strip():
                total += 1
                if len(head) < n:
                    head.append(line)
    return head, total


def _collapsed(rel: Path, n_rows: int, table: str) -> str:
    """A row-per-record file as a ``<details>`` block (title: path and row count), open when it is short."""
    shown = f", first {min(n_rows, MAX_ROWS)} shown" if n_rows > MAX_ROWS else ""
    state = " open" if n_rows <= OPEN_ROWS else ""
    return (f'<details class="rows" id="f-{_anchor(str(rel))}"{state}><summary><code>{esc(rel)}</code> '
            f'<span class="note">{n_rows} rows{shown}</span></summary>{table or "<p class=note>empty</p>"}</details>')


def render_jsonl(root: Path, rel: Path) -> str:
    """The first :data:`MAX_ROWS` records of a JSONL file as a table, with the total count."""
    lines, total = _head_lines(root / rel, MAX_ROWS)
    rows = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            r = {"(unparsed line)": line.strip()}
        rows.append(r if isinstance(r, dict) else {"value": r})
    return _collapsed(rel, total, records_table(rows, total=total, limit=MAX_ROWS) if rows else "")


def _number_or_text(s: Any) -> Any:
    """A CSV field as a number when it reads as one (so tables align and round it), else as it is."""
    try:
        x = float(s)
    except (TypeError, ValueError):
        return s
    return int(x) if x.is_integer() and "." not in s and "e" not in s.lower() else x


def render_csv(root: Path, rel: Path) -> str:
    """The first :data:`MAX_ROWS` rows of a CSV file as a table, with the total count."""
    with open(root / rel, newline="", errors="replace") as f:
        rows = [{k: _number_or_text(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return _collapsed(rel, len(rows), records_table(rows, limit=MAX_ROWS) if rows else "")


def _npy_header(f: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype)`` from an open ``.npy`` stream, reading only its header."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), str(dtype)


def array_rows(root: Path, rel: Path) -> list[dict[str, Any]]:
    """One row (file, array, shape, dtype) per array of a ``.npy`` / ``.npz`` file (headers only)."""
    path = root / rel
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                shape, dtype = _npy_header(f)
            return [{"file": str(rel), "array": "", "shape": str(list(shape)), "dtype": dtype}]
        rows = []
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                with z.open(name) as f:
                    shape, dtype = _npy_header(f)
                rows.append({"file": str(rel), "array": name.removesuffix(".npy"), "shape": str(list(shape)),
                             "dtype": dtype})
        return rows
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return [{"file": str(rel), "array": f"(unreadable: {type(e).__name__})", "shape": "", "dtype": ""}]


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
CAPTIONS = {
    "steering.png": "judge-free steering curves: trait score change vs steering coefficient per layer (95% "
                    "intervals), fraction of incoherent generations, and the coherence cliff (dashed)",
    "monitor.png": "monitoring: last-prompt-token projection on the unit persona vector vs the answer's trait score",
    "pca_map.png": "persona space: roles on PC1/PC2 at the axis layer, the default Assistant starred",
    "variance.png": "PCA of the role vectors: variance per component and cumulative, at the axis layer",
    "cos_axis_pc1.png": "|cos(Assistant Axis, PC1)| at every resid point",
    "drift.png": "drift over the turns of each conversation: projections on the Assistant Axis per variant "
                 "(unsteered, capped, assistant-only capped, KV edit)",
    "ratio.png": "within / between persona variance ratio vs sampling temperature, with intervals",
    "cosines.png": "cosines between the prompt, fine-tune and BiPO regime vectors per layer, with the "
                   "split-half null",
    "shift_vs_trait.png": "fine-tuning shift along the prompt-regime vector vs the trait change, per checkpoint",
}


def _figure_order(rel: Path) -> tuple[int, int, str]:
    """Known pipeline plots first (in :data:`CAPTIONS` order), then the rest; top-level files first."""
    known = list(CAPTIONS)
    return len(rel.parts), known.index(rel.name) if rel.name in known else len(known), str(rel)


def caption_of(rel: Path) -> str:
    """What a figure is: a known pipeline plot's description, else its file name."""
    return CAPTIONS.get(rel.name, f"figure {rel.name}")


def render_figure(root: Path, rel: Path) -> str:
    """A PNG embedded as a base64 data URI, with a caption and alt text."""
    data = base64.b64encode((root / rel).read_bytes()).decode("ascii")
    cap = caption_of(rel)
    return (f'<figure id="f-{_anchor(str(rel))}"><img src="data:image/png;base64,{data}" alt="{esc(f"{rel}: {cap}")}">'
            f"<figcaption><code>{esc(rel)}</code> — {esc(cap)}</figcaption></figure>")


# --------------------------------------------------------------------------------------------------
# treescope views: vector banks and interventions
# --------------------------------------------------------------------------------------------------
def _view(view_html: str, text: str, caption: str, key: str) -> str:
    return (f'<div class="ts-view" data-view="{esc(key)}"><p class="cap">{esc(caption)}</p>{view_html}'
            f"<details><summary>as text</summary><pre>{esc(text)}</pre></details></div>")


def treescope_view(obj: Any, caption: str, key: str) -> str:
    """An interactive treescope rendering of ``obj`` (arrays as heatmaps), plus its text form.

    Rendered uncompressed, so the view is inserted while the page loads (no lazy decompression)."""
    import treescope

    with warnings.catch_warnings(), treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        warnings.simplefilter("ignore", RuntimeWarning)  # summary stats of all-inf arrays (a cap's open bounds)
        view = treescope.render_to_html(obj, roundtrip_mode=False, ignore_exceptions=True, compressed=False)
        text = treescope.render_to_text(obj, ignore_exceptions=True)
    return _view(view, text, caption, key)


def figure_view(figure: Any, caption: str, key: str) -> str:
    """A treescope figure (e.g. from ``treescope.render_array``) rendered as the figure itself."""
    from treescope import lowering

    part = figure.treescope_part
    return _view(lowering.render_to_html_as_root(part, compressed=False), lowering.render_to_text_as_root(part),
                 caption, key)


def _bank_layer(meta: dict[str, Any], n_resid: int) -> int:
    """The layer a bank entry is best used at: its recorded ``best_layer`` / ``layer``, else the middle."""
    for key in ("best_layer", "layer"):
        v = meta.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_resid:
            return v
    return n_resid // 2


def example_steer(vectors: np.ndarray, name: str, meta: dict[str, Any]) -> tuple[Any, str]:
    """A :class:`~jaxpersona.edit.interventions.Steer` pytree from one ``[L+1, D]`` entry, and its caption.

    With the residual norms the entry recorded the coefficient is relative (0.5 = half the residual
    norm, the pipelines' units); otherwise it multiplies the raw vector."""
    n_resid = vectors.shape[0]
    layer = _bank_layer(meta, n_resid)
    norms = meta.get("resid_norm")
    relative = isinstance(norms, list) and len(norms) == n_resid and all(_is_number(x) for x in norms)
    vec = steering_vectors(vectors, np.asarray(norms, np.float32) if relative else None,
                           "relative" if relative else "absolute")
    chosen = meta.get("best_coeff")
    coeff = float(chosen) if relative and _is_number(chosen) else (0.5 if relative else 1.0)
    positions = meta.get("positions") if meta.get("positions") in ("all", "prompt", "response") else "response"
    one = np.ones((1, 1), bool)
    pos = {"all": iv.Positions.all, "prompt": iv.Positions.prompt, "response": iv.Positions.response}[positions](one)
    hook = iv.steer(n_resid, vec[layer], coeff, layer, pos)
    units = "× the residual norm (relative units)" if relative else "× the raw vector (no residual norms recorded)"
    source = "the bank's chosen setting" if meta.get("positions") else "defaults: the bank records no chosen setting"
    return hook, (f"Steer along {name!r} at resid[{layer}], coefficient {coeff:g} {units}, at {positions} positions "
                  f"({source}; positions for a one-token placeholder prompt)")


def _entry_table(bank: Any) -> str:
    """One row per bank entry: its name, |v| range over resid points and its scalar metadata."""
    norms = np.linalg.norm(bank.vectors, axis=-1)
    rows = []
    for i, name in enumerate(bank.names):
        meta = {k: v for k, v in bank.meta[i].items() if _is_flat(v)}
        rows.append({"entry": name, "|v| min": float(norms[i].min()), "|v| max": float(norms[i].max()),
                     "argmax resid": int(norms[i].argmax()), **meta})
    return records_table(rows)


def read_banks(root: Path, files: RunFiles) -> dict[Path, Any]:
    """Each bank of the run, read once without a model: the :class:`~jaxpersona.artifacts.bank.VectorBank`, or the
    error message when it cannot be read (the report shows it instead of failing)."""
    banks: dict[Path, Any] = {}
    for rel in files.banks:
        try:
            banks[rel] = VectorBank.load(root / rel)
        except errors.JaxPersonaError as e:
            banks[rel] = str(e)
    return banks


def render_bank(rel: Path, bank: Any) -> str:
    """A vector bank: summary line, entry table and treescope views (the bank; per-entry norms)."""
    import treescope

    head = _file_heading(rel, extra=' <span class="note">vector bank</span>')
    if isinstance(bank, str):
        return head + f'<p class="error">could not read the bank: {esc(bank)}</p>'
    norms = np.linalg.norm(bank.vectors, axis=-1)
    fig = treescope.render_array(norms, axis_labels={0: "entry", 1: "resid"}, axis_item_labels={0: list(bank.names)},
                                 around_zero=False, pixels_per_cell=14 if len(bank) <= 24 else 7)
    summary = (f"<p>model <code>{esc(bank.model)}</code>, {len(bank)} entries, vectors [K, L+1, D] = "
               f"[{len(bank)}, {bank.n_resid}, {bank.d_model}], created {esc(bank.created)}; "
               f"convention: {esc(bank.convention)}</p>")
    return (head + summary + _entry_table(bank)
            + treescope_view(bank, f"the VectorBank pytree ({rel}): expand fields, hover the heatmap for values",
                             f"bank:{rel}")
            + figure_view(fig, "|v[l]| per entry (rows) and resid point (columns); hover for values",
                          f"norms:{rel}"))


def _steer_source(root: Path, files: RunFiles, banks: dict[Path, Any]) -> tuple[np.ndarray, str, dict, str] | None:
    """``(vectors [L+1, D], name, meta, where)`` for the example Steer: the first readable bank's first
    entry, else the first ``vectors.npy`` (a sweep's)."""
    for rel, bank in banks.items():
        if not isinstance(bank, str):
            return bank.vectors[0], bank.names[0], bank.meta[0], f"bank {rel}"
    for rel in (r for r in files.arrays if r.name == "vectors.npy"):
        arr = np.load(root / rel)
        arr = arr[0] if arr.ndim == 3 else arr
        if arr.ndim == 2 and arr.shape[0] >= 2 and np.all(np.isfinite(arr)):
            return arr, "vectors.npy[0]", {}, str(rel)
    return None


def intervention_views(root: Path, files: RunFiles, banks: dict[Path, Any]) -> list[str]:
    """Example intervention pytrees: a Steer from the first bank (or ``vectors.npy``), and the Cap that each
    ``capping.json`` builds."""
    views = []
    source = _steer_source(root, files, banks)
    if source is not None:
        hook, cap = example_steer(*source[:3])
        views.append(treescope_view(hook, f"{cap}; built from {source[3]}", "steer"))
    for rel in [r for r in files.jsons if r.name == "capping.json"]:
        views.append(_cap_view(root, rel))
    return views


def _cap_view(root: Path, rel: Path) -> str:
    try:
        caps = CapConfig.load(root / rel)
    except errors.JaxPersonaError as e:
        return f'<p class="error">could not read {esc(rel)}: {esc(e)}</p>'
    hook = caps.hook(iv.Positions.all(np.ones((1, 1), bool)))
    layers = ", ".join(str(l) for l in caps.layers)
    return treescope_view(hook, f"Cap built by CapConfig.load({rel}).hook(...): clamps <h, direction> into "
                                f"[floor, ceiling] at resid[{layers}], all positions", f"cap:{rel}")


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
def render_config(root: Path, rel: Path) -> str:
    """``config.json`` as tables; a TOML config as tables plus the file as written."""
    path = root / rel
    if path.suffix == ".toml":
        raw = path.read_text(errors="replace")
        try:
            table = json_html(tomllib.loads(raw))
        except tomllib.TOMLDecodeError as e:
            table = f'<p class="error">not valid TOML: {esc(e)}</p>'
        return (_file_heading(rel) + table
                + f"<details><summary>{esc(rel.name)} as written</summary><pre>{esc(raw)}</pre></details>")
    return render_json(root, rel)


def _step(p: Path) -> int:
    return int(p.name) if p.name.isdigit() else -1


def _checkpoint_config(root: Path, files: RunFiles) -> str:
    """For a run without a config file of its own (``jaxpersona finetune``): the training config stored in
    its latest Orbax training checkpoint (``ckpt/<step>/meta``)."""
    if any(len(r.parts) == 1 for r in files.configs):
        return ""
    ckpts = [c for c in files.checkpoints if (root / c / "meta" / "metadata").is_file()]
    if not ckpts:
        return ""
    latest = max(ckpts, key=lambda c: (-len(c.parts), _step(c)))
    meta = legacy.json_or_none(root / latest / "meta" / "metadata")
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict)):
        return ""
    rel = latest / "meta" / "metadata"
    note = ' <span class="note">training config (Orbax checkpoint)</span>'
    return _file_heading(rel, extra=note) + json_html(meta["config"])


def _model_of(root: Path, files: RunFiles) -> str | None:
    for rel in files.configs:
        cfg = legacy.json_or_none(root / rel) if rel.suffix == ".json" else None
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), str):
            return cfg["model"]
        if rel.suffix == ".toml":
            try:
                model = tomllib.loads((root / rel).read_text()).get("model")
            except (tomllib.TOMLDecodeError, OSError):
                model = None
            if isinstance(model, str):
                return model
    return None


# --------------------------------------------------------------------------------------------------
# page
# --------------------------------------------------------------------------------------------------
CSS = """
:root { --fg:#1d2330; --muted:#687083; --line:#dde1e8; --bg:#ffffff; --side:#f6f7f9; --accent:#2f5fb3; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--fg); background:var(--bg); }
nav { position:fixed; top:0; left:0; bottom:0; width:230px; overflow:auto; padding:18px 14px; background:var(--side);
      border-right:1px solid var(--line); font-size:14px; }
nav h2 { font-size:13px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:0 0 8px; }
nav ol { margin:0; padding-left:18px; } nav li { margin:3px 0; }
nav a { color:var(--fg); text-decoration:none; } nav a:hover { color:var(--accent); }
main { margin-left:230px; padding:24px 36px 60px; max-width:1400px; }
h1 { font-size:24px; margin:0 0 4px; } h2 { font-size:20px; border-bottom:2px solid var(--line); padding-bottom:4px;
      margin-top:36px; } h3 { font-size:15px; margin:22px 0 6px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size:13px; }
pre { background:var(--side); border:1px solid var(--line); border-radius:6px; padding:10px 12px; overflow:auto;
      max-height:520px; }
.kind { display:inline-block; background:var(--accent); color:#fff; border-radius:12px; padding:1px 10px;
        font-size:13px; vertical-align:middle; }
.note { color:var(--muted); font-size:13px; font-weight:normal; } .error { color:#b3261e; }
.scroll { overflow:auto; max-width:100%; }
table { border-collapse:collapse; margin:6px 0; font-size:13px; }
th, td { border:1px solid var(--line); padding:3px 7px; text-align:left; vertical-align:top; }
td { max-width:48ch; overflow-wrap:break-word; } table.kv > tbody > tr > td { max-width:none; }
details.rows { margin:8px 0; } details.rows > summary { cursor:pointer; padding:2px 0; }
thead th { background:var(--side); position:sticky; top:0; } td.n { text-align:right; font-variant-numeric:tabular-nums; }
table.kv > tbody > tr > th { background:var(--side); font-weight:600; white-space:nowrap; }
figure { margin:14px 0 26px; } figure img { max-width:100%; border:1px solid var(--line); border-radius:4px; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.ts-view { border:1px solid var(--line); border-radius:6px; padding:8px 12px; margin:10px 0 18px; overflow:auto; }
.ts-view .cap { margin:0 0 6px; color:var(--muted); font-size:13px; }
.ts-view.ts-failed::before { content:"this interactive view did not render; see 'as text'";
      color:#b3261e; }
"""

# After load: record on each treescope view whether its shadow DOM holds a rendering. A view treescope inserted
# while the page loaded is counted at once; one it defers (a compressed payload, decompressed asynchronously, and
# only once the view is near the window) is counted when treescope is done with it: its ``state.chain``, the
# promise its rendering steps hang on (rejected if one fails). So a slow or off-screen view is never flagged
# "failed"; one below the window settles when scrolled near. When every view has settled,
# <html data-ts-status="done">.
STATUS_JS = """
window.addEventListener("load", () => {
  const count = (c) => {
    const loading = !c || !c.shadowRoot || !c.state || c.state.loadingMsg;  // treescope clears it on insert
    return loading ? 0 : c.shadowRoot.querySelectorAll("*").length;
  };
  const settle = async (v) => {
    const c = v.querySelector("treescope-container");
    let n = count(c);
    if (n === 0 && c && c.state && c.state.chain) {
      try { await c.state.chain; } catch (e) { /* counted as not rendered */ }
      n = count(c);
    }
    v.dataset.rendered = String(n);
    v.classList.toggle("ts-failed", n === 0);
  };
  Promise.all([...document.querySelectorAll(".ts-view")].map(settle))
    .then(() => { document.documentElement.dataset.tsStatus = "done"; });
});
"""


@dataclasses.dataclass
class Section:
    """One section of the page: its anchor, title (in the table of contents) and HTML body."""

    key: str
    title: str
    body: str


def _package_text(pkg: Any) -> str:
    """``jaxpersona 0.5.0, git 0123456789ab (dirty)`` from a manifest's ``package`` entry."""
    if not isinstance(pkg, dict):
        return "—"
    text = f"{pkg.get('name', 'jaxpersona')} {pkg.get('version', '?')}"
    if pkg.get("git_sha"):
        text += f", git {str(pkg['git_sha'])[:12]}" + (" (uncommitted changes)" if pkg.get("dirty") else "")
    return text


def _stage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]] | str:
    """The manifest's stages as table rows (name, status, wall seconds, cache hits), or a note without any."""
    stages = manifest.get("stages")
    rows = [{"stage": st.get("name", "?"), "status": st.get("status", "?"), "wall s": st.get("wall_s"),
             "cache hits": st.get("cache_hits", 0)}
            for st in (stages if isinstance(stages, list) else []) if isinstance(st, dict)]
    return rows or "none recorded"


def manifest_info(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What the overview shows of the run's ``run.json``: status, attempt, times, stage table, package
    version with its git SHA, and the model's digest (a note when there is no manifest)."""
    if manifest is None:
        return {"run.json": "none (a directory no jaxpersona pipeline recorded)"}
    status = str(manifest.get("status", "?"))
    if manifest.get("error"):
        status += f": {manifest['error']}"
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    info: dict[str, Any] = {"status": status}
    if isinstance(manifest.get("legacy"), dict):
        info["recognised"] = ("written before run.json existed; kind recognised by the "
                              f"{manifest['legacy'].get('recognised_by', 'old file rules')}")
    info.update({"attempt": manifest.get("attempt", "—"), "started": manifest.get("started") or "—",
                 "ended": manifest.get("ended") or "—", "wall s": manifest.get("wall_s", "—"),
                 "stages": _stage_rows(manifest), "package": _package_text(manifest.get("package")),
                 "model digest": model.get("digest") or "—"})
    return info


def _overview(run_dir: Path, kind: RunKind, manifest: dict[str, Any] | None, files: RunFiles) -> Section:
    all_files = files.all_files()
    stamps = [(run_dir / p).stat().st_mtime for p in all_files]
    last = datetime.datetime.fromtimestamp(max(stamps)).isoformat(timespec="seconds") if stamps else "—"
    size = sum((run_dir / p).stat().st_size for p in all_files) + sum(
        _dir_size(run_dir / d) for d in [*files.banks, *files.checkpoints])
    model = (manifest or {}).get("model")
    model_name = model.get("name") if isinstance(model, dict) else None
    info = {"kind": kind.name, "written by": kind.command, "what it is": kind.description,
            "model": model_name or _model_of(run_dir, files) or "—", **manifest_info(manifest),
            "directory": str(run_dir.resolve()),
            "files": f"{len(all_files)} files, {len(files.banks)} vector bank(s), {len(files.checkpoints)} "
                     f"checkpoint(s), {_size(size)}",
            "last written": last,
            "report": f"jaxpersona {__version__}, {datetime.datetime.now().isoformat(timespec='seconds')}"}
    return Section("overview", "Overview", json_html(info))


def _files_section(run_dir: Path, files: RunFiles) -> Section:
    rows = [{"path": str(p), "size": _size((run_dir / p).stat().st_size)} for p in files.all_files()]
    rows += [{"path": f"{p}/", "size": _size(_dir_size(run_dir / p)), "what": "vector bank (Orbax)"}
             for p in files.banks]
    rows += [{"path": f"{p}/", "size": _size(_dir_size(run_dir / p)),
              "what": "Orbax checkpoint: " + ", ".join(sorted(c.name for c in (run_dir / p).iterdir() if c.is_dir()))}
             for p in files.checkpoints]
    return Section("files", "Files", records_table(rows, limit=400) if rows else '<p class="note">none</p>')


def _tables(run_dir: Path, files: RunFiles) -> str:
    """JSON documents, JSONL and CSV files as tables, then the arrays of every ``.npy`` / ``.npz`` file."""
    body = ("".join(render_json(run_dir, r) for r in files.jsons)
            + "".join(render_jsonl(run_dir, r) for r in files.jsonls)
            + "".join(render_csv(run_dir, r) for r in files.csvs))
    arrays = [row for r in files.arrays for row in array_rows(run_dir, r)]
    if arrays:
        body += "<h3>Arrays (.npy / .npz)</h3>" + records_table(arrays, limit=400)
    return body


def _sections(run_dir: Path, kind: RunKind, manifest: dict[str, Any] | None, files: RunFiles) -> list[Section]:
    """Every section of the page, in order (empty ones left out)."""
    banks = read_banks(run_dir, files)
    figures = sorted(files.pngs, key=_figure_order)
    sections = [
        _overview(run_dir, kind, manifest, files),
        Section("config", "Configuration",
                "".join(render_config(run_dir, r) for r in files.configs) + _checkpoint_config(run_dir, files)),
        Section("summaries", f"Summaries ({len(files.texts)})", "".join(render_text(run_dir, r) for r in files.texts)),
        Section("figures", f"Figures ({len(figures)})", "".join(render_figure(run_dir, r) for r in figures)),
        Section("bank", f"Vector banks ({len(banks)})", "".join(render_bank(r, b) for r, b in banks.items())),
        Section("interventions", "Interventions", "".join(intervention_views(run_dir, files, banks))),
        Section("tables", "Results (tables)", _tables(run_dir, files)),
        _files_section(run_dir, files),
    ]
    return [s for s in sections if s.body]


def _page(title: str, kind: RunKind, sections: list[Section]) -> str:
    toc = "".join(f'<li><a href="#{s.key}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f'<nav><h2>Contents</h2><ol>{toc}</ol></nav><main>'
            f'<h1>{esc(title)} <span class="kind">{esc(kind.name)}</span></h1>'
            '<noscript><p class="error">JavaScript is off: the interactive views are shown as text only.</p>'
            "</noscript>"
            f"{body}</main><script>{STATUS_JS}</script></body></html>\n")


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> str:
    """The HTML page (one string) for ``run_dir``; ``out`` (the report's own path) is left out of it."""
    run_dir = Path(run_dir)
    kind, manifest = detect_kind(run_dir)
    files = collect(run_dir, skip=[out] if out is not None else ())
    return _page(f"jaxpersona report: {run_dir.resolve().name}", kind, _sections(run_dir, kind, manifest, files))


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``, atomically); returns it.

    Raises :class:`~jaxpersona.errors.InputError` for a missing directory or one that is not a run directory."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    page = build_report(run_dir, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
