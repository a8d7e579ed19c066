"""Vector files of other tools: persona_vectors ``.pt``, assistant-axis arrays, llama.cpp control vectors."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.bank import F32, VectorBank, as_f32
from jaxpersona.artifacts.records import atomic_write

__all__ = ["export_assistant_axis_pt", "export_control_vector", "export_pt", "from_assistant_axis",
           "import_assistant_axis_pt", "import_control_vector", "import_pt", "to_assistant_axis"]

_CV_ARCH = "controlvector"


def _as_matrix(x: Any, what: str) -> F32:
    a = as_f32(x, what)
    if a.ndim != 2:
        raise errors.InputError(f"{what} must be 2-D, got shape {list(a.shape)}")
    return a


# --------------------------------------------------------------------------------------------------
# persona_vectors .pt
# --------------------------------------------------------------------------------------------------
_PV_VARIANTS = {"response_avg_diff": "response_mean", "prompt_avg_diff": "prompt_mean",
                "prompt_last_diff": "prompt_last"}


def require_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise errors.InputError(
            "reading/writing .pt files (persona_vectors vectors, assistant-axis axes and capping configs) needs "
            "PyTorch, which jaxpersona does not install; run `pip install torch` (the CPU build is enough)"
        ) from e
    return torch


def import_pt(
    path: str | os.PathLike[str], name: str, model: str, meta: Mapping[str, Any] | None = None
) -> VectorBank:
    """One-entry bank from a persona_vectors ``.pt`` file (``torch.save(tensor [L+1, D])``).

    persona_vectors indexes layers like HF ``hidden_states``, as jaxpersona does: row ``l`` = ``resid[l]``.
    The meta records the source file and, from names like ``evil_response_avg_diff.pt``, the variant.
    """
    torch = require_torch()
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
    torch = require_torch()
    tensor = torch.from_numpy(bank.get(name))
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(tensor, tmp))
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


AXIS_PT_CONVENTION = ("assistant-axis: row i = output of decoder block i (hook on model.model.layers[i]); "
                      "jaxpersona resid[i+1]")


def _torch_load_tensors(path: Path, expected: str) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` with typed errors (tensors, dicts, lists, numbers, strings only:
    nothing in the file is executed)."""
    torch = require_torch()
    if not path.is_file():
        raise errors.ModelNotFoundError(f"no .pt file at {path}; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many kinds
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise errors.CorruptCheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {first}); it must be "
            f"{expected}"
        ) from e


def _json_safe(x: Any) -> Any:
    """``x`` with tensors / arrays as lists and anything else not JSON-able as its ``str``."""
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def import_assistant_axis_pt(path: str | os.PathLike[str], name: str, model: str,
                             meta: Mapping[str, Any] | None = None) -> VectorBank:
    """One-entry bank from an assistant-axis ``assistant_axis.pt``: a raw ``[n_layers, hidden]`` tensor (as
    their ``5_axis.py`` saves it) or ``{"axis": tensor, "metadata": {...}}`` (as their ``save_axis`` does).

    Their row ``i`` (output of block ``i``) becomes our ``resid[i+1]``; ``resid[0]`` (embeddings, which they do
    not have) is zeros. Their ``metadata`` is kept in the entry's meta (``axis_metadata``)."""
    path = Path(path)
    obj = _torch_load_tensors(path, 'a torch.save of an [n_layers, hidden] tensor or of {"axis": tensor, '
                                    '"metadata": dict} (assistant-axis save_axis)')
    torch = require_torch()
    extra: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        if "axis" not in obj:
            raise errors.InputError(f"{path} holds a dict with keys {sorted(map(str, obj))[:8]}, not an assistant "
                                    "axis (expected 'axis' and optionally 'metadata', as their save_axis writes)")
        if obj.get("metadata") is not None:
            extra["axis_metadata"] = _json_safe(obj["metadata"])
        obj = obj["axis"]
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or not obj.is_floating_point():
        what = f"a {obj.dtype} tensor of shape {list(obj.shape)}" if isinstance(obj, torch.Tensor) else \
            f"a {type(obj).__name__}"
        raise errors.InputError(f"{path}: the axis is {what}; expected a float [n_layers, hidden] tensor")
    arr = from_assistant_axis(obj.detach().to(torch.float32).cpu().numpy())
    m: dict[str, Any] = {"source": str(path), "imported_from": "assistant-axis .pt", "convention_of_source":
                         AXIS_PT_CONVENTION, "note": "resid[0] (embeddings) is zeros: the source has no such row",
                         **extra}
    m.update(meta or {})
    return VectorBank(arr[None], (name,), model, (m,))


