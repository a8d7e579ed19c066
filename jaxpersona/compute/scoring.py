"""Teacher-forced likelihoods: prompt+target encoding and the log-probabilities of targets."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.batching import BUCKET, Batch, check_count, pad_pairs, round_up
from jaxpersona.compute.handle import Model
from jaxpersona.data.chat import conversation
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.params import Params, activation_dtype
from jaxpersona.model.transformer import (
    KVCache,
    Recorder,
    embed,
    forward,
    layers_as_bits,
    prepare,
    run_layers,
    score_vocab_chunk,
    token_logprobs,
)


@dataclasses.dataclass(frozen=True)
class ScoringSet:
    """Prompts (chat user turns) and the target responses whose log-probs are scored."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    system: str | None = None

    def __post_init__(self) -> None:
        for what in ("prompts", "responses"):  # a bare string would be scored one character per row
            x = getattr(self, what)
            if isinstance(x, (str, bytes)) or not all(isinstance(t, str) for t in x):
                raise errors.InputError(f"ScoringSet {what} must be a sequence of strings, got {type(x).__name__} "
                                        f"{str(x)[:60]!r}")
        if len(self.prompts) != len(self.responses):
            raise errors.InputError(f"need one response per prompt, got {len(self.prompts)} prompts and "
                                    f"{len(self.responses)} responses")

    def conversations(self) -> list[list[dict[str, str]]]:
        return [conversation(p, self.system) for p in self.prompts]


def check_pairs(n_prompts: int, n_responses: int) -> None:
    if not n_prompts or n_prompts != n_responses:
        raise errors.InputError(f"need one response per prompt, got {n_prompts} prompts and {n_responses} responses")


def target_ids(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str]
               ) -> list[tuple[list[int], list[int]]]:
    """The rows' ``(prompt, response)`` token ids; an empty target response is an :class:`InputError`."""
    check_pairs(len(conversations), len(responses))
    ids = model.pair_ids(conversations, responses)
    for (_, r), conv in zip(ids, conversations):
        if not r:
            raise errors.InputError(f"empty target response for prompt {conv[-1]['content']!r}")
    return ids


def encode_targets(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str], *,
                   rows: int | None = None, width: int | None = None, r_width: int | None = None) -> dict[str, np.ndarray]:
    """Tokenize chat prompt + response per row: tokens/valid ``[B, T]``, the target positions
    ``pred_idx [B, R]`` (position t predicts token t+1), ``pred_tok``, ``pred_ok``, and the
    response-token mask ``resp [B, T]``.

    ``rows``/``width``/``r_width`` pad to a fixed ``[rows, width]`` batch with ``R = r_width`` (extra
    rows copy the last one; callers drop them), so differently sized sets share one compile."""
    pairs = target_ids(model, conversations, responses)
    batch, n_prompt, length = pad_pairs(pairs, model.pad_id, rows=rows, width=width)
    b, t = batch.tokens.shape
    r_max = max(int((length - n_prompt).max()), r_width or 0)
    pred_idx = np.zeros((b, r_max), np.int32)
    pred_tok = np.zeros((b, r_max), np.int32)
    pred_ok = np.zeros((b, r_max), bool)
    resp = np.zeros((b, t), bool)
    for i, (n, ln) in enumerate(zip(n_prompt, length)):
        r = int(ln - n)
        pos = t - ln + n + np.arange(r)  # slots of the response tokens
        pred_idx[i, :r], pred_tok[i, :r], pred_ok[i, :r] = pos - 1, batch.tokens[i, pos], True
        resp[i, pos] = True
    return {"tokens": batch.tokens, "valid": batch.valid, "pred_idx": pred_idx, "pred_tok": pred_tok,
            "pred_ok": pred_ok, "resp": resp}


def target_shape(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str]) -> tuple[int, int]:
    """``(width, r_width)`` that fits every (prompt, response): sequence length rounded up to 16 and
    the longest response in tokens."""
    ids = model.pair_ids(conversations, responses)
    return round_up(max(len(p) + len(r) for p, r in ids), BUCKET), max(1, max(len(r) for _, r in ids))


