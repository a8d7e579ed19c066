"""Tokenize and pad, once: left-padded token batches with a valid mask, and the bucket policy of their width.

Token ids come from :meth:`~jaxpersona.compute.handle.Model.chat_ids` (chat-templated prompts) and
:meth:`~jaxpersona.compute.handle.Model.pair_ids` (prompt + response re-tokenized from its text);
:func:`pad_left` pads them. The width policy is a named parameter, ``bucket``: the width is the longest
row rounded up to a multiple of ``bucket`` (``1``: exact); :func:`bucket_for` gives a fixed width when
every row fits it (one compile for sets of different sizes) and 16 otherwise. Each caller keeps its own
bucket, so its padded shapes (and so its numbers) are what they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxpersona import errors

BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer recompiles)


class Batch(NamedTuple):
    """Left-padded token batch: ``tokens [B, T]`` int32 and ``valid [B, T]`` bool."""

    tokens: np.ndarray
    valid: np.ndarray


def check_count(n: Any, what: str = "batch_size", least: int = 1) -> int:
    """``n`` as an int, or :class:`~jaxpersona.errors.InputError` unless it is a whole number >= ``least`` (a bool,
    a float or a string is none)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < least:
        raise errors.InputError(f"{what} must be a whole number >= {least}, got {n!r}")
    return int(n)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def bucket_for(longest: int, width: int | None) -> int:
    """The bucket policy of fixed-shape callers: ``width`` when the longest row fits it, else multiples of 16."""
    return width if width is not None and longest <= width else BUCKET


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, bucket: int = BUCKET) -> Batch:
    """Left-pad id lists into a :class:`Batch` ``[B, T]``, ``T`` = the longest rounded up to a multiple of ``bucket``."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise errors.InputError("empty batch or empty prompt; give at least one non-empty prompt")
    t = max(len(s) for s in seqs)
    t = round_up(t, bucket) if bucket > 1 else t
    tokens = np.full((len(seqs), t), pad_id, np.int32)
    valid = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        tokens[i, t - len(s) :] = s
        valid[i, t - len(s) :] = True
    return Batch(tokens, valid)


class PairBatch(NamedTuple):
    """Prompt + response rows, left-padded: the batch ``[B, T]``, each row's prompt length ``n_prompt [B]`` and
    total length ``length [B]`` (row ``i`` occupies slots ``T - length[i] ..``; its response the last
    ``length[i] - n_prompt[i]`` of them)."""

    batch: Batch
    n_prompt: np.ndarray
    length: np.ndarray


def pad_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, *, rows: int | None = None,
              width: int | None = None) -> PairBatch:
    """Concatenate ``(prompt ids, response ids)`` per row and left-pad (bucket policy :func:`bucket_for`);
    ``rows`` > len(pairs) repeats the last row (callers drop the copies)."""
    seqs = [list(p) + list(r) for p, r in pairs]
    n_prompt = [len(p) for p, _ in pairs]
    if rows is not None and rows > len(seqs):
        seqs += [seqs[-1]] * (rows - len(seqs))
        n_prompt += [n_prompt[-1]] * (rows - len(n_prompt))
    batch = pad_left(seqs, pad_id, bucket=bucket_for(max(len(s) for s in seqs), width))
    return PairBatch(batch, np.asarray(n_prompt, np.int64), np.asarray([len(s) for s in seqs], np.int64))
