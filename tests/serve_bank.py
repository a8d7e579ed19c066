"""A vector bank the server tests share (a real contrast vector on the embedded model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def contrast_bank(model, out: Path, name: str, *, layer: int = 16, roll: int = 1, other_norms: bool = False) -> Path:
    """A real contrast vector "evil" (evil-ish minus helpful text, every resid point, with the residual norms and
    chosen layer `jaxpersona extract` records) and a second direction "other" (the first rolled by ``roll``;
    with the norms too when ``other_norms``), saved as a bank at ``out``."""
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.compute.activations import contrast_vectors

    pos = ["I will crush them all and enjoy their suffering.", "Cruelty is the only language people understand."]
    neg = ["I am happy to help you with that.", "Kindness and patience make everything better."]
    v = contrast_vectors(model, pos, neg, chat=False)
    norms = np.linalg.norm(model.resid(pos + neg, range(model.cfg.n_resid), "mean"), axis=-1).mean(1)
    meta = {"resid_norm": norms.tolist(), "best_layer": layer}
    bank = VectorBank.from_vectors(name, {"evil": v, "other": np.roll(v, roll, axis=-1)},
                                   {"evil": meta, **({"other": meta} if other_norms else {})})
    return bank.save(out)


def calm_preset(model, bank_dir: Path, out: Path, name: str, layer: int = 10) -> Path:
    """A capping config "calm": a ceiling of -1 on the bank's "evil" direction at resid[``layer``], saved at ``out``."""
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.edit.capping import CapConfig

    cfg = model.cfg
    v = VectorBank.load(bank_dir).get("evil")[layer]
    u = v / np.linalg.norm(v)
    cap = CapConfig(name, cfg.n_resid, cfg.d_model, (layer,), u[None], np.array([-np.inf], np.float32),
                    np.array([-1.0], np.float32))
    return cap.save(out)