def split_shape(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str]) -> tuple[int, int]:
    """``(prefix width, suffix width)`` for :func:`encode_split`: the prompt minus its last token
    (rounded up to 16) and last prompt token + response."""
    ids = model.pair_ids(conversations, responses)
    return _split_widths(ids)


def _split_widths(ids: list[tuple[list[int], list[int]]]) -> tuple[int, int]:
    return round_up(max(len(p) - 1 for p, _ in ids), BUCKET) or BUCKET, max(1 + len(r) for _, r in ids)


def encode_split(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str], *,
                 rows: int | None = None, p_width: int | None = None, s_width: int | None = None) -> dict[str, np.ndarray]:
    """Rows laid out as an unintervened prefix and a per-grid-point suffix (see :func:`score_chunk`):
    ``prefix_tokens/prefix_valid [B, P]`` (the prompt minus its last token, left-padded) and
    ``tokens/valid [B, S]`` (last prompt token + response, right-padded), targets in suffix
    coordinates, ``resp [B, S]`` (response tokens) and ``select [B, P+S]`` (the slots the
    ``response`` selector covers: last prompt token + response)."""
    ids = target_ids(model, conversations, responses)
    if rows is not None and rows > len(ids):
        ids += [ids[-1]] * (rows - len(ids))
    p_need, s_need = _split_widths(ids)
    return split_rows(ids, model.pad_id, max(p_width or 0, p_need), max(s_width or 0, s_need))


def shared_prompts(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str]
                   ) -> tuple[list[tuple[int, ...]], list[int], list[tuple[list[int], list[int]]]]:
    """``(prompts, pick, ids)``: the distinct prompts of the rows (token ids, in first-seen order), each row's
    prompt index, and the rows' ``(prompt, response)`` ids (:meth:`~jaxpersona.compute.handle.Model.pair_ids`)."""
    ids = target_ids(model, conversations, responses)
    index: dict[tuple[int, ...], int] = {}
    pick = [index.setdefault(tuple(p), len(index)) for p, _ in ids]
    return list(index), pick, ids


def encode_shared(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str], *,
                  rows: int, q_rows: int, p_width: int, s_width: int) -> dict[str, np.ndarray]:
    """Rows laid out as their distinct prompts and a per-row suffix, for interventions that also act on the
    prompt (each distinct prompt then runs once per grid point, not once per row): ``prompt_tokens /
    prompt_valid [Q, P]`` (a prompt minus its last token, left-padded), ``last_tokens [Q]`` (its last token),
    ``pick [B]`` (each row's prompt) and the :func:`encode_split` suffix ``tokens / valid [B, S]`` (last prompt
    token + response) with its targets. ``rows`` / ``q_rows``: pad to this many rows / prompts (repeating the
    last); ``p_width`` / ``s_width``: the widths (large enough: :func:`shared_shape`)."""
    prompts, pick, ids = shared_prompts(model, conversations, responses)
    ids += [ids[-1]] * (rows - len(ids))
    pick += [pick[-1]] * (rows - len(pick))
    prompts += [prompts[-1]] * (q_rows - len(prompts))
    out = split_rows(ids, model.pad_id, p_width, s_width)
    for k in ("prefix_tokens", "prefix_valid", "select"):
        out.pop(k)
    out["prompt_tokens"] = np.full((q_rows, p_width), model.pad_id, np.int32)
    out["prompt_valid"] = np.zeros((q_rows, p_width), bool)
    for q, u in enumerate(prompts):
        if len(u) > 1:
            out["prompt_tokens"][q, p_width - len(u) + 1:] = u[:-1]
            out["prompt_valid"][q, p_width - len(u) + 1:] = True
    out["last_tokens"] = np.asarray([u[-1] for u in prompts], np.int32)
    out["pick"] = np.asarray(pick, np.int32)
    return out


def shared_shape(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str]
                 ) -> tuple[int, int, int]:
    """``(distinct prompts, prompt width, suffix width)`` for :func:`encode_shared`."""
    prompts, _, ids = shared_prompts(model, conversations, responses)
    p_width, s_width = _split_widths(ids)
    return len(prompts), p_width, s_width


