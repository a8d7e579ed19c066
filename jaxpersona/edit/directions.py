"""Directions as numbers: unit vectors, cosines, and steering coefficients in residual-norm units."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxpersona import errors


def unit(v: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis (zeros stay zero)."""
    v = np.asarray(v, np.float32)
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``[..., D]`` arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30))


def steering_vectors(vectors: np.ndarray, resid_norm: np.ndarray | None, units: str) -> np.ndarray:
    """``[L+1, D]`` vectors a coefficient multiplies: ``|resid[l]| * v̂[l]`` (relative units) or ``v[l]``."""
    v = np.asarray(vectors, np.float32)
    if units not in ("absolute", "relative"):  # a typo would otherwise scale by the residual norm
        raise errors.InputError(f"coefficient units must be 'relative' or 'absolute', got {units!r}")
    if units == "absolute":
        return v
    if resid_norm is None:
        raise errors.InputError("relative steering coefficients need the residual norms recorded in the bank "
                                "(banks from before jaxpersona 0.2 lack them): re-run `jaxpersona extract` for the "
                                "trait to record them, or use coeff_units = 'absolute'")
    norms = np.asarray(resid_norm, np.float32)
    if norms.shape != v.shape[:1] or not np.all(np.isfinite(norms)):
        raise errors.InputError(f"residual norms have shape {norms.shape}; expected [{v.shape[0]}] finite values")
    unit = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return (unit * norms[:, None]).astype(np.float32)


def bank_resid_norm(bank: Any, name: str) -> np.ndarray | None:
    """The residual norms recorded with bank entry ``name`` (None for older banks)."""
    norms = bank.meta_of(name).get("resid_norm")
    return None if norms is None else np.asarray(norms, np.float32)
