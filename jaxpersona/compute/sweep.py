"""Grids of interventions as one batched computation: vectors x layers x coefficients over a prompt set.

Scoring (teacher-forced log-probs of target responses, and projections of the residual stream
onto any vectors at any layers) is one jitted function per chunk of grid points:

* grid points are stacked into one intervention pytree and ``vmap``-ed, batched with the prompts;
* **shared trunk**: grid points whose intervention starts at resid ``l`` share layers ``< l``; chunks
  run in order of start layer and the unintervened trunk is carried from one chunk's start to the next
  (:class:`Trunk`), so every block below the last start runs once per sweep; only the suffix runs per grid
  point (``run_layers`` with a traced span, so one compile serves every split point);
* **distinct prompts once** (``all`` positions, no projections): rows that share a prompt (a question's
  positive and negative answer) run it once per grid point (:class:`PromptsTrunk`,
  :func:`score_prompts_chunk`), and each point's greedy generation continues from that prompt's keys/values
  instead of prefilling it again;
* logits are computed only at target-response positions;
* chunks are sized from a memory budget and their rows are appended to ``results.jsonl`` as they
  finish; a killed sweep resumes from ``progress.json`` without redoing finished chunks;
* with a ``jax.sharding.Mesh``, the grid axis of a chunk is sharded over the mesh's ``data`` axis
  (params replicated) — the same numbers as one device.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxpersona import errors
from jaxpersona.artifacts.adapters import shard_adapter
from jaxpersona.artifacts.records import atomic_write
from jaxpersona.compute.batching import BUCKET, Batch, check_count, pad_left, round_up
from jaxpersona.compute.generate import generate_loop, prefill_trunk
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.compute.plan import kv_bytes
from jaxpersona.compute.progress import progress_bar
from jaxpersona.compute.scoring import (
    ScoringSet,
    check_pairs,
    encode_scoring,
    encode_shared,
    encode_split,
    gather_prefix,
    shared_shape,
    split_shape,
    target_logprob,
    target_shape,
)
from jaxpersona.edit import interventions as iv
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.lora import Adapter, AdapterStack
from jaxpersona.model.params import Params, activation_dtype
from jaxpersona.model.sharding import shard_params, to_host
from jaxpersona.model.transformer import (
    Capture,
    KVCache,
    KVPrefix,
    Recorder,
    apply_hook,
    check_context,
    embed,
    forward,
    layers_as_bits,
    prepare,
    run_layers,
)

KINDS = ("steer", "ablate", "cap")
POSITIONS = ("all", "prompt", "response")


@dataclasses.dataclass(frozen=True)
class Grid:
    """The grid: every (vector, layer, coeff) combination.

    ``vectors``: ``[K, D]`` (one direction for every layer) or ``[K, L+1, D]`` (a direction per
    resid point, as persona-vector banks are). ``window``: the intervention acts on resid
    ``layer .. layer+window-1`` (with per-layer vectors, along the direction of ``resid[layer]`` at all of them). ``coeffs`` mean: steer coefficient; cap ceiling (``cap_floor``
    adds a floor); ablate re-add coefficient.
    """

    kind: str
    vectors: np.ndarray
    names: tuple[str, ...]
    layers: tuple[int, ...]
    coeffs: tuple[float, ...]
    positions: str = "all"
    window: int = 1
    unit: bool = False
    cap_floor: float = -np.inf
    baseline_once: bool = False  # steer: coefficient 0 is the same forward at every layer -> one point per vector

    def validate(self, cfg: ModelConfig) -> None:
        if self.kind not in KINDS:
            raise errors.InputError(f"grid kind {self.kind!r}; use one of {KINDS}")
        if self.positions not in POSITIONS:
            raise errors.InputError(f"grid positions {self.positions!r}; use one of {POSITIONS}")
        v = np.asarray(self.vectors)
        if v.ndim not in (2, 3) or v.shape[-1] != cfg.d_model:
            raise errors.InputError(f"vectors have shape {v.shape}; expected [K, {cfg.d_model}] or "
                                    f"[K, {cfg.n_resid}, {cfg.d_model}] for this model")
        if v.ndim == 3 and v.shape[1] != cfg.n_resid:
            raise errors.InputError(f"per-layer vectors have {v.shape[1]} layers; model has {cfg.n_resid} resid points")
        if len(self.names) != v.shape[0]:
            raise errors.InputError(f"{len(self.names)} names for {v.shape[0]} vectors")
        if not np.all(np.isfinite(v)):
            raise errors.InputError("vectors contain NaN or inf")
        if not np.all(np.isfinite(self.coeffs)):
            raise errors.InputError(f"coefficients must be finite, got {self.coeffs}")
        if not self.layers or not self.coeffs:
            raise errors.InputError("the grid needs at least one layer and one coefficient")
        if isinstance(self.names, str) or not all(isinstance(n, str) and n for n in self.names):
            raise errors.InputError(f"grid names must be a sequence of non-empty strings, got {self.names!r}")
        iv.whole_indices(self.layers, "grid layers")
        check_count(self.window, "grid window")
        for what, xs in (("names", self.names), ("layers", self.layers), ("coefficients", self.coeffs)):
            if len(set(xs)) != len(xs):  # duplicate rows that nothing in a row tells apart
                raise errors.InputError(f"grid {what} repeat: {list(xs)}")
        if self.kind != "steer":  # ablate and cap act along v's direction: the rows the grid uses must have one
            rows = v if v.ndim == 2 else v[:, [l for l in self.layers if 0 <= l < v.shape[1]]]
            zero = [n for n, x in zip(self.names, rows) if np.any(np.linalg.norm(x, axis=-1) == 0)]
            if zero:
                raise errors.InputError(f"a {self.kind} grid needs non-zero vectors (a zero vector has no direction): "
                                        f"{zero}")
        if self.kind == "cap" and (np.isnan(self.cap_floor) or self.cap_floor == np.inf
                                   or self.cap_floor > min(self.coeffs)):
            raise errors.InputError(f"cap_floor {self.cap_floor} must be a number (or -inf) at or below every ceiling "
                                    f"(the coefficients, lowest {min(self.coeffs)})")
        bad = [l for l in self.layers if not (0 <= l and l + self.window - 1 <= cfg.n_layers)]
        if bad:
            raise errors.InputError(f"layers {bad} (window {self.window}) fall outside resid[0..{cfg.n_layers}]")

    def points(self) -> list[dict[str, Any]]:
        """Grid coordinates, grouped by layer (the shared-prefix order). With ``baseline_once`` (steer
        only) a zero coefficient appears once per vector, at the lowest layer."""
        once = self.baseline_once and self.kind == "steer"
        low = min(self.layers)
        return [
            {"vector": name, "vector_index": k, "layer": int(l), "coeff": float(c)}
            for l in sorted(self.layers)
            for k, name in enumerate(self.names)
            for c in self.coeffs
            if not (once and c == 0 and l != low)
        ]


def positions_for(kind: str, valid: np.ndarray, resp: np.ndarray) -> iv.Positions:
    """Selector in scoring mode: ``prompt`` = tokens before the response; ``response`` = the last
    prompt token and the response tokens (persona_vectors' convention)."""
    if kind == "all":
        return iv.Positions.all(valid)
    last_prompt = np.roll(resp, -1, axis=1) & ~resp
    if kind == "prompt":
        return iv.Positions.explicit(valid & ~resp, after=False)
    return iv.Positions.explicit(resp | last_prompt, after=True)


def build_hooks(grid: Grid, cfg: ModelConfig, points: list[dict[str, Any]], pos: iv.Positions) -> Any:
    """Stack the interventions of ``points`` into one pytree with a leading grid axis."""
    vecs = np.asarray(grid.vectors, np.float32)
    items: list[iv.Steer | iv.Ablate | iv.Cap] = []
    for pt in points:
        v = vecs[pt["vector_index"]]
        v = v[pt["layer"]] if v.ndim == 2 else v
        layers = iv.layer_weights(cfg.n_resid, range(pt["layer"], pt["layer"] + grid.window))
        c = jnp.float32(pt["coeff"])
        if grid.kind == "steer":
            items.append(iv.Steer(jnp.asarray(v), c, layers, pos, grid.unit))
        elif grid.kind == "ablate":
            items.append(iv.Ablate(jnp.asarray(v), layers, pos, jnp.float32(0.0), c))
        else:
            items.append(iv.Cap(jnp.asarray(v), jnp.float32(grid.cap_floor), c, layers, pos))
    return jax.tree.map(lambda *x: jnp.stack(x), *items)


class Trunk(NamedTuple):
    """The unintervened part of a chunk's forward, below its first intervened resid point ``start``.

    Chunks run in order of start layer, so the trunk of one chunk is carried to the next one's start
    (:func:`trunk_advance`): the blocks below every group's start run once per sweep, not once per chunk."""

    h: jax.Array  # resid[start] [B, T, D]
    buf: jax.Array  # the capture buffer, holding resid[0..start]
    cache: KVCache | None  # with a split prefix: its keys/values plus the suffix's for layers < start
    prefix_valid: jax.Array  # [B, P+T] the cache's valid mask before the suffix was written; [B, 0] without


def _trunk_prep(cfg: ModelConfig, data: dict[str, jax.Array], trunk: Trunk) -> tuple[Any, int]:
    """The suffix's masks / rope / hook context, and where the suffix is written in the cache."""
    if trunk.cache is None:
        return prepare(cfg, data["valid"]), 0
    index = data["prefix_tokens"].shape[1]
    return prepare(cfg, data["valid"], cache=trunk.cache._replace(valid=trunk.prefix_valid), cache_index=index), index


def _trunk_start(params: Params, cfg: ModelConfig, data: dict[str, jax.Array], capture: Capture | None,
                 adapter: Any) -> Trunk:
    tokens = data["tokens"]
    cache, pval = None, jnp.zeros((tokens.shape[0], 0), bool)
    if "prefix_tokens" in data:
        ptok, pval = data["prefix_tokens"], data["prefix_valid"]
        empty = KVCache.empty(cfg, ptok.shape[0], ptok.shape[1] + tokens.shape[1], activation_dtype(params))
        cache = forward(params, cfg, ptok, valid=pval, cache=empty, logits=False, adapter=adapter).kv()
        pval = cache.valid
    record = Recorder.make(cfg, capture, data["resp"])
    h0 = embed(params, cfg, tokens)
    return Trunk(h0, record(record.empty(h0), jnp.int32(0), h0), cache, pval)


def _trunk_advance(params: Params, cfg: ModelConfig, data: dict[str, jax.Array], trunk: Trunk, lo: jax.Array,
                   hi: jax.Array, capture: Capture | None, adapter: Any) -> Trunk:
    prep, index = _trunk_prep(cfg, data, trunk)
    record = Recorder.make(cfg, capture, data["resp"])
    h, buf, cache = run_layers(params, cfg, trunk.h, prep, trunk.buf, record, cache=trunk.cache, cache_index=index,
                               span=(lo, hi), adapter=adapter)
    return Trunk(h, buf, cache, trunk.prefix_valid)


@functools.partial(jax.jit, static_argnames=("cfg", "capture"))
def trunk_start(params: Params, cfg: ModelConfig, data: dict[str, jax.Array], *, capture: Capture | None,
                adapter: Any = None) -> Trunk:
    """The trunk at resid[0] (embeddings; the split prefix, if any, prefilled)."""
    return _trunk_start(params, cfg, data, capture, adapter)


@functools.partial(jax.jit, static_argnames=("cfg", "capture"))
def trunk_advance(params: Params, cfg: ModelConfig, data: dict[str, jax.Array], trunk: Trunk, lo: jax.Array,
                  hi: jax.Array, *, capture: Capture | None, adapter: Any = None) -> Trunk:
    """Carry ``trunk`` from resid[lo] to resid[hi] (blocks ``lo .. hi-1``, unintervened; one compile for all)."""
    return _trunk_advance(params, cfg, data, trunk, lo, hi, capture, adapter)


@functools.partial(jax.jit, static_argnames=("cfg", "capture"))
def score_chunk(
    params: Params,
    cfg: ModelConfig,
    data: dict[str, jax.Array],
    hooks: Any,
    start: jax.Array,
    units: jax.Array,
    *,
    capture: Capture | None,
    adapter: Any = None,
    trunk: Trunk | None = None,
) -> dict[str, jax.Array]:
    """Score a chunk of grid points ``hooks`` (leading axis G) that are all off below resid ``start``.

    With ``data["prefix_tokens"]`` (:func:`encode_split`), that prefix — the prompt before the first
    intervened token — runs once, unintervened, into a KV cache, and only the suffix (last prompt
    token + response) runs per grid point: exact for interventions that never touch the prefix.
    ``trunk``: the unintervened forward up to resid[start] (:func:`trunk_advance`), e.g. carried over from
    the previous chunk; without it the trunk is computed here from the embeddings.

    Returns ``logprob [G, B]`` (mean log-prob of the target response tokens) and, with a capture,
    ``proj [G, n_layers, B, P]``: mean over response tokens of ``<resid[l], units[p]>``. ``adapter``: a LoRA
    :class:`~jaxpersona.model.lora.Adapter` beside ``params`` (prefix and suffix alike).
    """
    if trunk is None:
        trunk = _trunk_advance(params, cfg, data, _trunk_start(params, cfg, data, capture, adapter), jnp.int32(0),
                               start, capture, adapter)
    prep, index = _trunk_prep(cfg, data, trunk)
    record = Recorder.make(cfg, capture, data["resp"])

    def one(hook: Any) -> dict[str, jax.Array]:
        h = apply_hook(hook, start, trunk.h, prep.ctx)
        b = record(trunk.buf, start, h)
        h, b, _ = run_layers(params, cfg, h, prep, b, record, hook=hook, cache=trunk.cache, cache_index=index,
                             span=(start, jnp.int32(cfg.n_layers)), adapter=adapter, read_only=True)
        out = {"logprob": target_logprob(params, cfg, h, data)}
        if capture is not None:
            out["proj"] = jnp.einsum("nbd,pd->nbp", b.astype(jnp.float32), units)
        return out

    return jax.vmap(one)(hooks)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id", "shared_prefix"))
def generate_chunk(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array, hooks: Any,
                   start: jax.Array | None = None, *, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                   shared_prefix: bool = False, adapter: Any = None) -> Any:
    """Greedy generation for every grid point of ``hooks`` (leading axis G): tokens ``[G, B, N]``.

    ``shared_prefix``: the hooks never touch the prompt before its last token (``response``
    positions), so that prefix is prefilled once for all grid points. Otherwise, with ``start``: every hook is
    off below ``resid[start]``, so the prompt's prefill below it runs once for all grid points
    (:func:`~jaxpersona.compute.generate.prefill_trunk`). ``adapter``: a LoRA adapter beside ``params``."""
    cache, trunk = None, None
    if shared_prefix:  # the prefix's keys/values are read by every grid point, not copied into each one's cache
        b, t = tokens.shape
        dtype = activation_dtype(params)
        pre = forward(params, cfg, tokens[:, :-1], valid=valid[:, :-1], cache=KVCache.empty(cfg, b, t - 1, dtype),
                      logits=False, adapter=adapter).kv()
        cache = KVCache.empty(cfg, b, 1 + max_new_tokens, dtype)._replace(prefix=KVPrefix(pre.k, pre.v, pre.valid))
    elif start is not None:
        trunk = prefill_trunk(params, cfg, tokens, valid, start, max_new_tokens=max_new_tokens, adapter=adapter)

    def one(hook: Any) -> Any:
        return generate_loop(params, cfg, tokens, valid, jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0), hook,
                             max_new_tokens=max_new_tokens, greedy=True, eos_ids=eos_ids, pad_id=pad_id,
                             prefix_cache=cache, trunk=trunk, adapter=adapter,
                             early_exit=False, logprobs=False)

    return jax.vmap(one)(hooks)