def split_rows(ids: Sequence[tuple[list[int], list[int]]], pad: int, pw: int, sw: int, *,
               last_input: bool = True) -> dict[str, np.ndarray]:
    """The :func:`encode_split` layout of token-id pairs ``(prompt, response)`` at prefix width ``pw`` and suffix
    width ``sw`` (both large enough). ``last_input=False``: the suffix stops before the response's last token,
    which predicts nothing (``sw`` >= the longest response; for scores that read no residual of that token)."""
    b, rw = len(ids), sw - 1 if last_input else sw
    out = {"prefix_tokens": np.full((b, pw), pad, np.int32), "prefix_valid": np.zeros((b, pw), bool),
           "tokens": np.full((b, sw), pad, np.int32), "valid": np.zeros((b, sw), bool),
           "pred_idx": np.zeros((b, rw), np.int32), "pred_tok": np.zeros((b, rw), np.int32),
           "pred_ok": np.zeros((b, rw), bool), "resp": np.zeros((b, sw), bool), "select": np.zeros((b, pw + sw), bool)}
    for i, (p, r) in enumerate(ids):
        pre, suf = p[:-1], [p[-1], *r] if last_input else [p[-1], *r[:-1]]
        if pre:
            out["prefix_tokens"][i, pw - len(pre):] = pre
            out["prefix_valid"][i, pw - len(pre):] = True
        out["tokens"][i, : len(suf)] = suf
        out["valid"][i, : len(suf)] = True
        out["pred_idx"][i, : len(r)] = np.arange(len(r))
        out["pred_tok"][i, : len(r)] = r
        out["pred_ok"][i, : len(r)] = True
        out["resp"][i, 1 : len(suf)] = True
        out["select"][i, pw : pw + len(suf)] = True
    return out


def encode_scoring(model: Model, data: ScoringSet, **pad: Any) -> dict[str, np.ndarray]:
    """:func:`encode_targets` of a :class:`ScoringSet` (user turns with the set's system prompt)."""
    check_pairs(len(data.prompts), len(data.responses))
    return encode_targets(model, data.conversations(), data.responses, **pad)


