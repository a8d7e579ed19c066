"""What requests may name, gathered at server start: bank vectors (with residual norms, chosen layers and
positions) and intervention presets. Errors here are start-up errors (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.records import read_json
from jaxpersona.compute.handle import Model
from jaxpersona.edit.capping import CapConfig
from jaxpersona.serve.engine import Item
from jaxpersona.serve.protocol import Resources, parse_interventions


def build_resources(model: Model, banks: list[str], presets: list[str], served_name: str, max_interventions: int,
                    max_readout: int) -> Any:
    """Bank entries and presets a request may name (errors here are start-up errors, exit 2)."""
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
    res = Resources(served_name, cfg.n_resid, cfg.d_model, vectors, norms, layers, {}, max_interventions, max_readout,
                    positions)
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
