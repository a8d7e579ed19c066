"""Persona space math: the Assistant Axis, PCA of role vectors, projections and capping configs.

Conventions (explicit, unlike the reference code where the sign lives in the data file):

* ``axis[l] = mean(default) - mean(role vectors)`` at every resid point ``l`` (``[L+1, D]``): it points
  **toward the Assistant**; a projection ``<h, axis[l]/|axis[l]|>`` is higher for more Assistant-like
  activations.
* A :class:`CapConfig` holds, per capped resid point, a unit ``direction``, a ``floor`` and a
  ``ceiling`` (``-inf``/``inf`` = none). Capping clamps the projection into ``[floor, ceiling]``;
  calibrated configs put a floor on the Assistant Axis (activations may not drift further from the
  Assistant than the chosen percentile of the default Assistant's own tokens).
* The reference project's ``capping_config.pt`` caps *from above* on a stored vector ``v`` with
  threshold ``tau`` (``h -= max(0, <h, v̂> - tau) v̂``). That is the same operation as a floor of
  ``-tau`` on direction ``-v̂``; :func:`import_reference_capping` writes it that way (so, with their
  vectors pointing away from the Assistant, it becomes a floor on the Assistant Axis). Their layer
  ``i`` (output of block ``i``) is our ``resid[i+1]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors


def assistant_axis(default: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """``default [L+1, D]`` minus the mean of ``roles [R, L+1, D]``: ``[L+1, D]``, toward the Assistant."""
    return (np.asarray(default, np.float64) - np.asarray(roles, np.float64).mean(axis=0)).astype(np.float32)


class PCA(NamedTuple):
    """PCA of mean-centred role vectors at every resid point (``k`` = min(R, D) components).

    Each PC1 is oriented so that ``cos(axis, PC1) >= 0`` (PC signs are arbitrary otherwise)."""

    mean: np.ndarray  # [L+1, D] the role mean the vectors are centred on
    components: np.ndarray  # [L+1, k, D] unit rows
    variance_ratio: np.ndarray  # [L+1, k]
    scores: np.ndarray  # [L+1, R, k] role coordinates


@jax.jit
def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per resid point SVD of centred ``x [L+1, R, D]``: ``(u, s, vt)``."""
    return jax.vmap(lambda a: jnp.linalg.svd(a, full_matrices=False))(x)


def role_pca(roles: np.ndarray, axis: np.ndarray | None = None) -> PCA:
    """PCA over ``roles [R, L+1, D]`` at each resid point (jnp SVD, float32)."""
    x = np.asarray(roles, np.float32).transpose(1, 0, 2)  # [L+1, R, D]
    if x.shape[1] < 2:
        raise errors.InputError(f"PCA needs at least 2 role vectors, got {x.shape[1]}")
    mean = x.mean(axis=1, keepdims=True)
    u, s, vt = (np.array(a, np.float32) for a in _svd(jnp.asarray(x - mean)))
    var = s**2
    ratio = var / np.maximum(var.sum(axis=-1, keepdims=True), 1e-30)
    scores = u * s[:, None, :]
    if axis is not None:  # orient PC1 toward the Assistant
        sign = np.where(np.einsum("ld,ld->l", vt[:, 0], np.asarray(axis, np.float32)) < 0, -1.0, 1.0)
        vt[:, 0] *= sign[:, None]
        scores[:, :, 0] *= sign[:, None]
    return PCA(mean[:, 0], vt, ratio, scores)


def components_for(variance_ratio: np.ndarray, fraction: float = 0.7) -> np.ndarray:
    """``[L+1]``: the number of leading components whose variance ratios sum to ``>= fraction``."""
    cum = np.cumsum(np.asarray(variance_ratio, np.float64), axis=-1)
    return (np.argmax(cum >= fraction - 1e-9, axis=-1) + 1).astype(np.int64)


def default_position(pca: PCA, default: np.ndarray) -> dict[str, np.ndarray]:
    """Where the default lands on PC1 at each resid point, against the roles' range.

    ``score`` = ``<default - mean, PC1>``; ``relative`` = (score - min role) / (max role - min role)
    (> 1: beyond every role on the Assistant side); ``beyond`` = fraction of roles it exceeds."""
    d = np.einsum("ld,ld->l", np.asarray(default, np.float32) - pca.mean, pca.components[:, 0])
    r = pca.scores[:, :, 0]
    lo, hi = r.min(axis=1), r.max(axis=1)
    return {"score": d, "relative": (d - lo) / np.maximum(hi - lo, 1e-12), "beyond": (r < d[:, None]).mean(axis=1)}


