"""Directions from activations. (Contrastive mean differences now; the persona-vector pipeline
of Chen et al. builds on this.)"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxpersona import errors


def contrast_vectors(
    model: Any,
    positive: list[str],
    negative: list[str],
    *,
    reduce: str = "mean",
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """``mean(resid | positive) - mean(resid | negative)`` at every resid point: ``[L+1, D]`` float32.

    Each text is reduced over its tokens (``mean``) or taken at its ``last`` token, inside the jitted
    forward; texts are chat user turns when ``chat`` (with an optional system prompt).
    """
    if not positive or not negative:
        raise errors.InputError("contrast_vectors needs at least one positive and one negative text")
    layers = tuple(range(model.cfg.n_resid))

    def mean_resid(texts: list[str]) -> np.ndarray:
        parts = [model.resid(texts[i : i + batch_size], layers, reduce, chat=chat, system=system)
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts, axis=1).mean(axis=1)  # [L+1, D]

    return (mean_resid(positive) - mean_resid(negative)).astype(np.float32)
