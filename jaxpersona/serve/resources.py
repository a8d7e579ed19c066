"""What requests may name, gathered at server start: bank vectors (with residual norms, chosen layers and
positions), intervention presets and LoRA adapters. Errors here are start-up errors (exit 2)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.peft import load_any_adapter
from jaxpersona.artifacts.records import read_json
from jaxpersona.compute.handle import Model
from jaxpersona.edit.capping import CapConfig
from jaxpersona.model.lora import stack_adapters
from jaxpersona.serve.engine import Item
from jaxpersona.serve.protocol import Resources, parse_interventions


def load_adapters(specs: Sequence[str], model: Model, served_name: str) -> tuple[dict[str, dict[str, Any]],
                                                                                dict[str, int], Any]:
    """``NAME=DIR`` specs (an Orbax or peft adapter directory each, read with
    :func:`~jaxpersona.artifacts.peft.load_any_adapter`) -> ``(info by name, index by name, AdapterStack)``; the
    stack's member 0 is the base model (a zero adapter), adapter ``i`` (in spec order) is member ``i + 1``.
    No specs: ``({}, {}, None)``. A bad spec or a duplicate name is an InputError; a missing directory, a bad
    file or an adapter for another base model is the loader's typed error (ModelNotFoundError,
    AdapterFormatError, AdapterMismatchError)."""
    info: dict[str, dict[str, Any]] = {}
    index: dict[str, int] = {}
    loaded = []
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise errors.InputError(f"--adapter {spec!r}: use NAME=DIR (an Orbax or peft adapter directory)")
        if name == served_name:
            raise errors.InputError(f"--adapter {spec!r}: {name!r} is the served model's own name (the base model); "
                                    "give the adapter another name")
        if name in info:
            raise errors.InputError(f"--adapter {name!r} is given twice; adapter names must be unique")
        ad, meta = load_any_adapter(path, model.cfg, log=lambda m: print(m, file=sys.stderr))
        info[name] = {"path": str(meta.get("source") or Path(path).expanduser().absolute()),
                      "kind": meta.get("format"), "rank": ad.rank, "targets": list(ad.targets),
                      "scale": float(ad.scale), "sha256": meta.get("sha256"), "digest": meta.get("digest")}
        loaded.append(ad)
        index[name] = len(loaded)
    stack = stack_adapters([None, *loaded], model.cfg) if loaded else None
    return info, index, stack


def build_resources(model: Model, banks: list[str], presets: list[str], served_name: str, max_interventions: int,
                    max_readout: int, adapters: Sequence[str] = (), max_mixture: int = 8) -> Any:
    """Bank entries, presets and adapters (``NAME=DIR``, see :func:`load_adapters`) a request may name, and the
    largest mixture it may ask for (errors here are start-up errors, exit 2)."""
    import numpy as np

    cfg = model.cfg
    vectors, norms, layers, positions = {}, {}, {}, {}
    for path in banks:
        bank = VectorBank.load(path, cfg)
        for name in bank.names:
            if name in vectors:
                raise errors.InputError(f"bank entry {name!r} is in more than one --bank; names must be unique")
            vectors[name] = np.asarray(bank.get(name), np.float32)
            meta = bank.meta_of(name)
            norms[name] = np.asarray(meta["resid_norm"], np.float32) if meta.get("resid_norm") else None
            if meta.get("best_layer") is not None:
                layers[name] = int(meta["best_layer"])
            if meta.get("positions") is not None:
                positions[name] = str(meta["positions"])
    if isinstance(max_mixture, bool) or not isinstance(max_mixture, int) or max_mixture < 2:
        raise errors.InputError(f"--max-mixture must be an integer >= 2 (a mixture mixes >= 2 directions), got "
                                f"{max_mixture!r}")
    info, index, stack = load_adapters(adapters, model, served_name)
    res = Resources(served_name, cfg.n_resid, cfg.d_model, vectors, norms, layers, {}, max_interventions, max_readout,
                    positions, info, index, stack, max_mixture)
    for spec in presets:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise errors.InputError(f"--preset {spec!r}: use NAME=FILE")
        path = Path(file)
        data = read_json(path, f"--preset {name}:")
        if isinstance(data, dict) and data.get("format") == "jaxpersona.CapConfig":
            cap = CapConfig.from_json(data, cfg, where=str(path))
            # one item per slot: the caps of one resid point apply in config order, as in CapConfig.hook
            res.presets[name] = [Item(vec, lo=lo, hi=hi, cap_w=w, positions="all") for vec, lo, hi, w in
                                 zip(*cap.stacked())]
            if len(res.presets[name]) > max_interventions:
                raise errors.InputError(f"--preset {name} ({path}) has {cap.slots} caps on one resid point, applied "
                                        f"in sequence; that takes {cap.slots} intervention slots: start the server "
                                        f"with --max-interventions >= {cap.slots}")
        else:
            try:
                res.presets[name] = parse_interventions(data, res, f"preset {name}")
            except errors.RequestError as e:
                raise errors.InputError(f"--preset {name} ({path}): {e}") from None
    return res
