"""Config-file runs (``configs/*.toml``): build the vector, run the sweep, write a run directory.

Run directory (a ``"sweep"`` run of :func:`~jaxpersona.runner.run.open_run`: ``run.json``, ``config.json``
(the parsed TOML), the lock): ``config.toml`` (copy), ``vectors.npy`` ``[K, L+1, D]``, ``results.jsonl`` (one
row per grid point x prompt, streamed; resumable), ``results.csv`` and ``summary.txt`` (mean log-prob per
layer x coefficient).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.compute.activations import VARIANTS, contrast_vectors, iter_activations
from jaxpersona.compute.handle import Model, load
from jaxpersona.compute.scoring import ScoringSet
from jaxpersona.data.configs import is_number, is_whole, read_toml
from jaxpersona.compute.sweep import Grid, run_sweep
from jaxpersona.data.chat import conversation
from jaxpersona.edit.directions import bank_resid_norm, steering_vectors
from jaxpersona.edit.interventions import whole_indices
from jaxpersona.model.sharding import mesh_option
from jaxpersona.runner.run import open_run


def _need(table: dict[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise errors.InputError(f"config [{where}] is missing {key!r}")
    return table[key]


# The sweep config's tables and their keys' types ("ints": a list of whole numbers, "strs": of strings, "nums": of
# numbers). A key outside them (a typo) or of another type is an error, as in the other pipelines' configs: a
# `layers = "12"` would otherwise sweep layers 1 and 2, `unit = "false"` be true, `positive = "text"` contrast
# the text's characters.
SCHEMA: dict[str, dict[str, str]] = {
    "": {"model": "str", "dtype": "str", "out_dir": "str", "vector": "table", "grid": "table", "data": "table",
         "project": "table", "run": "table"},
    "vector": {"name": "str", "entry": "str", "bank": "str", "file": "str", "positive": "strs", "negative": "strs",
               "contrast_reduce": "str"},
    "grid": {"kind": "str", "layers": "ints", "coeffs": "nums", "units": "str", "positions": "str", "unit": "bool",
             "window": "int", "cap_floor": "num"},
    "data": {"system": "str", "prompts": "strs", "responses": "strs"},
    "project": {"layers": "ints"},
    "run": {"budget_mb": "int", "chunking": "bool", "generate_tokens": "int"},
}


def _is(kind: str, x: Any) -> bool:
    num = lambda v: is_number(v, finite=False)  # noqa: E731  (cap_floor = -inf; the grid checks the rest)
    return {"str": isinstance(x, str), "bool": isinstance(x, bool), "int": is_whole(x), "num": num(x),
            "table": isinstance(x, dict),
            "strs": isinstance(x, list) and all(isinstance(v, str) for v in x),
            "ints": isinstance(x, list) and all(is_whole(v) for v in x),
            "nums": isinstance(x, list) and all(num(v) for v in x)}[kind]


def check_config(cfg: dict[str, Any], path: Path) -> None:
    """Unknown keys and wrong types of a sweep config are :class:`~jaxpersona.errors.InputError` s naming them."""
    words = {"str": "a string", "bool": "true or false", "int": "a whole number", "num": "a number",
             "table": "a [table]", "strs": "a list of strings", "ints": "a list of whole numbers",
             "nums": "a list of numbers"}
    for table, keys in SCHEMA.items():
        got = cfg if not table else cfg.get(table, {})
        where = f"[{table}]" if table else "the top level"
        for k, v in got.items():
            if k not in keys:
                raise errors.InputError(f"{path}: unknown key {k!r} in {where}; known: {', '.join(keys)}")
            if not _is(keys[k], v):
                raise errors.InputError(f"{path}: {where} {k} must be {words[keys[k]]}, got {v!r:.80}")
    run = cfg.get("run", {})
    if run.get("budget_mb", 1) < 1 or run.get("generate_tokens", 0) < 0:
        raise errors.InputError(f"{path}: [run] budget_mb must be >= 1 and generate_tokens >= 0")


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg = read_toml(path, None)  # its keys are checked below, table by table
    check_config(cfg, path)
    return cfg


def build_vector(model: Model, spec: dict[str, Any], base: Path) -> tuple[str, np.ndarray, np.ndarray | None]:
    """``(name, [L+1, D], residual norms [L+1] or None)`` from ``bank = DIR`` + ``entry = NAME`` (a
    vector bank, with the norms it recorded), ``file = "x.npy"`` or contrastive ``positive``/``negative`` texts."""
    name = spec.get("name", spec.get("entry", "vector"))
    if "bank" in spec:
        d = (base / spec["bank"]) if not Path(spec["bank"]).is_absolute() else Path(spec["bank"])
        bank = VectorBank.load(d, model.cfg)
        entry = _need(spec, "entry", "vector")
        return name, bank.get(entry), bank_resid_norm(bank, entry)
    if "file" in spec:
        f = (base / spec["file"]) if not Path(spec["file"]).is_absolute() else Path(spec["file"])
        if not f.exists():
            raise errors.InputError(f"vector file {f} does not exist")
        try:
            v = np.load(f, allow_pickle=False).astype(np.float32)
        except (ValueError, OSError) as e:
            raise errors.InputError(f"vector file {f} is not a .npy array of numbers: {e}") from e
        if v.ndim not in (1, 2) or v.shape[-1] != model.cfg.d_model or (v.ndim == 2 and v.shape[0] != model.cfg.n_resid):
            raise errors.InputError(f"vector file {f} has shape {list(v.shape)}; expected [{model.cfg.d_model}] or "
                                    f"[{model.cfg.n_resid}, {model.cfg.d_model}] for this model")
        if v.ndim == 1:
            v = np.broadcast_to(v, (model.cfg.n_resid, v.shape[0])).copy()
        return name, v, None
    pos, neg = _need(spec, "positive", "vector"), _need(spec, "negative", "vector")
    return name, contrast_vectors(model, list(pos), list(neg), reduce=spec.get("contrast_reduce", "mean")), None


def sweep_vector(model: Model, cfg: dict[str, Any], base: Path) -> tuple[str, np.ndarray]:
    """The ``[L+1, D]`` vectors a sweep coefficient multiplies, per ``[grid] units``:

    * ``"relative"`` (default): ``|resid[l]| * v̂[l]``, so a coefficient is a fraction of the residual
      norm. The norms are the ones a bank entry recorded (a bank without them is an error), or for
      vectors from texts / ``.npy`` the mean response-token norm measured on the sweep's own data;
    * ``"absolute"``: the raw vectors."""
    name, vec, norms = build_vector(model, _need(cfg, "vector", "vector"), base)
    spec, g = cfg["vector"], _need(cfg, "grid", "grid")
    units = g.get("units", "relative")
    if units not in ("absolute", "relative"):
        raise errors.InputError(f"[grid] units must be 'absolute' or 'relative', got {units!r}")
    if units == "relative" and norms is None and "bank" not in spec:
        norms = data_resid_norm(model, _need(cfg, "data", "data"))
    return name, steering_vectors(vec, norms, units)


def data_resid_norm(model: Model, d: dict[str, Any]) -> np.ndarray:
    """Mean response-token norm of every resid point over a sweep's ``[data]`` (unintervened): ``[L+1]``."""
    prompts, responses = list(_need(d, "prompts", "data")), list(_need(d, "responses", "data"))
    if not prompts or len(prompts) != len(responses):
        raise errors.InputError(f"[data] needs one response per prompt, got {len(prompts)} and {len(responses)}")
    convs = [conversation(p, d.get("system")) for p in prompts]
    total = np.zeros(model.cfg.n_resid, np.float64)
    for _, (_, norms) in iter_activations(model, convs, responses, with_norms=True):
        total += norms[VARIANTS.index("response_mean")].sum(axis=1)
    return (total / len(prompts)).astype(np.float32)