class PromptsTrunk(NamedTuple):
    """The unintervened forward below resid[start] of a set laid out as distinct prompts and per-row suffixes
    (:func:`~jaxpersona.compute.scoring.encode_shared`), carried from chunk to chunk as :class:`Trunk` is."""

    ph: jax.Array  # [Q, P, D] the prompts (minus their last token) at resid[start]
    cache: KVCache  # [L, Q, KV, P, hd] the prompts' keys/values of layers < start; ``valid`` the prompts'
    h: jax.Array  # [B, S, D] the suffixes (last prompt token + response) at resid[start]


def _everywhere(hook: Any, rows: int) -> Any:
    """``hook`` acting on every valid token of a ``rows``-row batch (``all`` positions, any layout)."""
    return dataclasses.replace(hook, positions=iv.Positions.all(jnp.ones((rows, 1), bool)))


def _prompts_pass(params: Params, cfg: ModelConfig, data: dict[str, jax.Array], ph: jax.Array, cache: KVCache,
                  h: jax.Array, lo: jax.Array, hi: jax.Array, hook: Any, adapter: Any) -> PromptsTrunk:
    """Blocks ``lo .. hi-1`` of the prompts (writing their keys/values into ``cache``), then of the suffixes, each
    row reading its prompt's keys/values; ``hook`` (on every token, applied at ``resid[lo]`` first) or none."""
    q, b = data["prompt_tokens"].shape[0], data["tokens"].shape[0]
    pprep = prepare(cfg, data["prompt_valid"], cache=cache._replace(valid=jnp.zeros_like(cache.valid)), cache_index=0)
    hp = None if hook is None else _everywhere(hook, q)
    none = jnp.zeros((0,), ph.dtype)
    ph, _, written = run_layers(params, cfg, apply_hook(hp, lo, ph, pprep.ctx), pprep, none,
                                Recorder.make(cfg, None, data["prompt_valid"]), hook=hp, cache=cache, cache_index=0,
                                span=(lo, hi), adapter=adapter)
    assert written is not None
    p, s = data["prompt_tokens"].shape[1], data["tokens"].shape[1]
    rows = gather_prefix(written, data["pick"], s)
    sprep = prepare(cfg, data["valid"], cache=rows, cache_index=p)
    hs = None if hook is None else _everywhere(hook, b)
    h, _, _ = run_layers(params, cfg, apply_hook(hs, lo, h, sprep.ctx), sprep, none,
                         Recorder.make(cfg, None, data["valid"]), hook=hs, cache=rows, cache_index=p, span=(lo, hi),
                         adapter=adapter, read_only=True)
    return PromptsTrunk(ph, written, h)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prompts_trunk(params: Params, cfg: ModelConfig, data: dict[str, jax.Array], lo: jax.Array, hi: jax.Array,
                  trunk: PromptsTrunk | None = None, *, adapter: Any = None) -> PromptsTrunk:
    """Carry ``trunk`` (default: the embeddings, ``lo`` = 0) from resid[lo] to resid[hi], unintervened."""
    if trunk is None:
        q, p = data["prompt_tokens"].shape
        empty = KVCache.empty(cfg, q, p, activation_dtype(params))
        trunk = PromptsTrunk(embed(params, cfg, data["prompt_tokens"]), empty._replace(valid=data["prompt_valid"]),
                             embed(params, cfg, data["tokens"]))
    return _prompts_pass(params, cfg, data, trunk.ph, trunk.cache, trunk.h, lo, hi, None, adapter)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id"))
