"""What a compiled program (XLA's optimised HLO text) does with a stacked KV cache: shared by the kernel and
cache tests."""

from __future__ import annotations

import re


def cache_copies(hlo: str, cfg) -> list[str]:
    """What copies a stacked KV cache ``f32[L, B, KV, S, hd]`` in a compiled program: fused computations that
    take the whole cache and return a layer's keys or values ``f32[B, KV, s, hd]`` (XLA's slice, or its blocks,
    before the attention products), and copies of the whole cache other than from a broadcast (its zeros)."""
    kv, hd = cfg.n_kv_heads, cfg.head_dim
    cache = rf"f32\[{cfg.n_layers},\d+,{kv},\d+,{hd}\]"
    layer_of = re.compile(rf"^%\S+ \(.*: {cache}.*\) -> f32\[\d+,{kv},\d+,{hd}\] {{")
    whole = re.compile(rf"= {cache}\S* copy\((?!%\S*broadcast)")
    return [line for line in hlo.splitlines() if layer_of.search(line) or whole.search(line)]
