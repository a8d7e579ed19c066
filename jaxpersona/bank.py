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

import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from jaxpersona import errors

if TYPE_CHECKING:
    from jaxpersona.config import ModelConfig

__all__ = [
    "CONVENTION", "VectorBank", "export_control_vector", "export_pt", "from_assistant_axis",
    "import_control_vector", "import_pt", "to_assistant_axis",
]

CONVENTION = "resid[0]=embeddings, resid[l]=output of block l-1"
FORMAT = "jaxpersona.VectorBank"
FORMAT_VERSION = 1
_VECTORS_ITEM = "vectors"
_BANK_ITEM = "bank"
_TMP_TAG = ".jaxpersona-tmp-"
_OLD_TAG = ".jaxpersona-old-"
_ORBAX_TMP_TAG = ".orbax-checkpoint-tmp"
F32 = npt.NDArray[np.float32]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_normalize(obj: Any, what: str) -> Any:
    """``obj`` after a strict JSON round trip (tuples -> lists, keys -> str); InputError if not JSON-able."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise errors.InputError(
            f"{what} is not JSON-serialisable ({e}); use only str, int, float (finite), bool, None, "
            "lists and dicts with str keys"
        ) from e


def _as_f32(x: Any, what: str) -> F32:
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
        vec = _as_f32(self.vectors, "VectorBank.vectors")
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
        arrs = [_as_f32(entries[n], f"vectors of {n!r}") for n in names]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1 or arrs[0].ndim != 2:
            raise errors.InputError(
                "every entry must be [L+1, D] with the same shape, got "
                + ", ".join(f"{n}: {list(a.shape)}" for n, a in zip(names, arrs))
            )
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
        if not isinstance(layer, (int, np.integer)) or not -self.n_resid <= layer < self.n_resid:
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
        """A new bank with entry ``name`` (``[L+1, D]``) added, or replaced in place if it exists."""
        v = _as_f32(vectors, f"vectors of {name!r}")
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
            metas[i] = dict(meta or {})
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}{_TMP_TAG}{uuid.uuid4().hex[:12]}"
        try:
            ocp = _orbax()
            with _quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
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
            _rmtree_quiet(tmp)
            for leftover in path.parent.glob(f"{glob.escape(tmp.name)}{_ORBAX_TMP_TAG}*"):
                _rmtree_quiet(leftover)
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
                p.name for pattern in (f".{stem}{_TMP_TAG}*", f".{stem}{_OLD_TAG}*", f"{stem}{_ORBAX_TMP_TAG}*")
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
        if _TMP_TAG in path.name or _ORBAX_TMP_TAG in path.name or _OLD_TAG in path.name:
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
        ocp = _orbax()
        try:
            with _quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
                info = ckptr.restore(path, args=ocp.args.Composite(**{_BANK_ITEM: ocp.args.JsonRestore()}))[
                    _BANK_ITEM
                ]
        except Exception as e:  # noqa: BLE001 - orbax/json raise many types; all mean the same here
            raise _corrupt(path, "its metadata cannot be read", e) from e
        shape = _check_bank_json(path, info)
        try:
            with _quiet_absl(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
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


# --------------------------------------------------------------------------------------------------
# persistence helpers
# --------------------------------------------------------------------------------------------------
def _orbax() -> Any:
    import orbax.checkpoint as ocp

    return ocp


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Hide orbax's absl INFO/WARNING chatter for the duration of one save/restore (level restored after)."""
    import logging

    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(max(old, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(old)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def _looks_like_bank(path: Path) -> bool:
    return (path / _BANK_ITEM).is_dir() and (path / _VECTORS_ITEM).is_dir()


def _rmtree_quiet(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        with contextlib.suppress(OSError):
            p.unlink()


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
    _rmtree_quiet(old)


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
    shape = info.get("shape")
    if bad or len(shape) != 3 or not all(isinstance(s, int) for s in shape):
        raise errors.CorruptCheckpointError(
            f"the vector bank at {path} has incomplete metadata (bad or missing: {', '.join(bad) or 'shape'}); "
            "save the bank again"
        )
    return (shape[0], shape[1], shape[2])


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{_TMP_TAG}{uuid.uuid4().hex[:12]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        _rmtree_quiet(tmp)


def _as_matrix(x: Any, what: str) -> F32:
    a = _as_f32(x, what)
    if a.ndim != 2:
        raise errors.InputError(f"{what} must be 2-D, got shape {list(a.shape)}")
    return a


# --------------------------------------------------------------------------------------------------
# persona_vectors .pt
# --------------------------------------------------------------------------------------------------
_PV_VARIANTS = {"response_avg_diff": "response_mean", "prompt_avg_diff": "prompt_mean",
                "prompt_last_diff": "prompt_last"}


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise errors.InputError(
            "reading/writing persona_vectors .pt files needs PyTorch, which jaxpersona does not install; "
            "run `pip install torch` (the CPU build is enough)"
        ) from e
    return torch


def import_pt(
    path: str | os.PathLike[str], name: str, model: str, meta: Mapping[str, Any] | None = None
) -> VectorBank:
    """One-entry bank from a persona_vectors ``.pt`` file (``torch.save(tensor [L+1, D])``).

    persona_vectors indexes layers like HF ``hidden_states``, as jaxpersona does: row ``l`` = ``resid[l]``.
    The meta records the source file and, from names like ``evil_response_avg_diff.pt``, the variant.
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise errors.ModelNotFoundError(f"no .pt file at {path}; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise errors.CorruptCheckpointError(
            f"{path} cannot be read as a tensor file with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
            "it must be a torch.save of one [L+1, D] tensor"
        ) from e
    if not isinstance(obj, torch.Tensor):
        raise errors.InputError(
            f"{path} holds a {type(obj).__name__}, not a tensor; persona_vectors files are torch.save(tensor [L+1, D])"
        )
    if obj.ndim != 2 or not obj.is_floating_point():
        raise errors.InputError(
            f"{path} holds a {obj.dtype} tensor of shape {list(obj.shape)}; expected a float [L+1, D] tensor "
            "(one vector per resid point, row 0 = embeddings)"
        )
    arr = obj.detach().to(torch.float32).cpu().numpy()
    m: dict[str, Any] = {"source": str(path), "imported_from": "persona_vectors .pt"}
    for suffix, variant in _PV_VARIANTS.items():
        if path.stem.endswith(suffix):
            m["variant"] = variant
    m.update(meta or {})
    return VectorBank(arr[None], (name,), model, (m,))


def export_pt(bank: VectorBank, name: str, path: str | os.PathLike[str]) -> Path:
    """Write entry ``name`` as persona_vectors does: ``torch.save(float32 tensor [L+1, D])`` (atomic)."""
    torch = _torch()
    tensor = torch.from_numpy(bank.get(name))
    path = Path(path)
    _atomic_write(path, lambda tmp: torch.save(tensor, tmp))
    return path


# --------------------------------------------------------------------------------------------------
# assistant-axis
# --------------------------------------------------------------------------------------------------
def from_assistant_axis(arr: Any) -> F32:
    """assistant-axis ``[L, D]`` -> jaxpersona ``[L+1, D]``.

    assistant-axis (Lu et al. 2026) indexes per-layer arrays by block output: their row ``i`` = output
    of block ``i`` = our ``resid[i+1]``. They have no embedding row, so row 0 (``resid[0]``) of the
    result is **zeros**.
    """
    a = _as_matrix(arr, "assistant-axis array [L, D]")
    return np.concatenate([np.zeros((1, a.shape[1]), np.float32), a], axis=0)


def to_assistant_axis(arr: Any) -> F32:
    """jaxpersona ``[L+1, D]`` -> assistant-axis ``[L, D]``: drops ``resid[0]`` (embeddings).

    Row ``i`` of the result is our ``resid[i+1]`` = output of block ``i`` (their indexing).
    """
    a = _as_matrix(arr, "resid array [L+1, D]")
    if a.shape[0] < 2:
        raise errors.InputError(f"resid array must have L+1 >= 2 rows, got shape {list(a.shape)}")
    return a[1:].copy()


# --------------------------------------------------------------------------------------------------
# llama.cpp control vectors (GGUF)
# --------------------------------------------------------------------------------------------------
_CV_ARCH = "controlvector"


def export_control_vector(
    bank: VectorBank,
    name: str,
    path: str | os.PathLike[str],
    *,
    coeff: float = 1.0,
    layers: Iterable[int] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write entry ``name`` (times ``coeff``) as a llama.cpp control vector GGUF, as repeng does.

    llama.cpp adds tensor ``direction.N`` (``N >= 1``; 0 is rejected) to the output of block ``N``
    (0-based), i.e. our ``resid[N+1]``. So our ``resid[l]`` is written as ``direction.{l-1}``, for
    ``l`` in ``2..L``; ``resid[0]`` and ``resid[1]`` cannot be represented. ``layers``: our resid
    indices to export (default all of ``2..L``). ``model_hint``: default the entry's ``meta["family"]``,
    else ``"llama"``. Use with ``llama-cli --control-vector(-scaled) path``.
    """
    import gguf

    vec = bank.get(name)
    n_layers = bank.n_resid - 1
    if not np.isfinite(coeff):
        raise errors.InputError(f"coeff must be finite, got {coeff!r}")
    exportable = list(range(2, n_layers + 1))
    if not exportable:
        raise errors.InputError(
            f"the bank has only {n_layers} block(s); llama.cpp control vectors need resid[2..L] (L >= 2)"
        )
    chosen = exportable if layers is None else sorted({int(x) for x in layers})
    if not chosen:
        raise errors.InputError(f"layers is empty; give resid indices in 2..{n_layers}")
    bad = [x for x in chosen if x not in exportable]
    if bad:
        raise errors.InputError(
            f"cannot export resid{bad} as a llama.cpp control vector: our resid[l] becomes direction.{{l-1}}, "
            f"llama.cpp rejects direction.0 and has no slot for the embeddings, so only resid[2..{n_layers}] "
            "can be written"
        )
    if model_hint is None:
        family = bank.meta_of(name).get("family")
        model_hint = family if isinstance(family, str) and family else "llama"

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, _CV_ARCH)
        writer.add_string(f"{_CV_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{_CV_ARCH}.layer_count", len(chosen))
        for l in chosen:
            writer.add_tensor(f"direction.{l - 1}", (np.float32(coeff) * vec[l]).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    _atomic_write(path, write)
    return path


def import_control_vector(path: str | os.PathLike[str], model: str, n_resid: int) -> F32:
    """Read a llama.cpp control vector GGUF into ``[L+1, D]`` (``L+1 = n_resid``) float32.

    ``direction.N`` goes to our ``resid[N+1]``; resid points without a tensor (always ``resid[0]``,
    ``resid[1]``) are zeros. ``model`` (the target model id) is used in error messages.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise errors.ModelNotFoundError(f"no control vector file at {path}; check the path")
    if int(n_resid) < 2:
        raise errors.InputError(f"n_resid must be >= 2 (L+1 with L >= 1 blocks), got {n_resid}")
    try:
        reader = gguf.GGUFReader(path)
        arch_field = reader.fields.get("general.architecture")
        arch = arch_field.contents() if arch_field is not None else None
        tensors = [(t.name, int(t.tensor_type), np.array(t.data, dtype=np.float32, copy=True)) for t in reader.tensors]
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct errors/IndexError on bad files
        raise errors.CorruptCheckpointError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); write it again"
        ) from e
    if arch != _CV_ARCH:
        raise errors.InputError(
            f"{path} is a GGUF with architecture {arch!r}, not a llama.cpp control vector ({_CV_ARCH!r})"
        )
    out: F32 | None = None
    for tname, ttype, data in tensors:
        m = re.fullmatch(r"direction\.(\d+)", tname)
        if m is None or int(m.group(1)) == 0:
            raise errors.CorruptCheckpointError(
                f"{path} has tensor {tname!r}; control vectors hold only direction.N tensors with N >= 1"
            )
        if ttype != int(gguf.GGMLQuantizationType.F32) or data.ndim != 1:
            raise errors.CorruptCheckpointError(f"{path}: {tname} must be a 1-D float32 tensor (as llama.cpp requires)")
        l = int(m.group(1)) + 1
        if l >= n_resid:
            raise errors.ModelMismatchError(
                f"{path} has {tname} (output of block {l - 1}) but {model!r} has only {n_resid - 1} blocks; "
                "this control vector was made for a deeper model"
            )
        if out is None:
            out = np.zeros((int(n_resid), data.shape[0]), np.float32)
        elif data.shape[0] != out.shape[1]:
            raise errors.CorruptCheckpointError(
                f"{path}: {tname} has {data.shape[0]} values but other directions have {out.shape[1]}"
            )
        out[l] = data
    if out is None:
        raise errors.CorruptCheckpointError(f"{path} is a control vector GGUF without any direction.N tensor")
    return out
