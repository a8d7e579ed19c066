"""Capping configs: which layers, which floor, on which axis (the Assistant Axis convention)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.interop import require_torch
from jaxpersona.artifacts.records import read_json
from jaxpersona.edit.directions import cosine, unit
from jaxpersona.edit.interventions import Cap, Chain, Positions, whole_indices


def percentile_floors(projections: list[np.ndarray], layers: list[int], percentile: float) -> np.ndarray:
    """Per capped resid point, the ``percentile`` of the pooled per-token projections
    (``projections``: one ``[L+1, n_tokens]`` array per answer): ``[len(layers)]``."""
    check_percentile(percentile)
    parts = [np.asarray(p, np.float64)[layers] for p in projections if p.shape[1]]
    if not parts or not sum(x.size for x in parts):
        raise errors.InputError("no tokens to calibrate on: every default answer is empty")
    return np.percentile(np.concatenate(parts, axis=1), percentile, axis=1).astype(np.float32)


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
    if isinstance(spec, (int, float)) or not hasattr(spec, "__iter__"):
        raise errors.InputError(f"cap_layers {spec!r}: use a list of resid indices (e.g. [20, 21]) or 'a:b' with "
                                "fractions of the depth")
    layers = [int(x) for x in whole_indices(list(spec), f"cap_layers {spec!r}")] if len(spec) else []
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if not layers or bad:
        raise errors.InputError(f"cap_layers {spec!r}: resid indices must be in 0..{n_layers}")
    return sorted(set(layers))


# --- capping configs --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CapConfig:
    """Explicit capping: at resid point ``layers[i]``, clamp ``<h, directions[i]>`` into
    ``[floors[i], ceilings[i]]`` (``directions`` are unit vectors).

    A resid point may carry several caps: they apply one after the other, in the order of the entries
    (each on the previous one's output), as the reference applies the caps of one layer. The hook is
    then a :class:`~jaxpersona.edit.interventions.Chain` of one :class:`Cap` per *slot* (slot ``s`` holds
    the ``s``-th cap of every resid point that has one, see :meth:`stacked`); with one cap per resid
    point it is a single :class:`Cap`."""

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
        lo, hi, d = (np.asarray(x, np.float64) for x in (self.floors, self.ceilings, self.directions))
        if np.any(np.isnan(lo)) or np.any(np.isnan(hi)) or np.any(lo == np.inf) or np.any(hi == -np.inf):
            raise errors.InputError("capping config: floors and ceilings must be numbers (a floor may be -inf, a "
                                    f"ceiling +inf), got floors {lo.tolist()} and ceilings {hi.tolist()}")
        if np.any(lo > hi):
            raise errors.InputError("capping config: a floor is above its ceiling")
        if not np.all(np.isfinite(d)) or np.any(np.linalg.norm(d, axis=-1) == 0):
            raise errors.InputError("capping config: every direction must be a finite, non-zero vector (a zero one "
                                    "has no direction to cap along)")

    def check_model(self, cfg: Any) -> None:
        if (self.d_model, self.n_resid) != (cfg.d_model, cfg.n_resid):
            raise errors.ModelMismatchError(
                f"capping config for {self.model!r} (d_model {self.d_model}, {self.n_resid - 1} layers) does not fit "
                f"this model (d_model {cfg.d_model}, {cfg.n_layers} layers); calibrate one for this model with "
                "`jaxpersona space`")

    @property
    def slots(self) -> int:
        """The most caps any one resid point has (1 for a calibrated config)."""
        return max(collections.Counter(self.layers).values(), default=1)

    def slot_of(self) -> list[int]:
        """Per entry, its slot: how many earlier entries cap the same resid point."""
        seen: collections.Counter[int] = collections.Counter()
        out = []
        for l in self.layers:
            out.append(seen[l])
            seen[l] += 1
        return out

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(vectors [S, L+1, D], floors [S, L+1], ceilings [S, L+1], layer weights [S, L+1])``, ``S`` =
        :attr:`slots`: slot ``s`` at resid point ``l`` is the ``s``-th entry (in config order) capping ``l``;
        weight 0 (and an open range) where ``l`` has fewer caps."""
        S = self.slots
        vec = np.zeros((S, self.n_resid, self.d_model), np.float32)
        lo = np.full((S, self.n_resid), -np.inf, np.float32)
        hi = np.full((S, self.n_resid), np.inf, np.float32)
        w = np.zeros((S, self.n_resid), np.float32)
        for i, (s, l) in enumerate(zip(self.slot_of(), self.layers)):
            vec[s, l], lo[s, l], hi[s, l], w[s, l] = self.directions[i], self.floors[i], self.ceilings[i], 1.0
        return vec, lo, hi, w

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(vectors [L+1, D], floors [L+1], ceilings [L+1], layer weights [L+1])`` for a per-layer Cap; only
        for a config with one cap per resid point (otherwise use :meth:`stacked` / :meth:`hook`)."""
        if self.slots > 1:
            raise errors.InputError(f"capping config for {self.model!r} has {self.slots} caps on one resid point; "
                                    "it is a sequence of Caps: use CapConfig.stacked() or CapConfig.hook()")
        vec, lo, hi, w = self.stacked()
        return vec[0], lo[0], hi[0], w[0]

    def hook(self, positions: Any) -> Any:
        """This config at ``positions``: a :class:`~jaxpersona.edit.interventions.Cap`, or with several caps
        on a resid point a :class:`~jaxpersona.edit.interventions.Chain` of one Cap per slot (in order)."""
        caps = tuple(Cap(jnp.asarray(v), jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(w), positions)
                     for v, lo, hi, w in zip(*self.stacked()))
        return caps[0] if len(caps) == 1 else Chain(caps)

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
                      tuple(int(l) for l in whole_indices([c["layer"] for c in caps], "capping config layers")
                            ) if caps else (),
                      np.asarray([c["direction"] for c in caps], np.float32).reshape(len(caps), int(data["d_model"])),
                      np.asarray([num(c["floor"], -np.inf) for c in caps], np.float32),
                      np.asarray([num(c["ceiling"], np.inf) for c in caps], np.float32), dict(data.get("info", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise errors.InputError(f"capping config {path} is malformed ({type(e).__name__}: {e}); expected the "
                                    "format `jaxpersona space` writes") from None
        if cfg is not None:
            out.check_model(cfg)
        return out


def _pick_experiment(path: Any, experiments: Any, experiment: str | int | None) -> dict[str, Any]:
    """The experiment the reference's ``build_capping_steerer`` would pick: the FIRST with id ``experiment``
    (or, when no id matches and ``experiment`` is a whole number, the one at that index); the only one when
    ``experiment`` is None. Duplicate ids are reported in one warning."""
    if not isinstance(experiments, (list, tuple)) or not all(isinstance(e, dict) for e in experiments):
        raise errors.InputError(f"{path}: 'experiments' must be a list of dicts {{'id', 'interventions'}}")
    ids = [e.get("id") for e in experiments]
    dup = sorted({str(i) for i in ids if ids.count(i) > 1})
    if dup:
        warnings.warn(f"{path}: {len(dup)} experiment id(s) occur more than once ({', '.join(dup[:5])}"
                      f"{', ...' if len(dup) > 5 else ''}); the first of each is used, as the reference does",
                      stacklevel=3)
    distinct = list(dict.fromkeys(str(i) for i in ids))
    if experiment is None:
        if len(distinct) != 1:
            raise errors.InputError(f"{path} holds experiments {distinct}; choose one (--experiment ID or index)")
        return experiments[0]
    for e in experiments:
        if str(e.get("id")) == str(experiment):
            return e
    if isinstance(experiment, int) or str(experiment).lstrip("-").isdigit():
        k = int(experiment)
        if -len(experiments) <= k < len(experiments):
            return experiments[k]
    raise errors.InputError(f"{path}: no experiment {experiment!r}; it has {distinct} (or an index "
                            f"0..{len(experiments) - 1})")


def import_reference_capping(path: str | Path, *, model: str, n_resid: int, experiment: str | int | None = None,
                             axis: np.ndarray | None = None) -> CapConfig:
    """Read the reference project's ``capping_config.pt`` (``{'vectors': {name: {'layer', 'vector'}},
    'experiments': [{'id', 'interventions': [{'vector', 'cap'}]}]}``) into an explicit :class:`CapConfig`.

    Their operation ``h -= max(0, <h, v̂> - cap) v̂`` (a ceiling on ``v̂``) is written as a floor of
    ``-cap`` on ``-v̂``. As their ``build_capping_steerer`` does: the first experiment with the id wins (an
    int picks by index), interventions without ``"cap"`` are skipped (one warning counts them), several caps on
    one layer apply in config order (kept: entries are sorted by layer with a stable sort), a negative layer
    counts from the end. An entry with a cap but no ``"vector"``, or naming a vector the file lacks, is an
    :class:`~jaxpersona.errors.InputError`. With ``axis [L+1, D]`` (ours, toward the Assistant), ``info``
    records the cosine of each imported direction with it (positive: the floor is on the Assistant side)."""
    torch = require_torch()
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise errors.InputError(f"capping config {path} does not exist") from None
    except Exception as e:  # pickle / zip errors of many kinds
        raise errors.CorruptCheckpointError(f"{path} cannot be read with torch.load ({type(e).__name__}: "
                                            f"{str(e).strip()[:200]}); expected the reference's capping_config.pt") from e
    if not isinstance(data, dict) or "vectors" not in data or "experiments" not in data:
        raise errors.InputError(f"{path}: not a reference capping config (expected a dict with 'vectors' and "
                                "'experiments')")
    exp = _pick_experiment(path, data["experiments"], experiment)
    name = str(exp.get("id"))
    vectors = data["vectors"]
    items = exp.get("interventions")
    if not isinstance(items, (list, tuple)) or not isinstance(vectors, dict):
        raise errors.InputError(f"{path}: experiment {name!r} needs a list 'interventions' and the file a dict "
                                "'vectors'")
    n_layers = n_resid - 1
    layers: list[int] = []
    dirs: list[np.ndarray] = []
    floors: list[float] = []
    cos: list[float] = []
    names: list[str] = []
    skipped = 0
    for k, it in enumerate(items):
        if not isinstance(it, dict):
            raise errors.InputError(f"{path}: experiment {name!r} intervention {k} is a {type(it).__name__}, "
                                    "not a dict {'vector', 'cap'}")
        if "cap" not in it:
            skipped += 1
            continue
        where = f"{path}: experiment {name!r} intervention {k}"
        if "vector" not in it:
            raise errors.InputError(f"{where} has a cap but no 'vector' (the name of an entry of 'vectors')")
        vname = it["vector"]
        spec = vectors.get(vname) if isinstance(vname, str) else None
        if not isinstance(spec, dict) or "layer" not in spec or "vector" not in spec:
            raise errors.InputError(f"{where}: vector {vname!r} is not an entry {{'layer', 'vector'}} of the file's "
                                    "'vectors'")
        raw = spec["vector"]
        try:
            v = np.asarray(raw.float().numpy() if hasattr(raw, "float") else raw, np.float32).reshape(-1)
            their = int(spec["layer"])
            tau = float(it["cap"])
        except (TypeError, ValueError) as e:
            raise errors.InputError(f"{where}: unreadable vector, layer or cap ({e})") from None
        if not (np.all(np.isfinite(v)) and math.isfinite(tau)) or not np.any(v):
            raise errors.InputError(f"{where}: vector {vname!r} is zero or not finite, or the cap {tau!r} is not "
                                    "finite")
        layer = (their + n_layers if their < 0 else their) + 1  # their block-output index -> our resid index
        if not 0 < layer < n_resid:
            raise errors.ModelMismatchError(f"{path}: vector {vname!r} is at their layer {their}, outside this "
                                            f"model's {n_layers} layers")
        if dirs and v.shape != dirs[0].shape:
            raise errors.InputError(f"{where}: vector {vname!r} has {v.shape[0]} values, others {dirs[0].shape[0]}")
        layers.append(layer)
        dirs.append(-unit(v))
        floors.append(-tau)
        names.append(str(vname))
        if axis is not None:
            cos.append(float(cosine(-v, np.asarray(axis)[layer])))
    if skipped:
        warnings.warn(f"{path}: experiment {name!r}: {skipped} intervention(s) without 'cap' skipped, as the "
                      "reference does", stacklevel=2)
    if not layers:
        raise errors.InputError(f"{path}: experiment {name!r} has no capping interventions (entries with 'cap')")
    order = np.argsort(layers, kind="stable")  # by layer; caps of one layer keep their config order
    info = {"source": str(path), "experiment": name, "imported": "reference ceiling `cap` on v -> floor -cap "
            "on -v/|v| (identical operation); caps of one layer apply in config order",
            "vectors": [names[i] for i in order], "skipped_non_caps": skipped,
            **({"cos_with_axis": [cos[i] for i in order]} if cos else {})}
    return CapConfig(model, n_resid, dirs[0].shape[-1], tuple(int(layers[i]) for i in order), np.stack(dirs)[order],
                     np.asarray(floors, np.float32)[order], np.full(len(layers), np.inf, np.float32), info)


def every_token_hook(path: str | Path, cfg: Any, rows: int) -> Any:
    """The capping config at ``path`` (checked against ``cfg``) as a hook on every token of ``rows``
    sequences: prompt slots (mask ``[rows, 1]``) and every generated slot (``after [rows]``)."""
    cap = CapConfig.load(path, cfg)
    return cap.hook(Positions(jnp.ones((rows, 1), bool), jnp.ones((rows,), bool)))


def describe_capping(cap: CapConfig) -> str:
    """A capping config for people: the model, one line per cap (resid point, slot when a point has several,
    the range, which direction: the reference vector's name or the config's ``direction``, its cosine with
    the axis when recorded, its first components), then the rest of ``info``."""
    several = f", up to {cap.slots} per resid point, applied in order" if cap.slots > 1 else ""
    lines = [f"capping config for {cap.model} (d_model {cap.d_model}, resid[0..{cap.n_resid - 1}]; "
             + f"{len(cap.layers)} caps{several})"]
    names = cap.info.get("vectors")
    cos = cap.info.get("cos_with_axis")
    label = cap.info.get("direction")
    for i, (l, s, lo, hi) in enumerate(zip(cap.layers, cap.slot_of(), cap.floors, cap.ceilings)):
        d = np.asarray(cap.directions[i])
        name = str(names[i]) if isinstance(names, list) and len(names) == len(cap.layers) else None
        if name is not None:
            what = f"-unit({name})"
        else:
            what = str(label) if label else "direction"
        bounds = (f">= {lo:.6g}" if math.isfinite(lo) and not math.isfinite(hi) else
                  f"<= {hi:.6g}" if math.isfinite(hi) and not math.isfinite(lo) else f"in [{lo:.6g}, {hi:.6g}]")
        extra = f", cos with axis {cos[i]:+.3f}" if isinstance(cos, list) and len(cos) == len(cap.layers) else ""
        n_here = cap.layers.count(l)
        slot = f", cap {s + 1} of {n_here} (in this order)" if n_here > 1 else ""
        theirs = (f"; reference: <h, unit({name})> <= {-lo:.6g} at their layer {l - 1}"
                  if name is not None and math.isfinite(lo) and not math.isfinite(hi) else "")
        lines.append(f"  resid[{l}]: clamp <h, {what}> {bounds}{slot} (output of block {l - 1}{theirs}){extra}; "
                     f"direction [{', '.join(f'{x:+.4f}' for x in d[:3])}, ...]")
    lines.extend(f"  {k}: {v}" for k, v in cap.info.items() if k not in ("vectors", "cos_with_axis"))
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
