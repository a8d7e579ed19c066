"""Tokenize and pad: left-padded token batches with a valid mask, in shape buckets."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxpersona import errors

BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer recompiles)


class Batch(NamedTuple):
    """Left-padded token batch: ``tokens [B, T]`` int32 and ``valid [B, T]`` bool."""

    tokens: np.ndarray
    valid: np.ndarray


def pad_left(seqs: list[list[int]], pad_id: int, bucket: int = BUCKET) -> Batch:
    """Left-pad id lists into a :class:`Batch`, length rounded up to a multiple of ``bucket``."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise errors.InputError("empty batch or empty prompt; give at least one non-empty prompt")
    t = max(len(s) for s in seqs)
    t = -(-t // bucket) * bucket if bucket > 1 else t
    tokens = np.full((len(seqs), t), pad_id, np.int32)
    valid = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        tokens[i, t - len(s) :] = s
        valid[i, t - len(s) :] = True
    return Batch(tokens, valid)