def score_prompts_chunk(params: Params, cfg: ModelConfig, data: dict[str, jax.Array], hooks: Any, start: jax.Array,
                        trunk: PromptsTrunk, *, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                        adapter: Any = None) -> dict[str, Any]:
    """A chunk of grid points ``hooks`` (leading axis G; off below resid ``start``, on every token above) over a set
    laid out by :func:`~jaxpersona.compute.scoring.encode_shared`: per point, each distinct prompt runs once from
    ``start`` (not once per row that shares it), its rows' suffixes read its keys/values, and the greedy
    generation (``max_new_tokens`` > 0) continues from the same prompt cache.

    Returns ``logprob [G, B]`` and, with generation, ``gen``: a ``GenerateOutput`` of ``[G, Q, N]``."""
    n = jnp.int32(cfg.n_layers)
    q = data["prompt_tokens"].shape[0]

    def one(hook: Any) -> dict[str, Any]:
        got = _prompts_pass(params, cfg, data, trunk.ph, trunk.cache, trunk.h, start, n, hook, adapter)
        out: dict[str, Any] = {"logprob": target_logprob(params, cfg, got.h, data)}
        if max_new_tokens:
            own = KVCache.empty(cfg, q, 1 + max_new_tokens, activation_dtype(params))
            cache = own._replace(prefix=KVPrefix(got.cache.k, got.cache.v, got.cache.valid))
            tokens = jnp.concatenate([data["prompt_tokens"], data["last_tokens"][:, None]], axis=1)
            valid = jnp.concatenate([data["prompt_valid"], jnp.ones((q, 1), bool)], axis=1)
            out["gen"] = generate_loop(params, cfg, tokens, valid, jax.random.key(0), jnp.float32(0.0),
                                       jnp.float32(1.0), _everywhere(hook, q), max_new_tokens=max_new_tokens,
                                       greedy=True, eos_ids=eos_ids, pad_id=pad_id, prefix_cache=cache,
                                       adapter=adapter, early_exit=False, logprobs=False)
        return out

    return jax.vmap(one)(hooks)