def target_logprob(params: Params, cfg: ModelConfig, h: jax.Array, data: dict[str, jax.Array],
                   chunk: int | None = None) -> jax.Array:
    """Mean log-prob of each row's target tokens given the last residual ``h [B, T, D]``: ``[B]``.
    Logits are computed at the target positions only, over vocabulary chunks of ``chunk`` ids (default: the
    forward-only choice :func:`~jaxpersona.model.transformer.score_vocab_chunk`; pass ``VOCAB_CHUNK`` under a
    gradient)."""
    hs = jnp.take_along_axis(h, data["pred_idx"][..., None], axis=1)  # [B, R, D]
    if chunk is None:
        chunk = score_vocab_chunk(hs.shape[0] * hs.shape[1], cfg.vocab_size)
    lp = token_logprobs(params, cfg, hs, data["pred_tok"], chunk=chunk)  # [B, R]
    ok = data["pred_ok"].astype(jnp.float32)
    return (lp * ok).sum(-1) / jnp.maximum(ok.sum(-1), 1.0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefix_cache(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array, adapter: Any = None
                  ) -> KVCache:
    """The KV cache ``[L, Q, KV, P, hd]`` of ``Q`` left-padded prefixes ``tokens [Q, P]``."""
    empty = KVCache.empty(cfg, tokens.shape[0], tokens.shape[1], activation_dtype(params))
    return forward(params, cfg, tokens, valid=valid, cache=empty, logits=False, adapter=adapter).kv()


def gather_prefix(prefix: KVCache, pick: jax.Array, room: int) -> KVCache:
    """Row ``b`` of the result holds prefix ``pick[b]`` of ``prefix`` (``[L, Q, KV, P, hd]``) followed by ``room``
    empty slots: ``[L, B, KV, P + room, hd]`` (a suffix of ``room`` tokens is written at slot ``P``)."""
    grow = ((0, 0), (0, 0), (0, 0), (0, room), (0, 0))
    return KVCache(jnp.pad(prefix.k[:, pick], grow), jnp.pad(prefix.v[:, pick], grow),
                   jnp.pad(prefix.valid[pick], ((0, 0), (0, room))))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _suffix_logprob_chunk(params: Params, cfg: ModelConfig, prefix: KVCache, pick: jax.Array,
                          data: dict[str, jax.Array], adapter: Any = None) -> jax.Array:
    """Mean target log-prob ``[B]`` of suffixes ``data`` (:func:`encode_split` layout) after the cached prefix
    ``pick [B]`` of ``prefix`` (``[L, Q, KV, P, hd]``)."""
    p, s = prefix.valid.shape[1], data["tokens"].shape[1]
    cache = gather_prefix(prefix, pick, s)
    # read_only: each block attends over its own layer of the cache; the cache is never carried through the layer
    # scan (a carried cache is copied whole at every layer), and none is returned (nothing reads it)
    prep = prepare(cfg, data["valid"], cache=cache, cache_index=p)
    record = Recorder.make(cfg, None, data["valid"])
    h = embed(params, cfg, data["tokens"])
    h, _, _ = run_layers(params, cfg, h, prep, record(record.empty(h), jnp.int32(0), h), record, cache=cache,
                         cache_index=p, adapter=adapter, read_only=True)
    return target_logprob(params, cfg, h, data)


def mean_logprobs(model: Model, conversations: Sequence[list[dict[str, str]]], responses: Sequence[str], *,
                  batch_size: int = 16) -> np.ndarray:
    """Mean per-token log-prob of each response after its chat prompt, unintervened: ``[N]``.

    Each distinct prompt runs once (its KV cache is shared by every response to it); the responses are then
    scored ``batch_size`` at a time in order of length, each batch padded only to its own longest row (rounded
    up to 8 tokens, so a handful of shapes compile); a response's last token is no input (it predicts nothing), and
    a repeated (prompt, response) pair is scored once. Empty responses give NaN. Under the model's LoRA adapter,
    if it carries one."""
    check_pairs(len(conversations), len(responses))
    check_count(batch_size)
    out = np.full(len(responses), np.nan, np.float64)
    live = [i for i, r in enumerate(responses) if r and model.tokenizer.encode(r, add_special_tokens=False)]
    if not live:
        return out
    ids = model.pair_ids([conversations[i] for i in live], [responses[i] for i in live])
    prompts: dict[tuple[int, ...], int] = {}
    for p, _ in ids:
        prompts.setdefault(tuple(p[:-1]), len(prompts))
    uniq = list(prompts)
    p_width = round_up(max(max(len(u) for u in uniq), 1), BUCKET)
    q_rows = round_up(len(uniq), 8)  # fewer distinct shapes to compile
    pre = np.full((q_rows, p_width), model.pad_id, np.int32)
    pre_valid = np.zeros((q_rows, p_width), bool)
    for q, u in enumerate(uniq):
        if u:
            pre[q, p_width - len(u):], pre_valid[q, p_width - len(u):] = u, True
    model.check_length(Batch(pre, pre_valid))
    params = layers_as_bits(model.params)  # mixed precision on a CPU: bitcast once, not in every call below
    prefix = _prefix_cache(params, model.cfg, jnp.asarray(pre), jnp.asarray(pre_valid), model.adapter)
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    first = [seen.setdefault((tuple(p), tuple(r)), j) for j, (p, r) in enumerate(ids)]  # a repeated pair: once
    order = sorted(seen.values(), key=lambda j: len(ids[j][1]))
    got = np.full(len(live), np.nan, np.float64)
    rows = min(batch_size, len(order))
    for s in range(0, len(order), rows):
        part = order[s : s + rows]
        part_ids = [ids[j] for j in part] + [ids[part[-1]]] * (rows - len(part))
        s_width = round_up(max(len(r) for _, r in part_ids), 8)
        enc = split_rows(part_ids, model.pad_id, p_width, s_width, last_input=False)
        model.check_length(Batch(np.concatenate([enc["prefix_tokens"], enc["tokens"]], axis=1),
                                 np.concatenate([enc["prefix_valid"], enc["valid"]], axis=1)))
        pick = np.asarray([prompts[tuple(p[:-1])] for p, _ in part_ids], np.int32)
        lp = np.asarray(_suffix_logprob_chunk(params, model.cfg, prefix, jnp.asarray(pick),
                                              {k: jnp.asarray(enc[k]) for k in ("tokens", "valid", "pred_idx",
                                                                                "pred_tok", "pred_ok")},
                                              model.adapter))
        got[part] = lp[: len(part)]
    out[live] = got[first]
    return out
