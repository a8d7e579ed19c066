"""Vector banks: named persona vectors of one model at every residual-stream point, saved with Orbax.

A :class:`VectorBank` holds ``K`` named entries, each ``[L+1, D]`` float32, indexed like HF
``hidden_states``: ``resid[0]`` = embeddings, ``resid[l]`` = output of block ``l-1`` (``l = 1..L``).

Interop with other tools' layer conventions (each function's docstring states its mapping):

* persona_vectors (Chen et al. 2025) ``.pt`` files: ``torch.save(tensor [L+1, D])``, same indexing
  (:func:`import_pt`, :func:`export_pt`; torch is imported lazily, only there).
* assistant-axis (Lu et al. 2026): ``[L, D]`` indexed by block output, their ``i`` = our ``resid[i+1]``
  (:func:`from_assistant_axis`, :func:`to_assistant_axis`).
* llama.cpp control vectors (GGUF, as repeng writes them): ``direction.N`` (``N >= 1``) is added to
  the output of block ``N`` = our ``resid[N+1]`` (:func:`export_control_vector`,
  :func:`import_control_vector`).

On disk a bank is an Orbax checkpoint directory with two items: ``vectors`` (the ``[K, L+1, D]``
array) and ``bank`` (JSON: names, model, per-entry meta, convention, timestamp, shape, sha256).
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from jaxpersona import errors
from jaxpersona.artifacts.checkpoint import load_orbax, quiet_absl
from jaxpersona.artifacts.records import TMP_TAG, remove_quietly

if TYPE_CHECKING:
    from jaxpersona.model.config import ModelConfig

__all__ = ["CONVENTION", "VectorBank"]

CONVENTION = "resid[0]=embeddings, resid[l]=output of block l-1"
FORMAT = "jaxpersona.VectorBank"
FORMAT_VERSION = 1
_VECTORS_ITEM = "vectors"
_BANK_ITEM = "bank"
_OLD_TAG = ".jaxpersona-old-"
_ORBAX_TMP_TAG = ".orbax-checkpoint-tmp"
F32 = npt.NDArray[np.float32]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_normalize(obj: Any, what: str) -> Any:
    """``obj`` after a strict JSON round trip (tuples -> lists, keys -> str); InputError if not JSON-able."""
    def plain(x: Any) -> Any:  # numpy scalars (an argmax's np.int64 best layer) as the Python numbers they are
        if isinstance(x, (np.generic, np.ndarray)) and np.ndim(x) == 0:
            return x.item()
        raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")

    try:
        return json.loads(json.dumps(obj, allow_nan=False, default=plain))
    except (TypeError, ValueError) as e:
        raise errors.InputError(
            f"{what} is not JSON-serialisable ({e}); use only str, int, float (finite), bool, None, "
            "lists and dicts with str keys"
        ) from e


def as_f32(x: Any, what: str) -> F32:
    try:
        arr = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything array-like that numpy rejects
        raise errors.InputError(f"{what} is not an array ({type(x).__name__}): {e}") from e
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise errors.InputError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float32, copy=True, order="C")


# --------------------------------------------------------------------------------------------------
# VectorBank
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class VectorBank:
    """``K`` named persona vectors of one model at every resid point.

    * ``vectors``: ``[K, L+1, D]`` float32 (read-only copy of what was passed);
      ``vectors[k, l]`` is entry ``k`` at ``resid[l]`` (``resid[0]`` = embeddings, ``resid[l]`` = output
      of block ``l-1``).
    * ``names``: ``K`` unique non-empty strings (e.g. trait names).
    * ``model``: id of the model the vectors were extracted from.
    * ``meta``: ``K`` JSON-able dicts (variant, pair counts, best layer, ...); default empty dicts.
      Stored normalised by a JSON round trip, so a loaded bank's meta equals the saved one.
    * ``convention``: the layer-indexing convention, stored with the bank.
    * ``created``: ISO-8601 timestamp (UTC, default now).
    """

    vectors: F32
    names: tuple[str, ...]
    model: str
    meta: tuple[dict[str, Any], ...] = ()
    convention: str = CONVENTION
    created: str = dataclasses.field(default_factory=_now)

    def __post_init__(self) -> None:
        vec = as_f32(self.vectors, "VectorBank.vectors")
        if vec.ndim != 3:
            raise errors.InputError(
                f"VectorBank.vectors must be [K, L+1, D] (3-D), got shape {list(vec.shape)}; "
                "stack per-entry [L+1, D] arrays with np.stack"
            )
        k, n_resid, d = vec.shape
        if k < 1 or n_resid < 2 or d < 1:
            raise errors.InputError(
                f"VectorBank.vectors has shape {list(vec.shape)}; a bank needs K >= 1 entries, "
                "L+1 >= 2 resid points and D >= 1"
            )
        bad = ~np.isfinite(vec)
        if bad.any():
            kk, ll, _ = np.argwhere(bad)[0]
            raise errors.InputError(
                f"VectorBank.vectors has {int(bad.sum())} non-finite values (NaN/inf), first in entry {int(kk)} "
                f"at resid[{int(ll)}]; fix the extraction (e.g. too few pairs kept) before building a bank"
            )
        vec.setflags(write=False)

        if isinstance(self.names, str) or not isinstance(self.names, Iterable):
            raise errors.InputError(f"VectorBank.names must be a sequence of strings, got {type(self.names).__name__}")
        names = tuple(self.names)
        if len(names) != k:
            raise errors.InputError(f"VectorBank has {k} vectors but {len(names)} names; give one name per entry")
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise errors.InputError(f"VectorBank names must be non-empty strings, got {n!r}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise errors.InputError(f"VectorBank names must be unique; duplicated: {', '.join(map(repr, dupes))}")

        if not isinstance(self.model, str) or not self.model:
            raise errors.InputError(f"VectorBank.model must be a non-empty model id string, got {self.model!r}")
        if not isinstance(self.convention, str) or not isinstance(self.created, str):
            raise errors.InputError("VectorBank.convention and VectorBank.created must be strings")

        meta_in = tuple(self.meta) if self.meta is not None else ()
        if not meta_in:
            meta_in = tuple({} for _ in names)
        if len(meta_in) != k:
            raise errors.InputError(f"VectorBank has {k} entries but {len(meta_in)} meta dicts; give one per entry")
        meta: list[dict[str, Any]] = []
        for n, m in zip(names, meta_in):
            if not isinstance(m, Mapping):
                raise errors.InputError(f"meta of entry {n!r} must be a dict, got {type(m).__name__}")
            meta.append(_json_normalize(dict(m), f"meta of entry {n!r}"))

        object.__setattr__(self, "vectors", vec)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "meta", tuple(meta))

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_vectors(
        cls, model: str, entries: Mapping[str, Any], meta: Mapping[str, Mapping[str, Any]] | None = None
    ) -> VectorBank:
        """Bank from ``{name: [L+1, D]}`` (and optional ``{name: meta}``), in the mapping's order."""
        if not entries:
            raise errors.InputError("VectorBank.from_vectors needs at least one {name: [L+1, D]} entry")
        names = tuple(entries)
        arrs = [as_f32(entries[n], f"vectors of {n!r}") for n in names]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1 or arrs[0].ndim != 2:
            raise errors.InputError(
                "every entry must be [L+1, D] with the same shape, got "
                + ", ".join(f"{n}: {list(a.shape)}" for n, a in zip(names, arrs))
            )
        unknown = [n for n in (meta or {}) if n not in entries]
        if unknown:
            raise errors.InputError(f"meta given for {unknown}, which are not entries of the bank ({list(names)})")
        metas = tuple(dict((meta or {}).get(n, {})) for n in names)
        return cls(np.stack(arrs), names, model, metas)

    # --- shape ------------------------------------------------------------------------------------
    @property
    def n_resid(self) -> int:
        """``L+1``: number of resid points per entry."""
        return int(self.vectors.shape[1])

    @property
    def d_model(self) -> int:
        """``D``: residual-stream width."""
        return int(self.vectors.shape[2])

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        return (
            f"VectorBank(model={self.model!r}, names={list(self.names)!r}, "
            f"shape=[K={len(self)}, L+1={self.n_resid}, D={self.d_model}], created={self.created!r})"
        )

    # --- access -----------------------------------------------------------------------------------
    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise errors.InputError(
                f"no entry {name!r} in the vector bank of {self.model!r}; available: {', '.join(self.names)}"
            ) from None

    def get(self, name: str) -> F32:
        """Entry ``name`` at every resid point: ``[L+1, D]`` float32 (a writable copy)."""
        return self.vectors[self._index(name)].copy()

    def meta_of(self, name: str) -> dict[str, Any]:
        """The meta dict of entry ``name`` (a copy)."""
        return json.loads(json.dumps(self.meta[self._index(name)]))

    def unit(self, name: str, layer: int) -> F32:
        """Entry ``name`` at ``resid[layer]``, scaled to unit L2 norm: ``[D]`` float32.

        ``layer`` indexes resid points (``0..L``; negative counts from the end).
        """
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -self.n_resid <= layer < self.n_resid:
            raise errors.InputError(
                f"layer {layer!r} is out of range: the bank has resid points 0..{self.n_resid - 1} "
                "(0 = embeddings, l = output of block l-1)"
            )
        v = self.vectors[self._index(name), int(layer)].astype(np.float64)
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            raise errors.InputError(
                f"entry {name!r} is all zeros at resid[{int(layer)}], so it has no direction; pick another layer"
            )
        return (v / norm).astype(np.float32)

    def with_entry(self, name: str, vectors: Any, meta: Mapping[str, Any] | None = None) -> VectorBank:
        """A new bank with entry ``name`` (``[L+1, D]``) added, or replaced in place if it exists; ``meta`` None
        keeps a replaced entry's meta (its ``resid_norm``, which relative coefficients need), a dict replaces it."""
        v = as_f32(vectors, f"vectors of {name!r}")
        if v.shape != (self.n_resid, self.d_model):
            raise errors.InputError(
                f"entry {name!r} has shape {list(v.shape)} but this bank holds [L+1, D] = "
                f"[{self.n_resid}, {self.d_model}] vectors of {self.model!r}; extract it from the same model"
            )
        names = list(self.names)
        metas = list(self.meta)
        vecs = np.array(self.vectors)
        if name in names:
            i = names.index(name)
            vecs[i] = v
            metas[i] = dict(metas[i] if meta is None else meta)
        else:
            names.append(name)
            metas.append(dict(meta or {}))
            vecs = np.concatenate([vecs, v[None]], axis=0)
        return dataclasses.replace(self, vectors=vecs, names=tuple(names), meta=tuple(metas))

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise :class:`ModelMismatchError` unless ``cfg`` has this bank's ``L+1`` and ``D``."""
        if (cfg.n_resid, cfg.d_model) != (self.n_resid, self.d_model):
            raise errors.ModelMismatchError(
                f"the vector bank of {self.model!r} has vectors [L+1, D] = [{self.n_resid}, {self.d_model}] "
                f"({self.n_resid - 1} layers, d_model {self.d_model}), but the model ({cfg.family}) has "
                f"[{cfg.n_resid}, {cfg.d_model}] ({cfg.n_layers} layers, d_model {cfg.d_model}); use a bank "
                "extracted from this model, or re-extract the vectors with it"
            )

    # --- persistence ------------------------------------------------------------------------------
    def _bank_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "names": list(self.names),
            "meta": list(self.meta),
            "convention": self.convention,
            "created": self.created,
            "shape": list(self.vectors.shape),
            "dtype": "float32",
            "sha256": _sha256(self.vectors),
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the bank to directory ``path`` (an Orbax checkpoint); returns the path.

        Atomic: Orbax writes into a hidden sibling (itself via its own tmp dir + rename on commit);
        the finished directory is then renamed onto ``path``. With ``overwrite=True`` an existing
        *bank* at ``path`` is replaced: it is renamed aside, the new one renamed in, the old one
        deleted, so ``path`` always holds a complete bank (old or new). Anything at ``path`` that is not
        a bank (or an empty directory) is never deleted.
        """
        path = Path(path).expanduser().absolute()
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise errors.InputError(f"{path} already exists; pass overwrite=True to replace the bank there")
            if not (path.is_dir() and not path.is_symlink() and (_looks_like_bank(path) or not any(path.iterdir()))):
                raise errors.InputError(
                    f"{path} exists and is not a vector bank; refusing to overwrite it. Choose another path"
                )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise errors.InputError(f"cannot save a bank under {path.parent}: a part of that path is a file") from e
        tmp = path.parent / f".{path.name}{TMP_TAG}{uuid.uuid4().hex[:12]}"
        try:
            ocp = load_orbax()
            with quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
                # The synchronous Checkpointer returns only after the commit (tmp dir renamed to `tmp`).
                ckptr.save(
                    tmp,
                    args=ocp.args.Composite(
                        **{
                            _VECTORS_ITEM: ocp.args.StandardSave({"vectors": np.asarray(self.vectors)}),
                            _BANK_ITEM: ocp.args.JsonSave(self._bank_json()),
                        }
                    ),
                )
            _swap_into_place(tmp, path)
        finally:
            remove_quietly(tmp)
            for leftover in path.parent.glob(f"{glob.escape(tmp.name)}{_ORBAX_TMP_TAG}*"):
                remove_quietly(leftover)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], cfg: ModelConfig | None = None) -> VectorBank:
        """Read a bank written by :meth:`save`; with ``cfg``, also :meth:`check_model` it.

        Raises :class:`ModelNotFoundError` when ``path`` does not exist and :class:`CorruptCheckpointError`
        for anything at ``path`` that is not a complete, intact bank.
        """
        path = Path(path).expanduser().absolute()
        if not path.exists():
            stem = glob.escape(path.name)
            leftovers = sorted(
                p.name for pattern in (f".{stem}{TMP_TAG}*", f".{stem}{_OLD_TAG}*", f"{stem}{_ORBAX_TMP_TAG}*")
                for p in path.parent.glob(pattern)
            ) if path.parent.is_dir() else []
            old = [n for n in leftovers if _OLD_TAG in n and _ORBAX_TMP_TAG not in n]
            hint = (
                f" (found leftovers of an interrupted save next to it: {', '.join(leftovers)}; "
                + (f"the previous bank is intact in {old[0]}, rename it back; " if old else "")
                + "save the bank again and delete the rest)" if leftovers else ""
            )
            raise errors.ModelNotFoundError(f"no vector bank at {path}{hint}; check the path")
        if not path.is_dir():
            raise errors.CorruptCheckpointError(
                f"{path} is a file, not a vector bank; a bank is a directory written by VectorBank.save"
            )
        if TMP_TAG in path.name or _ORBAX_TMP_TAG in path.name or _OLD_TAG in path.name:
            raise errors.CorruptCheckpointError(
                f"{path} is a temporary directory left by an interrupted save, not a complete bank; "
                "delete it and save the bank again"
            )
        items = [(path / item).is_dir() for item in (_BANK_ITEM, _VECTORS_ITEM)]
        if not any(items):
            raise errors.CorruptCheckpointError(
                f"{path} is not a vector bank (no {_BANK_ITEM!r} and {_VECTORS_ITEM!r} items); "
                "point to a directory written by VectorBank.save"
            )
        if not all(items):
            missing = _BANK_ITEM if not items[0] else _VECTORS_ITEM
            raise errors.CorruptCheckpointError(
                f"the vector bank at {path} is incomplete: its {missing!r} item is missing; save the bank again"
            )
        ocp = load_orbax()
        try:
            with quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
                info = ckptr.restore(path, args=ocp.args.Composite(**{_BANK_ITEM: ocp.args.JsonRestore()}))[
                    _BANK_ITEM
                ]
        except Exception as e:  # noqa: BLE001 - orbax/json raise many types; all mean the same here
            raise _corrupt(path, "its metadata cannot be read", e) from e
        shape = _check_bank_json(path, info)
        try:
            with quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
                restored = ckptr.restore(path, args=ocp.args.Composite(**{_VECTORS_ITEM: ocp.args.StandardRestore()}))
            vectors = np.asarray(restored[_VECTORS_ITEM]["vectors"])
        except Exception as e:  # noqa: BLE001
            raise _corrupt(path, "its vector data cannot be read", e) from e
        if vectors.shape != shape or vectors.dtype != np.float32:
            raise errors.CorruptCheckpointError(
                f"the vector bank at {path} is corrupt: its data is {vectors.dtype} {list(vectors.shape)} "
                f"but its metadata says float32 {list(shape)}; save the bank again"
            )
        vectors = np.ascontiguousarray(vectors)
        if _sha256(vectors) != info["sha256"]:
            raise errors.CorruptCheckpointError(
                f"the vector bank at {path} is corrupt: its vector data does not match the stored sha256 "
                "checksum; save the bank again"
            )
        try:
            bank = cls(
                vectors=vectors,
                names=tuple(info["names"]),
                model=info["model"],
                meta=tuple(info["meta"]),
                convention=info["convention"],
                created=info["created"],
            )
        except errors.InputError as e:
            raise errors.CorruptCheckpointError(f"the vector bank at {path} is invalid: {e}") from e
        if cfg is not None:
            bank.check_model(cfg)
        return bank


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def _looks_like_bank(path: Path) -> bool:
    return (path / _BANK_ITEM).is_dir() and (path / _VECTORS_ITEM).is_dir()


def _swap_into_place(new: Path, dest: Path) -> None:
    """Rename the finished directory ``new`` onto ``dest``; an existing ``dest`` is moved aside first."""
    if not (dest.exists() or dest.is_symlink()):
        os.rename(new, dest)
        return
    old = dest.parent / f".{dest.name}{_OLD_TAG}{uuid.uuid4().hex[:12]}"
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)  # put the previous bank back
        raise
    remove_quietly(old)


def _corrupt(path: Path, what: str, e: BaseException) -> errors.CorruptCheckpointError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    detail = detail.split(" [tensorstore_spec=")[0]
    detail = detail if len(detail) <= 240 else detail[:240] + "..."
    return errors.CorruptCheckpointError(
        f"the vector bank at {path} is corrupt or incomplete: {what} ({type(e).__name__}: {detail}); "
        "save the bank again (or restore it from a backup)"
    )


def _check_bank_json(path: Path, info: Any) -> tuple[int, int, int]:
    """Validate the stored bank metadata; returns the stored ``[K, L+1, D]`` shape."""
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise errors.CorruptCheckpointError(
            f"{path} is an Orbax checkpoint but not a jaxpersona vector bank (no {FORMAT!r} marker); "
            "point to a directory written by VectorBank.save"
        )
    if info.get("version") != FORMAT_VERSION:
        raise errors.CorruptCheckpointError(
            f"the vector bank at {path} has format version {info.get('version')!r}; this jaxpersona reads "
            f"version {FORMAT_VERSION}. Upgrade jaxpersona or re-save the bank"
        )
    need = {"model": str, "names": list, "meta": list, "convention": str, "created": str, "shape": list,
            "sha256": str}
    bad = [k for k, t in need.items() if not isinstance(info.get(k), t)]
    shape = info.get("shape", [])
    if bad or len(shape) != 3 or not all(isinstance(s, int) for s in shape):
        raise errors.CorruptCheckpointError(
            f"the vector bank at {path} has incomplete metadata (bad or missing: {', '.join(bad) or 'shape'}); "
            "save the bank again"
        )
    return (shape[0], shape[1], shape[2])


def select_entries(bank: VectorBank, names: Iterable[str]) -> VectorBank:
    """A bank of the entries ``names`` of ``bank`` only, in that order (vectors ``[K', L+1, D]``, meta kept).
    An unknown name raises :class:`~jaxpersona.errors.InputError` listing the bank's entries."""
    names = tuple(names)
    return VectorBank(np.stack([bank.get(n) for n in names]), names, bank.model, tuple(bank.meta_of(n) for n in names))


def describe_bank(bank: VectorBank, label: str) -> str:
    """A bank for people (``label``: where it was loaded from): shape, model, convention, one line of
    JSON meta per entry."""
    lines = [f"{label}: model {bank.model}, {len(bank.names)} entries x {bank.n_resid} resid points x "
             f"{bank.d_model}, created {bank.created}\nconvention: {bank.convention}"]
    lines.extend(f"  {name}: {json.dumps(meta)}" for name, meta in zip(bank.names, bank.meta))
    return "\n".join(lines)

# --------------------------------------------------------------------------------------------------
# llama.cpp control vectors (GGUF)
# --------------------------------------------------------------------------------------------------



