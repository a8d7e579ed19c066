"""Persona drift over multi-turn conversations, with capping and KV-cache edits batched as variants.

:func:`run_drift` plays conversation scripts turn by turn: the model answers every user turn, the KV
cache is carried from turn to turn (only the new chunk of each turn is prefilled), and the
projection of every token on the monitored directions is recorded as it is computed. Four variants
run as one ``vmap``-ed computation per turn (their histories diverge as their answers differ):

* ``unsteered``      — no intervention;
* ``capped``         — the capping config on every token (prompt and answers);
* ``capped_assistant`` — the same caps on the assistant's tokens only (user tokens untouched);
* ``kv_edit``        — no intervention while talking; before the last turn (the identity probe, or the
  script's own last turn without one) the
  cached keys/values of every past assistant token are recomputed with a steer toward the Assistant
  end (``coeff * |resid[l]| * axis_unit[l]`` at the edit layers), then the conversation continues.

Cache bookkeeping: the cache has one write pointer for the whole batch; each turn's chunk is the
re-rendered conversation's tokens after the longest prefix already cached (a re-tokenized answer
that differs from the generated ids invalidates just those slots), left-padded. Invalid slots are
masked out of attention and rope positions count valid tokens only, so gaps are harmless.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.generate import continue_turn
from jaxpersona.compute.handle import Model
from jaxpersona.edit import interventions as iv
from jaxpersona.model.params import activation_dtype
from jaxpersona.model.transformer import KVCache, forward

VARIANTS = ("unsteered", "capped", "capped_assistant", "kv_edit")
PROBE = "Who are you?"


@dataclasses.dataclass(frozen=True)
class DriftSpec:
    """What to monitor and how to intervene. ``units [n, D]`` are the directions recorded at resid
    points ``monitor``; ``cap`` a :class:`~jaxpersona.edit.capping.CapConfig`; the KV edit adds
    ``edit_coeff * edit_vectors[l]`` (``[L+1, D]``) at ``edit_layers``."""

    monitor: tuple[int, ...]
    units: np.ndarray
    cap: Any
    edit_vectors: np.ndarray
    edit_layers: tuple[int, ...]
    edit_coeff: float = 0.5
    max_new_tokens: int = 48
    probe: str | None = PROBE


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id", "monitor"))
def _turn(params, cfg, cache, tokens, valid, write_at, hooks, units, adapter=None, *, max_new_tokens, eos_ids, pad_id,
          monitor):
    """One turn for every variant: ``vmap`` of :func:`continue_turn` over (cache, tokens, valid, hook); ``adapter``:
    the model's LoRA adapter (or ``None``), shared by every variant."""
    def one(c, t, v, h):
        return continue_turn(params, cfg, c, t, v, write_at, jax.random.key(0), jnp.float32(0), jnp.float32(1), h,
                             units, max_new_tokens=max_new_tokens, greedy=True, eos_ids=eos_ids, pad_id=pad_id,
                             monitor=monitor, adapter=adapter)

    return jax.vmap(one)(cache, tokens, valid, hooks)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _refill(params, cfg, tokens, valid, hook, size, adapter=None):
    """Recompute a cache for ``tokens [B, T]`` (history) under ``hook``: the KV-cache edit."""
    b, t = tokens.shape
    cache = KVCache.empty(cfg, b, size.shape[0], activation_dtype(params))
    return forward(params, cfg, tokens, valid=valid, cache=cache, cache_index=0, hook=hook, logits=False,
                   adapter=adapter).cache


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(model: Model, conv: list[dict[str, str]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Token ids of the conversation (with the generation prompt) and its assistant/user content masks."""
    _, enc, located = model.content_spans(conv)
    if len(located) != sum(1 for m in conv if m["content"]):
        raise errors.ChatTemplateError("could not locate every message's content in the rendered chat template")

    def mask(role: str) -> np.ndarray:
        spans = [(a, b) for _, r, a, b in located if r == role]
        return np.asarray([any(x < e and y > s for s, e in spans) for x, y in enc["offset_mapping"]], bool)

    return [int(x) for x in enc["input_ids"]], mask("assistant"), mask("user")


def run_drift(model: Model, scripts: list[Any], spec: DriftSpec, *, progress: bool = True) -> list[dict[str, Any]]:
    """Play every script under every variant; returns one record per (script, variant, turn)::

        {script, domain, variant, turn, user, answer, tokens, proj: [n] mean over the answer's tokens,
         user_proj: [n] mean over the user turn's tokens, probe: bool}

    Scripts of equal length run as one batch (rows) x variants (vmapped)."""
    groups: dict[int, list[Any]] = {}
    for s in scripts:
        groups.setdefault(len(s.turns), []).append(s)
    out = []
    for _, group in sorted(groups.items()):
        out += _run_group(model, group, spec, progress)
    return out


def _run_group(model: Model, scripts: list[Any], spec: DriftSpec, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    cfg = model.cfg
    V, B, N = len(VARIANTS), len(scripts), spec.max_new_tokens
    turns = [list(s.turns) + ([spec.probe] if spec.probe else []) for s in scripts]
    n_turns = len(turns[0])
    tok = model.tokenizer
    est = sum(-(-(len(tok.encode(t, add_special_tokens=False)) + 48) // 64) * 64 + N for t in turns[0])
    S = -(-max(est, 128) // 128) * 128
    dtype = activation_dtype(model.params)
    empty = KVCache.empty(cfg, B, S, dtype)
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (V, *x.shape)), empty)
    slot_tok = np.full((V, B, S), model.pad_id, np.int32)  # host mirror: which id each slot holds
    slot_asst = np.zeros((V, B, S), bool)  # assistant-content slots
    cached: list[list[list[int]]] = [[[] for _ in range(B)] for _ in range(V)]  # valid ids in slot order
    cached_slots: list[list[list[int]]] = [[[] for _ in range(B)] for _ in range(V)]
    convs = [[([{"role": "system", "content": s.system}] if s.system else []) for s in scripts] for _ in range(V)]
    slots = spec.cap.stacked()  # [S, L+1, ...]: the caps of one resid point apply in config order
    units = jnp.asarray(spec.units, jnp.float32)
    ptr, records = 0, []
    bar = tqdm(total=n_turns, desc="drift turns", disable=not progress, dynamic_ncols=True)
    for k in range(n_turns):
        probe = k == n_turns - 1  # the last turn: the probe if one is appended, else the script's own last turn
        chunks, amasks, umasks = [], [], []
        for v in range(V):
            for b in range(B):
                convs[v][b].append({"role": "user", "content": turns[b][k]})
                ids, am, um = _render(model, convs[v][b])
                c = _common(cached[v][b], ids)
                stale = cached_slots[v][b][c:]
                if stale:
                    cache = cache._replace(valid=cache.valid.at[v, b, np.asarray(stale)].set(False))
                cached[v][b], cached_slots[v][b] = cached[v][b][:c], cached_slots[v][b][:c]
                chunks.append(ids[c:])
                amasks.append(am[c:])
                umasks.append(um[c:])
        longest = max(len(cached[i // B][i % B]) + len(x) for i, x in enumerate(chunks))
        if longest + N > cfg.max_position:
            raise errors.ContextLengthError(
                f"conversation turn {k} reaches {longest} tokens (+{N} new), past the model's context of "
                f"{cfg.max_position}: use fewer or shorter turns, or fewer new tokens per answer")
        tc = -(-max(len(x) for x in chunks) // 64) * 64
        need = ptr + tc + N
        if need > S:  # grow the cache (a recompile)
            grow = -(-(need - S) // 128) * 128
            cache = KVCache(jnp.pad(cache.k, [(0, 0)] * 4 + [(0, grow), (0, 0)]),
                            jnp.pad(cache.v, [(0, 0)] * 4 + [(0, grow), (0, 0)]),
                            jnp.pad(cache.valid, [(0, 0), (0, 0), (0, grow)]))
            slot_tok = np.pad(slot_tok, [(0, 0), (0, 0), (0, grow)], constant_values=model.pad_id)
            slot_asst = np.pad(slot_asst, [(0, 0), (0, 0), (0, grow)])
            S += grow
        tokens = np.full((V, B, tc), model.pad_id, np.int32)
        valid = np.zeros((V, B, tc), bool)
        for i, ids in enumerate(chunks):
            v, b = divmod(i, B)
            if ids:
                tokens[v, b, tc - len(ids):] = ids
                valid[v, b, tc - len(ids):] = True
                slot_tok[v, b, ptr + tc - len(ids): ptr + tc] = ids
                slot_asst[v, b, ptr + tc - len(ids): ptr + tc] = amasks[i]
                cached[v][b] += ids
                cached_slots[v][b] += list(range(ptr + tc - len(ids), ptr + tc))
        if probe and spec.edit_coeff:  # the one-time KV edit of the kv_edit variant's past assistant tokens
            v = VARIANTS.index("kv_edit")
            hist_valid = np.asarray(cache.valid[v, :, :ptr])
            steer = iv.Steer(jnp.asarray(spec.edit_vectors), jnp.float32(spec.edit_coeff),
                             iv.layer_weights(cfg.n_resid, list(spec.edit_layers)),
                             iv.Positions.explicit(slot_asst[v, :, :ptr] & hist_valid, False))
            new = _refill(model.params, cfg, jnp.asarray(slot_tok[v, :, :ptr]), jnp.asarray(hist_valid), steer,
                          jnp.zeros((S,), jnp.int8), model.adapter)
            cache = KVCache(cache.k.at[v].set(new.k), cache.v.at[v].set(new.v), cache.valid)
        # per-variant caps: positions are absolute cache slots; generated slots are assistant tokens
        gen_start = ptr + tc
        asst = slot_asst.copy()
        asst[:, :, gen_start:] = True
        masks = np.stack([np.ones((B, S), bool) if name == "capped" else asst[i] for i, name in enumerate(VARIANTS)])
        where = iv.Positions(jnp.asarray(masks), jnp.ones((V, B), bool))
        caps = []
        for vec, lo, hi, w in zip(*slots):
            weights = np.stack([w * (name in ("capped", "capped_assistant")) for name in VARIANTS])
            caps.append(iv.Cap(jnp.broadcast_to(jnp.asarray(vec), (V, *vec.shape)),
                               jnp.broadcast_to(jnp.asarray(lo), (V, *lo.shape)),
                               jnp.broadcast_to(jnp.asarray(hi), (V, *hi.shape)), jnp.asarray(weights, jnp.float32),
                               where))
        hooks = caps[0] if len(caps) == 1 else iv.Chain(tuple(caps))
        res = _turn(model.params, cfg, cache, jnp.asarray(tokens), jnp.asarray(valid), jnp.int32(ptr), hooks, units,
                    model.adapter, max_new_tokens=N, eos_ids=model.eos_ids, pad_id=model.pad_id, monitor=spec.monitor)
        cache = res.cache
        gen = np.asarray(res.out.tokens)
        lengths = np.asarray(res.out.lengths)
        proj = np.asarray(res.proj)  # [V, B, N, n]
        pproj = np.asarray(res.prompt_proj)  # [V, B, tc, n]
        eos = set(model.eos_ids)
        for v in range(V):
            for b in range(B):
                n = int(lengths[v, b])
                ids = [int(x) for x in gen[v, b, :n]]
                content = [i for i, x in enumerate(ids) if x not in eos]
                text = tok.decode([ids[i] for i in content], skip_special_tokens=True).strip()
                slot_tok[v, b, gen_start: gen_start + n] = ids
                slot_asst[v, b, gen_start: gen_start + n] = [x not in eos for x in ids]
                cached[v][b] += ids
                cached_slots[v][b] += list(range(gen_start, gen_start + n))
                convs[v][b].append({"role": "assistant", "content": text})
                um = np.zeros(tc, bool)
                ch = umasks[v * B + b]
                if len(ch):
                    um[tc - len(ch):] = ch
                records.append({
                    "script": scripts[b].id, "domain": scripts[b].domain, "variant": VARIANTS[v], "turn": k,
                    "probe": probe, "user": turns[b][k], "answer": text, "tokens": n,
                    "proj": [float(x) for x in proj[v, b, content].mean(axis=0)] if content else None,
                    "user_proj": [float(x) for x in pproj[v, b, um].mean(axis=0)] if um.any() else None,
                })
        ptr = gen_start + N
        bar.update(1)
    bar.close()
    return records