def run_sweep_config(
    config_path: str | Path, *, out_dir: str | Path | None = None, model: str | None = None, progress: bool = True,
    mesh: str | None = None,
) -> str:
    """Run the sweep a config describes; returns a printable summary. ``mesh`` (``"DATAxMODEL"``, e.g. ``"8x1"``):
    the grid's points are sharded over ``data`` and the weights tensor parallel over ``model``, over
    ``jax.devices()`` (every process's, after ``jax.distributed.initialize``); the rows equal one device's
    (the shards reorder reductions: ~1e-6 in log-prob)."""
    config_path = Path(config_path)
    device_mesh = mesh_option(mesh)
    cfg = load_config(config_path)
    out = Path(out_dir or cfg.get("out_dir") or f"runs/{config_path.stem}")
    m = load(model or cfg.get("model", "smollm2-135m-instruct"), dtype=cfg.get("dtype", "float32"))
    with open_run(out, "sweep", cfg, model=m, log=lambda _: None, progress=progress) as run:
        with run.stage("vector"):
            with open(config_path, newline="") as f:  # the file as written (its own line endings)
                run.write_text("config.toml", f.read())
            name, vec = sweep_vector(m, cfg, config_path.parent)
            run.save_npy("vectors.npy", vec[None])
        g = _need(cfg, "grid", "grid")
        grid = Grid(
            kind=g.get("kind", "steer"), vectors=vec[None], names=(name,),
            layers=tuple(_need(g, "layers", "grid")),  # whole numbers, checked by the grid (1.5 is not read as 1)
            coeffs=tuple(float(x) for x in _need(g, "coeffs", "grid")),
            positions=g.get("positions", "all"), window=int(g.get("window", 1)), unit=bool(g.get("unit", False)),
            cap_floor=float(g.get("cap_floor", -np.inf)),
        )
        d = _need(cfg, "data", "data")
        data = ScoringSet(tuple(_need(d, "prompts", "data")), tuple(_need(d, "responses", "data")), d.get("system"))
        proj_layers = tuple(int(l) for l in whole_indices(cfg["project"]["layers"], "[project] layers")) \
            if cfg.get("project", {}).get("layers") else ()
        if any(not 0 <= l < m.cfg.n_resid for l in proj_layers):
            raise errors.InputError(f"[project] layers {list(proj_layers)} fall outside resid[0..{m.cfg.n_resid - 1}]")
        opts = cfg.get("run", {})
        budget = int(opts["budget_mb"]) << 20 if "budget_mb" in opts else None
        with run.stage("sweep"):
            rows = run_sweep(
                m, grid, data, project={name: vec[max(proj_layers)]} if proj_layers else None,
                project_layers=proj_layers, budget_bytes=budget, chunking=bool(opts.get("chunking", True)),
                out_dir=run.out, progress=progress, generate_tokens=int(opts.get("generate_tokens", 0)),
                mesh=device_mesh,
            )
        with run.stage("write"):
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
            run.write_text("results.csv", buf.getvalue())
            summary = summarize(rows, grid)
            run.write_text("summary.txt", summary + "\n")
    return summary + f"\n\nwrote {out}/ (results.jsonl, results.csv, vectors.npy, summary.txt)"


def summarize(rows: list[dict[str, Any]], grid: Grid) -> str:
    """Mean target log-prob (over prompts) per layer x coefficient, and its slope per layer."""
    coeffs = sorted(grid.coeffs)
    lines = [f"{grid.kind} '{grid.names[0]}', mean log-prob of target responses (rows: resid layer)",
             "layer " + "".join(f"{c:>9g}" for c in coeffs) + "    slope"]
    for layer in sorted(grid.layers):
        vals = [np.mean([r["logprob"] for r in rows if r["layer"] == layer and r["coeff"] == c]) for c in coeffs]
        slope = np.polyfit(coeffs, vals, 1)[0] if len(coeffs) > 1 else float("nan")
        lines.append(f"{layer:5d} " + "".join(f"{v:9.3f}" for v in vals) + f"  {slope:+.4f}")
    return "\n".join(lines)