def point_bytes(cfg: ModelConfig, batch: int, seq: int, n_targets: int, itemsize: int = 4) -> int:
    """Rough peak bytes one grid point needs (activations, attention scores, target logits)."""
    act = batch * seq * (6 * cfg.d_model + 3 * cfg.d_ff + cfg.n_heads * cfg.head_dim * 3)
    attn = 2 * batch * cfg.n_heads * seq * seq
    logits = 3 * batch * n_targets * cfg.vocab_size
    return int((act + attn + logits) * itemsize)


def available_bytes() -> int:
    """Free memory of the default device (host RAM on CPU), for the default budget."""
    dev = jax.local_devices()[0]  # this process's own (jax.devices()[0] may be another host's)
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def chunk_size(grid_size: int, per_point: int, budget: int | None, chunking: bool, n_devices: int = 1) -> int:
    budget = int(0.5 * available_bytes()) if budget is None else int(budget)
    fit = max(1, budget // max(per_point, 1))
    if not chunking and grid_size > fit:
        raise errors.InputError(
            f"the grid ({grid_size} points x ~{per_point / 2**20:.0f} MiB each) does not fit the memory budget "
            f"of {budget / 2**20:.0f} MiB with chunking disabled; enable chunking or raise the budget"
        )
    size = min(grid_size, fit)
    return max(n_devices, -(-size // n_devices) * n_devices) if n_devices > 1 else size


def data_mesh(n_devices: int | None = None) -> Any:
    """A 1-D ``("data",)`` mesh over the first ``n_devices`` devices (all by default).

    Multi-host (TPU pods, several GPU hosts): call ``jax.distributed.initialize()`` on every host
    first; ``jax.devices()`` then spans all hosts and the same sweep code runs unchanged.
    """
    from jax.sharding import AxisType

    n = n_devices or jax.device_count()
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def _shard(tree: Any, mesh: Any, spec: Any) -> Any:
    from jax.sharding import NamedSharding

    return jax.device_put(tree, NamedSharding(mesh, spec))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What every chunk of one sweep shares (built once by :func:`run_sweep`)."""

    model: Model
    grid: Grid
    sets: list[ScoringSet]
    params: Params
    adapter: Adapter | AdapterStack | None
    data: list[Any]  # per set: its encoded rows, on device (sharded with a mesh)
    pos: list[iv.Positions]  # per set: where the interventions act when scoring
    units: np.ndarray  # [P, D] unit projection vectors (one zero row when none)
    names: tuple[str, ...]  # the projection vectors' names
    capture: Capture | None
    csize: int  # the most grid points in one chunk
    mesh: Any
    split: bool  # shared unintervened prefix (``response`` positions)
    prompts: bool  # distinct prompts run once per point, then each row's suffix (``all`` positions, no capture)
    generate_tokens: int
    gens: list[tuple[Batch, list[int]]]  # per set: (batch of unique prompts, row -> unique index)
    gen_pos: list[iv.Positions]  # per set: where the interventions act when generating


def _scoring_sets(grid: Grid, data: ScoringSet | Sequence[ScoringSet]) -> tuple[list[ScoringSet], bool]:
    """``(sets, paired)``: one set for every grid vector, or one set per vector (``paired``)."""
    if isinstance(data, ScoringSet):
        sets, paired = [data], False
    else:
        sets, paired = list(data), True
        if len(sets) != len(grid.names):
            raise errors.InputError(f"{len(sets)} scoring sets for {len(grid.names)} grid vectors; give one set per "
                                    "vector, or one set for all")
    for d in sets:
        check_pairs(len(d.prompts), len(d.responses))
    return sets, paired


def _encode_sets(model: Model, grid: Grid, sets: list[ScoringSet], split: bool, prompts: bool = False
                 ) -> tuple[list[dict[str, np.ndarray]], list[iv.Positions], int, int]:
    """Every set encoded to one shape: ``(encoded rows per set, positions per set, width, r_width)``. ``split``:
    the :func:`encode_split` layout; ``prompts``: :func:`encode_shared` (``width`` the prompts', ``r_width``
    the suffixes')."""
    cfg = model.cfg
    rows_n = max(len(d.prompts) for d in sets)
    if prompts:
        dims = [shared_shape(model, d.conversations(), d.responses) for d in sets]
        q_rows, p_width, s_width = (max(x[i] for x in dims) for i in range(3))
        encs = [encode_shared(model, d.conversations(), d.responses, rows=rows_n, q_rows=q_rows, p_width=p_width,
                              s_width=s_width) for d in sets]
        for e in encs:
            check_context(cfg, np.concatenate([e["prompt_valid"][e["pick"]], e["valid"]], axis=1))
        return encs, [iv.Positions.all(e["valid"]) for e in encs], p_width, s_width
    shape_of = split_shape if split else target_shape
    shapes = [shape_of(model, d.conversations(), d.responses) for d in sets]
    width, r_width = max(w for w, _ in shapes), max(r for _, r in shapes)
    if split:
        encs = [encode_split(model, d.conversations(), d.responses, rows=rows_n, p_width=width, s_width=r_width)
                for d in sets]
        for e in encs:
            check_context(cfg, np.concatenate([e["prefix_valid"], e["valid"]], axis=1))
        pos = [iv.Positions.explicit(e.pop("select"), after=False) for e in encs]
    else:
        encs = [encode_scoring(model, d, rows=rows_n, width=width, r_width=r_width) for d in sets]
        for e in encs:
            model.check_length(Batch(e["tokens"], e["valid"]))
        pos = [positions_for(grid.positions, e["valid"], e["resp"]) for e in encs]
    return encs, pos, width, r_width


def _projections(cfg: ModelConfig, project: dict[str, np.ndarray] | None, project_layers: Sequence[int]
                 ) -> tuple[tuple[str, ...], np.ndarray, Capture | None]:
    """``(names, units [max(P, 1), D] float32, capture)`` of the projection vectors (validated)."""
    project = project or {}
    names = tuple(project)
    units = np.zeros((max(len(names), 1), cfg.d_model), np.float32)
    for i, n in enumerate(names):
        v = np.asarray(project[n], np.float32)
        if v.shape != (cfg.d_model,) or not np.all(np.isfinite(v)) or not np.any(v):
            raise errors.InputError(f"projection vector {n!r} must be a finite nonzero [{cfg.d_model}] vector")
        units[i] = v / np.linalg.norm(v)
    if bool(names) != bool(len(project_layers)):  # one without the other would silently give no projection columns
        raise errors.InputError("projections need both `project` (vectors) and `project_layers` (resid points), "
                                f"got {len(names)} vector(s) and layers {list(project_layers)}")
    layers = tuple(int(l) for l in iv.whole_indices(project_layers, "project_layers")) if names else ()
    capture = Capture(layers, "mean") if names else None
    if capture is not None:
        capture.validate(cfg)
    return names, units, capture


def _generation_inputs(model: Model, grid: Grid, sets: list[ScoringSet], generate_tokens: int
                       ) -> tuple[list[tuple[Batch, list[int]]], list[iv.Positions]]:
    """Per set: (batch of its unique prompts, padded to one shape; row -> unique index), and the positions
    the interventions act on when generating. Empty without ``generate_tokens``."""
    if not generate_tokens:
        return [], []
    gens: list[tuple[Batch, list[int]]] = []
    uniq = [list(dict.fromkeys(d.prompts)) for d in sets]
    ids = [model.chat_ids(ScoringSet(tuple(u), tuple(u), d.system).conversations()) for u, d in zip(uniq, sets)]
    g_rows = max(len(u) for u in uniq)
    g_width = round_up(max(len(x) for i in ids for x in i), BUCKET)
    for u, i, d in zip(uniq, ids, sets):
        batch = pad_left(i + [i[-1]] * (g_rows - len(i)), model.pad_id, bucket=g_width)
        model.check_length(batch, generate_tokens)
        gens.append((batch, [u.index(p) for p in d.prompts]))
    make_pos = {"all": iv.Positions.all, "prompt": iv.Positions.prompt, "response": iv.Positions.response}
    return gens, [make_pos[grid.positions](g.valid) for g, _ in gens]


def _chunks(points: list[dict[str, Any]], n_sets: int, paired: bool, size: int, n_dev: int
            ) -> tuple[list[tuple[int, list[dict[str, Any]], int]], int]:
    """``(chunks, csize)``: (set, grid points, padded size) chunks that never straddle a shared-prefix group
    (one start layer) or a scoring set. A group that fits in ``csize`` points is one chunk padded only to its
    own size (rounded up to the devices); a larger one is cut into chunks padded to ``csize``. So a grid
    compiles once per distinct group size (two for the usual grid, whose lowest layer also holds the
    coefficient-0 point) and computes no padding points beyond the devices' rounding."""
    groups = []
    for layer in sorted(set(p["layer"] for p in points)):
        for si in range(n_sets):
            g = [p for p in points if p["layer"] == layer and (not paired or p["vector_index"] == si)]
            if g:
                groups.append((si, g))
    csize = min(size, -(-max(len(g) for _, g in groups) // n_dev) * n_dev)
    chunks = []
    for si, g in groups:
        width = csize if len(g) > csize else min(csize, -(-len(g) // n_dev) * n_dev)
        chunks += [(si, g[i : i + csize], width) for i in range(0, len(g), csize)]
    return chunks, csize


GEN_ROWS = 192  # rows (grid points x prompts) per batched greedy generation; decode steps are memory-bound on
# small batches, so the points of several chunks generate together (at any layer: generation runs the full depth)
SHARED_GEN_ROWS = 512  # the same with a shared prompt prefix (`response` positions): a point's decode then reads
# only its own new tokens' keys, so wider batches keep paying (SmolLM2, 20 prompts x 24 tokens, per point:
# 6 points a call 480 ms, 21 points 323 ms in mixed precision; float32 967 -> 682 ms)


def _generation_group(chunks: list[tuple[int, list[dict[str, Any]], int]], csize: int, n_prompts: int, split: bool,
                      n_dev: int, point_bytes: int, budget: int | None) -> int:
    """Grid points per batched greedy generation (whole chunks of one set, padded to this size: one compile)."""
    group = csize * max(1, GEN_ROWS // max(1, csize * n_prompts))
    if not split:
        return group
    per_set = max(sum(len(c) for s, c, _ in chunks if s == si) for si in {s for s, _, _ in chunks})
    fit = max(1, (int(0.5 * available_bytes()) if budget is None else int(budget)) // max(point_bytes, 1))
    wide = min(per_set, max(csize, SHARED_GEN_ROWS // max(1, n_prompts)), max(csize, fit))
    return -(-max(min(group, per_set), wide) // n_dev) * n_dev  # the grid axis is sharded over the devices


def _generate_texts(plan: _Plan, si: int, points: list[dict[str, Any]], size: int) -> list[list[str]]:
    """Greedy replies under each of ``points`` (all scored on set ``si``), padded to ``size`` points (a fixed
    shape: one compile): per point, the reply to each row's prompt of the set."""
    grid, cfg, model = plan.grid, plan.model.cfg, plan.model
    padded = points + [points[-1]] * (size - len(points))
    hooks = build_hooks(grid, cfg, padded, plan.gen_pos[si])
    if plan.mesh is not None:
        hooks = _shard(hooks, plan.mesh, P("data"))
    gb, gmap = plan.gens[si]
    start = None if plan.split else jnp.int32(min(p["layer"] for p in points))  # every hook is off below it
    gen = to_host(generate_chunk(plan.params, cfg, jnp.asarray(gb.tokens), jnp.asarray(gb.valid), hooks, start,
                                 max_new_tokens=int(plan.generate_tokens), eos_ids=model.eos_ids,
                                 pad_id=model.pad_id, shared_prefix=plan.split, adapter=plan.adapter))
    decoded = [model.decode(jax.tree.map(lambda x, g=g: x[g], gen)) for g in range(len(points))]
    return [[tx[j] for j in gmap] for tx in decoded]


def _chunk_rows(plan: _Plan, si: int, chunk: list[dict[str, Any]], width: int, trunks: dict[int, tuple[int, Any]],
                texts: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """Score one chunk of grid points on set ``si``, padded to ``width`` points (a fixed shape per group size,
    see :func:`_chunks`): one row per (grid point, prompt). ``trunks``: per set,
    the last trunk and its layer; advanced here to this chunk's start layer. ``texts``: per point, its
    generations (:func:`_generate_texts`), added to the rows; with ``plan.prompts`` they are made here, from the
    prompts' cache the scoring computed."""
    grid, cfg, params, adapter, model = plan.grid, plan.model.cfg, plan.params, plan.adapter, plan.model
    padded = chunk + [chunk[-1]] * (width - len(chunk))
    hooks = build_hooks(grid, cfg, padded, plan.pos[si])
    if plan.mesh is not None:
        hooks = _shard(hooks, plan.mesh, P("data"))
    start = chunk[0]["layer"]
    lo, trunk = trunks.get(si, (0, None))
    if plan.prompts:
        if trunk is None or lo > start:
            lo, trunk = 0, None
        if trunk is None or start > lo:
            trunk = prompts_trunk(params, cfg, plan.data[si], jnp.int32(lo), jnp.int32(start), trunk, adapter=adapter)
        trunks[si] = (start, trunk)
        res = to_host(score_prompts_chunk(params, cfg, plan.data[si], hooks, jnp.int32(start), trunk,
                                          max_new_tokens=int(plan.generate_tokens), eos_ids=model.eos_ids,
                                          pad_id=model.pad_id, adapter=adapter))
        if plan.generate_tokens:
            pick = np.asarray(plan.data[si]["pick"])
            decoded = [model.decode(jax.tree.map(lambda x, g=g: x[g], res["gen"])) for g in range(len(chunk))]
            texts = [[tx[pick[i]] for i in range(len(plan.sets[si].prompts))] for tx in decoded]
    else:
        if trunk is None or lo > start:
            lo, trunk = 0, trunk_start(params, cfg, plan.data[si], capture=plan.capture, adapter=adapter)
        if start > lo:
            trunk = trunk_advance(params, cfg, plan.data[si], trunk, jnp.int32(lo), jnp.int32(start),
                                  capture=plan.capture, adapter=adapter)
        trunks[si] = (start, trunk)
        res = to_host(score_chunk(params, cfg, plan.data[si], hooks, jnp.int32(start), jnp.asarray(plan.units),
                                  capture=plan.capture, adapter=adapter, trunk=trunk))
    done = []
    for g, pt in enumerate(chunk):
        for i in range(len(plan.sets[si].prompts)):
            row = {"kind": grid.kind, "vector": pt["vector"], "layer": pt["layer"], "coeff": pt["coeff"],
                   "prompt": i, "logprob": float(res["logprob"][g, i])}
            if texts is not None:
                row["text"] = texts[g][i]
            if plan.capture is not None:
                for li, l in enumerate(plan.capture.layers):
                    for pi, n in enumerate(plan.names):
                        row[f"proj/{n}@{l}"] = float(res["proj"][g, li, i, pi])
            done.append(row)
    return done


def run_sweep(
    model: Model,
    grid: Grid,
    data: ScoringSet | Sequence[ScoringSet],
    *,
    project: dict[str, np.ndarray] | None = None,
    project_layers: Sequence[int] = (),
    budget_bytes: int | None = None,
    chunking: bool = True,
    out_dir: str | Path | None = None,
    mesh: Any = None,
    progress: bool = True,
    generate_tokens: int = 0,
) -> list[dict[str, Any]]:
    """Evaluate every grid point on every prompt; returns one row per (grid point, prompt).

    ``data``: one :class:`ScoringSet` scored under every grid point, or one set per grid vector
    (``len(data) == len(grid.names)``): vector ``k`` is scored on set ``k`` only (e.g. each trait's
    vector on its own evaluation answers) — all sets padded to one shape, so the whole grid is one
    compile. Row fields: ``kind, vector, layer, coeff, prompt, logprob`` (``prompt`` indexes the
    row's set) and, for each ``project`` vector ``name`` and ``l`` in ``project_layers``,
    ``proj/{name}@{l}`` (mean over response tokens of the projection onto the unit vector). With
    ``generate_tokens > 0`` each row also gets ``text``: the greedy reply to the prompt alone under
    that intervention (positions: ``all`` = every token, ``prompt`` = prefill only, ``response`` =
    last prompt token + generated tokens; a prompt repeated in a set is generated once). With
    ``out_dir``, rows stream into ``results.jsonl`` and a rerun resumes after the last finished chunk.
    """
    cfg = model.cfg
    grid.validate(cfg)
    check_count(generate_tokens, "generate_tokens", least=0)
    if budget_bytes is not None and not budget_bytes > 0:
        raise errors.InputError(f"budget_bytes must be positive (or None: half the free memory), got {budget_bytes!r}")
    sets, paired = _scoring_sets(grid, data)
    names, units, capture = _projections(cfg, project, project_layers)
    # response positions never touch the prompt before its last token: that prefix runs once per chunk; with all
    # positions each distinct prompt runs once per grid point (not once per row), and generations continue from it
    split = grid.positions == "response"
    prompts = grid.positions == "all" and capture is None
    encs, pos, width, r_width = _encode_sets(model, grid, sets, split, prompts)

    points = grid.points()
    b, t = encs[0]["tokens"].shape
    n_dev = mesh.shape["data"] if mesh is not None else 1
    seq, targets = t + (width if split else 0), r_width
    if prompts:  # the flat layout's estimate: a sweep is chunked (and its chunks keyed) as before the layout
        seq, targets = (max(x) for x in zip(*(target_shape(model, d.conversations(), d.responses) for d in sets)))
    size = chunk_size(len(points), point_bytes(cfg, b, seq, targets), budget_bytes, chunking, n_dev)
    gens, gen_pos = _generation_inputs(model, grid, sets, generate_tokens)
    chunks, csize = _chunks(points, len(sets), paired, size, n_dev)

    store = _Store(Path(out_dir), model_fingerprint(model)) if out_dir is not None else None
    params: Params = model.params
    adapter: Adapter | AdapterStack | None = model.adapter
    if mesh is not None and "model" in mesh.axis_names:  # 2-D (data, model): tensor-parallel weights
        params, adapter = shard_params(params, cfg, mesh), shard_adapter(adapter, cfg, mesh)
    elif mesh is not None:
        params, adapter = _shard((params, adapter), mesh, P())
    params = layers_as_bits(params)  # mixed precision on a CPU: bitcast once, not in every jitted call
    rows: list[dict[str, Any]] = []
    bar = progress_bar(len(chunks), "sweep chunks", progress)
    data_js = [{k: jnp.asarray(v) for k, v in e.items()} for e in encs]  # on device once per set
    if mesh is not None:
        data_js = [_shard(d, mesh, P()) for d in data_js]
    plan = _Plan(model, grid, sets, params, adapter, data_js, pos, units, names, capture, csize, mesh, split,
                 prompts, generate_tokens, gens, gen_pos)
    trunks: dict[int, tuple[int, Any]] = {}  # per set: the unintervened trunk, carried from chunk to chunk
    keys = [_chunk_key(grid, sets[si], chunk, names, project_layers, generate_tokens) for si, chunk, _ in chunks]
    loaded = [store.load(k) if store else None for k in keys]
    texts: dict[int, list[str]] = {}  # id(point) -> its generations, made a group of chunks at a time
    n_prompts = len(gens[0][0].tokens) if gens else 1
    row_bytes = kv_bytes(cfg, 1, 1 + generate_tokens, 1, 1, 4) + 3 * cfg.vocab_size * 4  # own cache + logits
    group = _generation_group(chunks, csize, n_prompts, split, n_dev, n_prompts * row_bytes, budget_bytes)
    for n, ((si, chunk, width), key) in enumerate(zip(chunks, keys)):
        done = loaded[n]
        if done is None:
            if generate_tokens and not prompts and id(chunk[0]) not in texts:  # this and the next pending chunks
                todo: list[dict[str, Any]] = []
                for m in range(n, len(chunks)):  # whole chunks, up to `group` points
                    if loaded[m] is None and chunks[m][0] == si and len(todo) + len(chunks[m][1]) <= group:
                        todo += chunks[m][1]
                texts.update(zip(map(id, todo), _generate_texts(plan, si, todo, group)))
            done = _chunk_rows(plan, si, chunk, width, trunks, [texts.pop(id(p)) for p in chunk]
                               if generate_tokens and not prompts else None)
            if store:
                store.save(key, done)
        rows += done
        bar.update(1)
    bar.close()
    return rows


def _chunk_key(grid: Grid, data: ScoringSet, chunk: list[dict[str, Any]], names: tuple, layers: Sequence[int],
               generate_tokens: int = 0) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(grid.vectors, np.float32).tobytes())
    meta = [grid.kind, grid.positions, grid.window, grid.unit, grid.cap_floor, list(data.prompts),
            list(data.responses), data.system, list(names), list(layers), chunk, generate_tokens]
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class _Store:
    """Append-only results: ``results.jsonl`` rows + ``progress.json`` finished chunk keys (atomic).

    A chunk counts as finished only once ``progress.json`` (replaced atomically after its rows are
    flushed) lists it. Files that cannot be read back (cut short, corrupt: a torn line, an unreadable
    ``progress.json``, a finished chunk whose rows are missing) are not trusted: the chunks they lack are
    recomputed, with one :class:`~jaxpersona.errors.CacheWarning` per store.

    ``model``: the identity of the model the rows come from (:func:`~jaxpersona.compute.handle.model_fingerprint`),
    kept in ``model.json``: a store written by another model (or the same one under another adapter) raises
    :class:`~jaxpersona.errors.ResumeMismatchError` instead of serving its rows. A store from before 0.7.10 has no
    ``model.json``; it is adopted as it is."""

    def __init__(self, root: Path, model: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.progress = root / "progress.json"
        self.results = root / "results.jsonl"
        self._warned = False
        self._check_model(root / "model.json", model)
        self.done: dict[str, int] = self._read_progress()
        self._rows: dict[str, list[dict[str, Any]]] | None = None

    @staticmethod
    def _check_model(path: Path, model: str) -> None:
        try:
            had = json.loads(path.read_text()).get("model") if path.exists() else None
        except (OSError, ValueError, AttributeError):
            had = None  # unreadable: rewritten below
        if had is not None and had != model:
            raise errors.ResumeMismatchError(
                f"{path.parent} holds sweep rows of another model (or adapter): its rows would be served as this "
                "model's. Use another out_dir, or delete that one to recompute.")
        if had is None:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"model": model}), encoding="utf-8"))

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"{what}; the sweep chunks it lacks are recomputed", errors.CacheWarning, stacklevel=4)

    def _read_progress(self) -> dict[str, int]:
        if not self.progress.exists():
            return {}
        try:
            got = json.loads(self.progress.read_text())
            if not isinstance(got, dict) or not all(isinstance(v, int) for v in got.values()):
                raise ValueError("not a map of chunk keys to row counts")
        except (OSError, ValueError) as e:
            self._warn(f"{self.progress} could not be read ({type(e).__name__}: {e})")
            return {}
        return got

    def _read_rows(self) -> dict[str, list[dict[str, Any]]]:
        """The rows by chunk key; unreadable lines are dropped from the file (rewritten atomically), so the
        next open finds it clean."""
        rows: dict[str, list[dict[str, Any]]] = {}
        bad, good = 0, []
        if self.results.exists():
            with open(self.results, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        bad += 1  # a torn line (killed mid-write, or the file cut short)
                        continue
                    if not isinstance(r, dict) or "_chunk" not in r:
                        bad += 1
                        continue
                    good.append(line if line.endswith("\n") else line + "\n")
                    rows.setdefault(r.pop("_chunk"), []).append(r)
        if bad:
            text = "".join(good)
            atomic_write(self.results, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self._warn(f"{self.results}: {bad} unreadable line(s) dropped")
        return rows

    def load(self, key: str) -> list[dict[str, Any]] | None:
        if key not in self.done:
            return None
        if self._rows is None:
            self._rows = self._read_rows()
        # a chunk interrupted between its rows and progress.json may have left rows: keep the last write
        rows, n = self._rows.get(key, []), self.done[key]
        if len(rows) < n:
            self._warn(f"{self.results} lacks rows of finished chunks")
            return None
        return rows[len(rows) - n:]

    def _torn(self) -> bool:
        if not (self.results.exists() and self.results.stat().st_size):
            return False
        with open(self.results, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def save(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self._rows is None and self._torn():  # a torn last line (killed mid-write): drop it first
            self._rows = self._read_rows()
        torn = self._torn()
        with open(self.results, "a") as f:
            if torn:  # end a torn last line so this chunk's rows start on their own
                f.write("\n")
            for r in rows:
                f.write(json.dumps({**r, "_chunk": key}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = len(rows)
        tmp = self.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done))
        os.replace(tmp, self.progress)


def as_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> a column table (dict of numpy arrays), e.g. for ``pandas.DataFrame(as_columns(rows))``."""
    keys = list(rows[0]) if rows else []
    return {k: np.asarray([r.get(k) for r in rows]) for k in keys}
