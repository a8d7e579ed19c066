"""Shared plumbing of the pipelines' run configs (frozen dataclasses read from TOML tables)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from jaxpersona import errors


def replace_checked(config: Any, what: str, **kw: Any) -> Any:
    """``dataclasses.replace`` that names unknown keys and turns lists into tuples."""
    fields = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(kw) - fields)
    if bad:
        raise errors.InputError(f"unknown {what} config keys {bad}; known: {sorted(fields)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return dataclasses.replace(config, **kw)


def is_whole(x: Any) -> bool:
    """An int that is not a bool (a layer, a count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any, finite: bool = True) -> bool:
    """An int or float that is not a bool (``finite``: and not NaN or infinite)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and (not finite or math.isfinite(x))


def check_types(config: Any, what: str) -> None:
    """Every field holds its annotated type (``int``, ``float``, ``str``, ``bool``, tuples of ints, of numbers or
    of strings; other annotations are checked by the config itself). Numbers are finite: a NaN passes every
    ``x < 0`` check and would fail only minutes into the run (a NaN loss), an inf means nothing as a setting."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        ok = {"int": is_whole(v), "float": is_number(v), "str": isinstance(v, str), "bool": isinstance(v, bool)}.get(kind)
        if kind.startswith("tuple[str"):
            ok = isinstance(v, tuple) and all(isinstance(x, str) for x in v)
        elif kind.startswith("tuple[int"):  # layers: 15.5 is no resid point
            ok = isinstance(v, tuple) and all(is_whole(x) for x in v)
        elif kind.startswith("tuple"):
            ok = isinstance(v, tuple) and all(is_number(x) for x in v)
        if ok is False:
            raise errors.InputError(f"{what} config {f.name} = {v!r} has the wrong type; expected {kind}"
                                    + (" (a finite number)" if "float" in kind else ""))


def check_positive(config: Any, what: str, names: tuple[str, ...]) -> None:
    for k in names:
        if int(getattr(config, k)) < 1:
            raise errors.InputError(f"{what} config {k} must be >= 1, got {getattr(config, k)}")


def read_toml(path: str | Path, allowed: AbstractSet[str] | None, hint: str = "") -> dict[str, Any]:
    """The TOML file's top-level table; unknown top-level keys are an error (``hint`` says what is known;
    ``allowed`` None: the caller checks the keys)."""
    path = Path(path)
    if not path.is_file():
        raise errors.InputError(f"config file {path} does not exist" if not path.exists() else
                                f"config {path} is not a file")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise errors.InputError(f"{path} is not valid TOML: {e}") from e
    if allowed is None:
        return table
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise errors.InputError(f"{path}: unknown top-level keys {unknown}; {hint}")
    return table


def preset_config(path: str | Path | None, table_name: str, presets: dict[str, Any], default: str,
                  hint: str, extra_top: AbstractSet[str] = frozenset()) -> Any:
    """A preset (``presets[name]``, chosen by the file's ``preset`` or ``default``) overridden by the
    file's ``[table_name]`` table."""
    if path is None:
        return presets[default]
    table = read_toml(path, {"preset", table_name, *extra_top}, hint)
    preset = table.get("preset", default)
    if preset not in presets:
        raise errors.InputError(f"{path}: preset must be one of {sorted(presets)}, got {preset!r}")
    body = table.get(table_name, {})
    if not isinstance(body, dict):
        raise errors.InputError(f"{path}: [{table_name}] must be a table")
    return replace_checked(presets[preset], table_name, **body)


def resid_point(n_layers: int, layer: int, what: str = "layer") -> int:
    """A config's resid index: ``-1`` means the reference's middle layer, the output of block ``L // 2``
    (``resid[L//2 + 1]``); anything else must be in ``0..L``."""
    if layer == -1:
        return n_layers // 2 + 1
    if not 0 <= layer <= n_layers:
        raise errors.InputError(f"{what} {layer} outside resid[0..{n_layers}] (-1 = the middle)")
    return layer
