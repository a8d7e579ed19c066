"""Capping configs: which layers, which floor, on which axis (the Assistant Axis convention)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.interop import require_torch
from jaxpersona.artifacts.records import read_json
from jaxpersona.edit.directions import cosine, unit
from jaxpersona.edit.interventions import Cap, Positions


def percentile_floors(projections: list[np.ndarray], layers: list[int], percentile: float) -> np.ndarray:
    """Per capped resid point, the ``percentile`` of the pooled per-token projections
    (``projections``: one ``[L+1, n_tokens]`` array per answer): ``[len(layers)]``."""
    check_percentile(percentile)
    pooled = np.concatenate([np.asarray(p, np.float64)[layers] for p in projections if p.shape[1]], axis=1)
    if pooled.size == 0:
        raise errors.InputError("no tokens to calibrate on: every default answer is empty")
    return np.percentile(pooled, percentile, axis=1).astype(np.float32)


def check_percentile(percentile: float) -> None:
    if not (isinstance(percentile, (int, float)) and 0 < percentile < 100):
        raise errors.InputError(f"cap percentile must be in (0, 100) (exclusive), got {percentile!r}; the reference "
                                "caps at the 25th percentile of the default Assistant's projections")


def cap_layer_range(n_layers: int, spec: Any) -> list[int]:
    """Resid points to cap: a list of ints, or ``"a:b"`` with fractions of the depth (``"0.7:0.85"``
    -> blocks ``floor(0.7 L) .. floor(0.85 L) - 1``, i.e. resid points one higher), like the reference's
    ``layers_46:54`` on a 64-layer model."""
    if isinstance(spec, str):
        try:
            a, b = (float(x) for x in spec.split(":"))
        except ValueError:
            raise errors.InputError(f"cap_layers {spec!r}: use 'a:b' with fractions of the depth (e.g. '0.7:0.85') "
                                    "or a list of resid indices") from None
        if not 0 <= a < b <= 1:
            raise errors.InputError(f"cap_layers {spec!r}: need 0 <= a < b <= 1")
        lo, hi = int(math.floor(a * n_layers)), max(int(math.floor(b * n_layers)), int(math.floor(a * n_layers)) + 1)
        return [blk + 1 for blk in range(lo, hi)]
    layers = [int(x) for x in spec]
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if not layers or bad:
        raise errors.InputError(f"cap_layers {spec!r}: resid indices must be in 0..{n_layers}")
    return sorted(set(layers))


# --- capping configs --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CapConfig:
    """Explicit capping: at resid point ``layers[i]``, clamp ``<h, directions[i]>`` into
    ``[floors[i], ceilings[i]]`` (``directions`` are unit vectors)."""

    model: str
    n_resid: int
    d_model: int
    layers: tuple[int, ...]
    directions: np.ndarray  # [n, D] unit
    floors: np.ndarray  # [n]
    ceilings: np.ndarray  # [n]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.layers)
        if np.shape(self.directions) != (n, self.d_model) or np.shape(self.floors) != (n,) or np.shape(self.ceilings) != (n,):
            raise errors.InputError(f"capping config: {n} layers need directions [{n}, {self.d_model}] and {n} "
                                    f"floors/ceilings, got {np.shape(self.directions)}, {np.shape(self.floors)}, "
                                    f"{np.shape(self.ceilings)}")
        if any(not 0 <= l < self.n_resid for l in self.layers):
            raise errors.InputError(f"capping config layers {self.layers} outside resid[0..{self.n_resid - 1}]")
        if np.any(np.asarray(self.floors) > np.asarray(self.ceilings)):
            raise errors.InputError("capping config: a floor is above its ceiling")

    def check_model(self, cfg: Any) -> None:
        if (self.d_model, self.n_resid) != (cfg.d_model, cfg.n_resid):
            raise errors.ModelMismatchError(
                f"capping config for {self.model!r} (d_model {self.d_model}, {self.n_resid - 1} layers) does not fit "
                f"this model (d_model {cfg.d_model}, {cfg.n_layers} layers); calibrate one for this model with "
                "`jaxpersona space`")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(vectors [L+1, D], floors [L+1], ceilings [L+1], layer weights [L+1])`` for a per-layer Cap."""
        vec = np.zeros((self.n_resid, self.d_model), np.float32)
        lo = np.full(self.n_resid, -np.inf, np.float32)
        hi = np.full(self.n_resid, np.inf, np.float32)
        w = np.zeros(self.n_resid, np.float32)
        idx = list(self.layers)
        vec[idx], lo[idx], hi[idx], w[idx] = self.directions, self.floors, self.ceilings, 1.0
        return vec, lo, hi, w

    def hook(self, positions: Any) -> Any:
        """A :class:`~jaxpersona.edit.interventions.Cap` applying this config at ``positions``."""
        vec, lo, hi, w = self.arrays()
        return Cap(jnp.asarray(vec), jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(w), positions)

    def to_json(self) -> dict[str, Any]:
        f = lambda x: None if not math.isfinite(x) else round(float(x), 6)  # noqa: E731
        return {"format": "jaxpersona.CapConfig", "version": 1, "model": self.model, "n_resid": self.n_resid,
                "d_model": self.d_model,
                "convention": "resid[0]=embeddings, resid[l]=output of block l-1; clamp <h, direction> into "
                              "[floor, ceiling] (null = unbounded); directions are unit vectors",
                "caps": [{"layer": l, "floor": f(lo), "ceiling": f(hi), "direction": [round(float(x), 7) for x in d]}
                         for l, d, lo, hi in zip(self.layers, self.directions, self.floors, self.ceilings)],
                "info": self.info}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, cfg: Any | None = None) -> CapConfig:
        return cls.from_json(read_json(path, "capping config"), cfg, where=str(path))

    @classmethod
    def from_json(cls, data: Any, cfg: Any | None = None, where: str = "") -> CapConfig:
        """From the JSON ``to_json`` writes (checked against ``cfg`` when given)."""
        path = where
        try:
            caps = data["caps"]
            num = lambda x, inf: inf if x is None else float(x)  # noqa: E731
            out = cls(str(data["model"]), int(data["n_resid"]), int(data["d_model"]),
                      tuple(int(c["layer"]) for c in caps),
                      np.asarray([c["direction"] for c in caps], np.float32).reshape(len(caps), int(data["d_model"])),
                      np.asarray([num(c["floor"], -np.inf) for c in caps], np.float32),
                      np.asarray([num(c["ceiling"], np.inf) for c in caps], np.float32), dict(data.get("info", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise errors.InputError(f"capping config {path} is malformed ({type(e).__name__}: {e}); expected the "
                                    "format `jaxpersona space` writes") from None
        if cfg is not None:
            out.check_model(cfg)
        return out


def import_reference_capping(path: str | Path, *, model: str, n_resid: int, experiment: str | None = None,
                             axis: np.ndarray | None = None) -> CapConfig:
    """Read the reference project's ``capping_config.pt`` (``{'vectors': {name: {'layer', 'vector'}},
    'experiments': [{'id', 'interventions': [{'vector', 'cap'}]}]}``) into an explicit :class:`CapConfig`.

    Their operation ``h -= max(0, <h, v̂> - cap) v̂`` (a ceiling on ``v̂``) is written as a floor of
    ``-cap`` on ``-v̂``. With ``axis [L+1, D]`` (ours, toward the Assistant), ``info`` records the cosine
    of each imported direction with it (positive: the floor is on the Assistant side, as intended)."""
    torch = require_torch()
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise errors.InputError(f"capping config {path} does not exist") from None
    if not isinstance(data, dict) or "vectors" not in data or "experiments" not in data:
        raise errors.InputError(f"{path}: not a reference capping config (expected a dict with 'vectors' and "
                                "'experiments')")
    exps = {e["id"]: e for e in data["experiments"]}
    if experiment is None:
        if len(exps) != 1:
            raise errors.InputError(f"{path} holds experiments {sorted(exps)}; choose one (--experiment ID)")
        experiment = next(iter(exps))
    if experiment not in exps:
        raise errors.InputError(f"{path}: no experiment {experiment!r}; it has {sorted(exps)}")
    layers, dirs, floors, cos = [], [], [], []
    for it in exps[experiment]["interventions"]:
        spec = data["vectors"][it["vector"]]
        v = np.asarray(spec["vector"].float().numpy() if hasattr(spec["vector"], "numpy") else spec["vector"], np.float32)
        layer = int(spec["layer"]) + 1  # their block-output index -> our resid index
        if not 0 < layer < n_resid:
            raise errors.ModelMismatchError(f"{path}: vector {it['vector']!r} is at their layer {spec['layer']}, "
                                            f"outside this model's {n_resid - 1} layers")
        layers.append(layer)
        dirs.append(-unit(v))
        floors.append(-float(it["cap"]))
        if axis is not None:
            cos.append(float(cosine(-v, np.asarray(axis)[layer])))
    d_model = dirs[0].shape[-1]
    info = {"source": str(path), "experiment": experiment, "imported": "reference ceiling `cap` on v -> floor -cap "
            "on -v/|v| (identical operation)", **({"cos_with_axis": cos} if cos else {})}
    order = np.argsort(layers)
    return CapConfig(model, n_resid, d_model, tuple(int(layers[i]) for i in order), np.stack(dirs)[order],
                     np.asarray(floors, np.float32)[order], np.full(len(layers), np.inf, np.float32), info)


def every_token_hook(path: str | Path, cfg: Any, rows: int) -> Any:
    """The capping config at ``path`` (checked against ``cfg``) as a hook on every token of ``rows``
    sequences: prompt slots (mask ``[rows, 1]``) and every generated slot (``after [rows]``)."""
    cap = CapConfig.load(path, cfg)
    return cap.hook(Positions(jnp.ones((rows, 1), bool), jnp.ones((rows,), bool)))


def describe_capping(cap: CapConfig) -> str:
    """A capping config for people: the model, one line per capped resid point, then ``info``."""
    lines = [f"capping config for {cap.model} (d_model {cap.d_model}, resid[0..{cap.n_resid - 1}])"]
    for l, lo, hi in zip(cap.layers, cap.floors, cap.ceilings):
        lines.append(f"  resid[{l}]: clamp <h, direction> into [{lo:.4g}, {hi:.4g}]")
    lines.extend(f"  {k}: {v}" for k, v in cap.info.items())
    return "\n".join(lines)


def import_capping_file(path: str | Path, out: str | Path, *, bank: str | Path | None = None,
                        model_id: str | None = None, n_resid: int | None = None,
                        experiment: str | None = None) -> tuple[CapConfig, Path]:
    """The reference's ``capping_config.pt`` at ``path`` as a :class:`CapConfig` saved to ``out``.

    The model (id, ``n_resid``) comes from ``bank`` (a ``jaxpersona space`` bank; its
    ``assistant_axis [L+1, D]``, when present, is the sign check and fixes ``d_model``), else from
    ``model_id`` and ``n_resid``. Returns the config and the path written."""
    vb = VectorBank.load(bank) if bank else None
    if vb is not None:
        axis = vb.get("assistant_axis") if "assistant_axis" in vb else None
        model_id, n_resid = vb.model, vb.n_resid
    else:
        if not model_id or not n_resid:
            raise errors.InputError("importing a capping config needs a bank, or a model id and its n_resid")
        axis = None
    cap = import_reference_capping(path, model=model_id, n_resid=n_resid, experiment=experiment, axis=axis)
    if vb is not None and axis is not None and cap.d_model != vb.d_model:
        raise errors.ModelMismatchError(f"{path}: vectors have d_model {cap.d_model}; the bank's model has "
                                        f"{vb.d_model}")
    return cap, cap.save(out)
