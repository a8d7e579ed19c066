"""Prefix caching: the keys and values of prompt blocks that earlier requests computed, reused by later
requests that start the same way (a persona study sends one system prompt thousands of times).

The engine prefills every prompt in blocks of ``C`` tokens at slots ``0, C, 2C, ...`` of its row, each block
one call of the same shape. Block ``j``'s keys and values are therefore a function of the tokens of blocks
``0..j``, the adapter, and whatever acts on those slots during prefill (interventions and mixtures whose
position mask touches them) — nothing else. A block's key hashes exactly that, chained over the blocks before
it (:func:`block_keys`, as vLLM puts the LoRA id into its block hashes), so a hit hands a request the very
numbers it would have computed itself: a request's tokens and log-probs are the same with or without a hit,
bit for bit. Only full blocks before the one holding the prompt's last token are cached (that block's
logits start the generation, so it is always computed).

:class:`PrefixCache` keeps blocks in device memory up to a byte budget, least recently used evicted first.
A hit copies its blocks into the request's prefill row at once, so an eviction never takes blocks from a
request that uses them (entries are immutable arrays: "pinned" for as long as the copy needs them).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np


def block_keys(tokens: list[int], chunk: int, adapter: int, actors: Iterable[tuple[bytes, np.ndarray]],
               blocks: int) -> list[bytes]:
    """Keys of the first ``blocks`` blocks of ``tokens`` (``chunk`` tokens each). ``actors``: what may act on
    prompt slots during prefill, as ``(identity bytes, slot mask [S])`` — an actor enters block ``j``'s key
    when its mask touches the block's slots. Each key chains the one before it."""
    actors = list(actors)
    keys, prev = [], b"jaxpersona-prefix-v1" + adapter.to_bytes(4, "little", signed=True)
    for j in range(blocks):
        lo, hi = j * chunk, (j + 1) * chunk
        h = hashlib.sha256(prev)
        h.update(np.asarray(tokens[lo:hi], np.int64).tobytes())
        for ident, mask in actors:
            part = mask[lo:hi]
            if part.any():
                h.update(ident)
                h.update(np.packbits(part).tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


def actor_identity(*arrays: Any) -> bytes:
    """Bytes that identify an intervention's numbers (vector, coefficients, bounds, layer weights)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            arr = np.ascontiguousarray(np.asarray(a))
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(arr.tobytes())
    return h.digest()


class PrefixCache:
    """Blocks ``key -> (k, v)`` (each ``[L, KV, C, hd]`` device arrays) up to ``budget`` bytes, LRU. (The
    engine counts the prompt tokens looked up and served, in its ``stats``.)"""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self.blocks: collections.OrderedDict[bytes, tuple[Any, Any]] = collections.OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def lookup(self, keys: list[bytes]) -> list[tuple[Any, Any]]:
        """The cached blocks of the longest cached run of ``keys`` from the first (marked recently used)."""
        found = []
        for key in keys:
            blk = self.blocks.get(key)
            if blk is None:
                break
            self.blocks.move_to_end(key)
            found.append(blk)
        return found

    def store(self, key: bytes, k: Any, v: Any) -> None:
        """Keep a block (no-op when present, or when the budget is 0); evict the least recently used past the
        budget."""
        if self.budget <= 0 or key in self.blocks:
            return
        size = int(k.nbytes) + int(v.nbytes)
        if size > self.budget:
            return
        self.blocks[key] = (k, v)
        self.bytes += size
        while self.bytes > self.budget:
            _, (ok, ov) = self.blocks.popitem(last=False)
            self.bytes -= int(ok.nbytes) + int(ov.nbytes)
            self.evictions += 1