def export_assistant_axis_pt(bank: VectorBank, name: str, path: str | os.PathLike[str],
                             metadata: Mapping[str, Any] | None = None) -> Path:
    """Write entry ``name`` as assistant-axis ``save_axis`` does: ``torch.save({"axis": float32 tensor
    [n_layers, hidden], "metadata": {...}})`` (atomic). Row ``i`` is our ``resid[i+1]`` (their block-output
    index; our ``resid[0]`` is dropped), so their ``load_axis`` and ``axis[layer]`` read it as their own. The
    metadata records the model, the entry and the conventions (plus ``metadata``)."""
    torch = require_torch()
    axis = torch.from_numpy(to_assistant_axis(bank.get(name)))
    meta = {"model": bank.model, "entry": name, "source": "jaxpersona", "n_layers": int(axis.shape[0]),
            "hidden": int(axis.shape[1]), "convention": AXIS_PT_CONVENTION,
            "direction": "toward the Assistant (mean default - mean roles)" if name == "assistant_axis" else
            "as the jaxpersona entry", **_json_safe(dict(metadata or {}))}
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save({"axis": axis, "metadata": meta}, tmp))
    return path


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
    chosen_at = bank.meta_of(name).get("positions")
    if chosen_at not in (None, "all"):
        warnings.warn(f"{name!r} was chosen for steering at {chosen_at} positions; a llama.cpp control vector "
                      "steers every position (prompt and reply), so its effect there differs from the one measured",
                      stacklevel=2)

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
    atomic_write(path, write)
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


# --------------------------------------------------------------------------------------------------
# `jaxpersona vectors import / export`
# --------------------------------------------------------------------------------------------------
IMPORT_FORMATS = ("pt", "assistant-axis-pt")


def import_pt_into_bank(pt: str | os.PathLike[str], name: str, bank: str | os.PathLike[str], model: str,
                        fmt: str | None = None) -> Path:
    """Entry ``name`` from the ``.pt`` file ``pt`` saved into the bank directory ``bank``: added to (or
    replacing that entry of) an existing bank, which keeps its other entries, else a new one-entry bank of
    ``model``. ``fmt``: ``"pt"`` (persona_vectors ``[L+1, D]``) or ``"assistant-axis-pt"`` (``[L, D]``, raw or
    ``{"axis", "metadata"}``); None: the assistant-axis dict is recognised, a raw tensor is persona_vectors'.
    Returns the bank directory."""
    if fmt not in (None, *IMPORT_FORMATS):
        raise errors.InputError(f"unknown .pt import format {fmt!r}; one of {', '.join(IMPORT_FORMATS)}")
    if fmt is None:
        obj = _torch_load_tensors(Path(pt), "a torch.save of a tensor or of an assistant-axis {'axis', 'metadata'}")
        fmt = "assistant-axis-pt" if isinstance(obj, Mapping) and "axis" in obj else "pt"
    new = import_assistant_axis_pt(pt, name, model) if fmt == "assistant-axis-pt" else import_pt(pt, name, model)
    target = Path(bank)
    if target.exists():
        old = VectorBank.load(target)
        if model not in ("unknown", old.model):  # "unknown": no --model-id given
            raise errors.ModelMismatchError(f"{target} is a bank of {old.model!r}; an entry for {model!r} does not "
                                            "belong in it (choose another --bank, or leave out --model-id)")
        new = old.with_entry(name, new.get(name), new.meta_of(name))
    new.save(target, overwrite=True)
    return target


EXPORT_FORMATS = ("pt", "control", "assistant-axis", "assistant-axis-pt")


def export_entry(bank: VectorBank, name: str, fmt: str, out: str | os.PathLike[str], *, coeff: float = 1.0) -> None:
    """Write entry ``name`` of ``bank`` to ``out`` as ``fmt``: ``pt`` (persona_vectors ``[L+1, D]``
    tensor), ``control`` (llama.cpp control vector GGUF, times ``coeff``), ``assistant-axis``
    (``np.save`` of ``[L, D]``, no embedding row) or ``assistant-axis-pt`` (their ``assistant_axis.pt``:
    ``{"axis": [L, D] tensor, "metadata"}`` as their ``save_axis`` writes it)."""
    if name not in bank:
        raise errors.InputError(f"no entry {name!r} in the bank; it has {list(bank.names)}")
    if fmt == "assistant-axis-pt":
        export_assistant_axis_pt(bank, name, out)
    elif fmt == "pt":
        export_pt(bank, name, out)
    elif fmt == "control":
        export_control_vector(bank, name, out, coeff=coeff)
    elif fmt == "assistant-axis":
        np.save(out, to_assistant_axis(bank.get(name)))
    else:
        raise errors.InputError(f"unknown vector export format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
