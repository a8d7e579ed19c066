"""Judges: score a response for a trait, 0-100, from a judge model's next-token distribution.

As in Persona Vectors (Chen et al. 2025), the judge is asked to answer with a single number 0-100
(or REFUSAL). With ``p(k)`` the probability that its complete answer is the integer ``k``::

    score = sum_k k p(k) / sum_k p(k)        (k = 0..100)

and there is no score (``None`` / NaN) when ``sum_k p(k) < min_mass`` (default 0.25): the judge was
not answering with a number (a refusal, or a confused judge).

Two judges produce ``p(k)``:

* :class:`HTTPJudge` -- an OpenAI-compatible server: the top-20 logprobs of the first answer token,
  each token that is an integer 0..100 (after stripping whitespace) adding ``exp(logprob)``.
* :class:`LocalJudge` -- any jaxpersona :class:`~jaxpersona.compute.handle.Model`, *exactly*: the
  probability of each integer's whole token sequence followed by a non-digit, in one jitted call.
"""

from __future__ import annotations

import abc
import functools
import math
import os
import re
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.batching import check_count, pad_left
from jaxpersona.compute.handle import load
from jaxpersona.measure.endpoint import OpenAIEndpoint, redact_url
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.params import Params, activation_dtype
from jaxpersona.model.transformer import (
    KVCache,
    Recorder,
    embed,
    forward,
    prepare,
    run_layers,
    unembed,
)

if TYPE_CHECKING:
    from jaxpersona.compute.handle import Model

N_SCORES = 101  # the integers 0..100
DEFAULT_MIN_MASS = 0.25
DIGITS = "0123456789"
_INT_RE = re.compile(r"[0-9]{1,3}")


# --- shared math ------------------------------------------------------------------------------
def score_from_probs(p: Any, min_mass: float = DEFAULT_MIN_MASS) -> np.ndarray:
    """Expected score ``sum_k k p(k) / sum_k p(k)`` over the last axis (``[..., 101]`` -> ``[...]``).

    ``p`` need not be normalised (it is the mass each integer gets); NaN where ``sum_k p(k) < min_mass``.
    """
    p = np.asarray(p, np.float64)
    if p.ndim < 1 or p.shape[-1] != N_SCORES:
        raise errors.InputError(
            f"judge probabilities must have shape [..., {N_SCORES}] (integers 0..100), got {p.shape}"
        )
    if np.isnan(p).any() or (p < 0).any():
        raise errors.InputError("judge probabilities must be non-negative numbers (got a negative value or NaN)")
    if not 0 <= min_mass <= 1:
        raise errors.InputError(f"min_mass must be in [0, 1], got {min_mass}")
    mass = p.sum(axis=-1)
    ok = (mass >= min_mass) & (mass > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (p @ np.arange(N_SCORES, dtype=np.float64)) / mass
    return np.where(ok, score, np.nan)


def to_optional(scores: Any) -> list[float | None]:
    """``[N]`` floats with NaN -> a list of Python floats with ``None`` for "no score"."""
    return [None if math.isnan(s) else float(s) for s in np.asarray(scores, np.float64).reshape(-1)]


def parse_int_token(token: str) -> int | None:
    """The integer 0..100 a token stands for (``"7"``, ``" 42"``, ``"100\\n"``), else ``None``."""
    s = token.strip()
    if not _INT_RE.fullmatch(s):
        return None
    k = int(s)
    return k if k <= 100 else None


class Judge(abc.ABC):
    """A judge: ``probs(prompts) -> [N, 101]`` mass of each integer answer; ``scores`` from it.

    Each prompt is a fully rendered judge prompt, sent as one user message.
    """

    @abc.abstractmethod
    def probs(self, prompts: list[str]) -> np.ndarray:
        """``[N, 101]`` float64: the (unnormalised) probability that the answer is exactly ``k``."""

    def scores(self, prompts: list[str], min_mass: float = DEFAULT_MIN_MASS) -> list[float | None]:
        """Expected score per prompt, ``None`` where the integer mass is below ``min_mass``."""
        prompts = _check_prompts(prompts)
        if not prompts:
            return []
        return to_optional(score_from_probs(self.probs(prompts), min_mass))


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        raise errors.InputError("judge prompts must be a list of strings, got a single string; wrap it in a list")
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise errors.InputError(f"judge prompts must be non-empty strings; bad entries at {bad[:10]}")
    return prompts


# --- HTTP ------------------------------------------------------------------------------------
class HTTPJudge(Judge):
    """A judge on an OpenAI-compatible server that returns ``top_logprobs`` (vLLM, OpenAI, ...).

    Each prompt is one user message, asked for one token at temperature 0 with the top 20 logprobs.
    Tokens that are an integer 0..100 after ``strip()`` add ``exp(logprob)`` to that integer (``"50"``
    and ``" 50"`` both count for 50). Only the first token is seen, so multi-token numbers count only
    through their first token -- use a judge whose tokenizer has whole numbers as tokens (as in the paper).
    """

    def __init__(self, endpoint: OpenAIEndpoint, top_logprobs: int = 20) -> None:
        self.endpoint = endpoint
        self.top_logprobs = int(top_logprobs)

    def __repr__(self) -> str:
        return f"HTTPJudge({self.endpoint!r})"

    def probs(self, prompts: list[str]) -> np.ndarray:
        prompts = _check_prompts(prompts)
        responses = self.endpoint.chat_many(
            [[{"role": "user", "content": p}] for p in prompts],
            max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs, seed=0,
        )
        out = np.zeros((len(prompts), N_SCORES), np.float64)
        for i, resp in enumerate(responses):
            for token, logprob in self._top_logprobs(resp):
                k = parse_int_token(token)
                if k is not None:
                    out[i, k] += math.exp(logprob)
        return out

    def _top_logprobs(self, resp: dict) -> list[tuple[str, float]]:
        try:
            first = resp["choices"][0]["logprobs"]["content"][0]
            tops = first.get("top_logprobs") or []
            pairs = [(str(t["token"]), float(t["logprob"])) for t in tops]
            if "token" in first and "logprob" in first and all(t != first["token"] for t, _ in pairs):
                pairs.append((str(first["token"]), float(first["logprob"])))  # the chosen token, if not listed
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            pairs = []
        if not pairs:
            raise errors.EndpointError(
                f"the judge endpoint {redact_url(self.endpoint.url)} returned no logprobs "
                "(choices[0].logprobs.content[0].top_logprobs); the judge needs an OpenAI-compatible server "
                "that returns top_logprobs (e.g. vLLM), or use a local judge model"
            )
        return pairs


# --- local, exact ----------------------------------------------------------------------------
class IntegerTrie(NamedTuple):
    """The token sequences of ``"0".."100"`` as a trie, plus the digit-continuation vocab mask.

    Nodes are the non-empty distinct prefixes, parents before children. ``root`` (the prompt's last
    position) is row 0 of the distribution table, node ``j`` is row ``j + 1``.
    """

    tokens: np.ndarray  # [N] int32: the last token of each node's path
    parent_row: np.ndarray  # [N] int32: row of the parent's distribution (0 = root)
    depth: np.ndarray  # [N] int32: path length (>= 1)
    ancestors: np.ndarray  # [N, N] bool: ancestors[j, i] = node i is on node j's path (incl. j)
    node_of: np.ndarray  # [101] int32: node of integer k's full path
    edge_tokens: np.ndarray  # [E] int32: distinct tokens on trie edges
    edge_index: np.ndarray  # [N] int32: position of tokens[j] in edge_tokens
    continues: np.ndarray  # [V] bool: token text starts with a digit 0-9 (the number goes on)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())


def _token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """What each token id appends to a number: ``decode(ids("0") + [i])`` minus ``decode(ids("0"))``.

    Decoding after an anchor keeps leading spaces that ``decode([i])`` drops (SentencePiece).
    """
    n = min(int(vocab_size), len(tokenizer))
    anchor = list(tokenizer.encode("0", add_special_tokens=False))
    head = tokenizer.decode(anchor, skip_special_tokens=False) if anchor else ""
    full = tokenizer.batch_decode([anchor + [i] for i in range(n)], skip_special_tokens=False)
    texts = []
    for i, f in enumerate(full):
        if anchor and f.startswith(head):
            texts.append(f[len(head):])
        else:
            texts.append(tokenizer.decode([i], skip_special_tokens=False))
    return texts + [""] * (int(vocab_size) - n)


def build_trie(tokenizer: Any, vocab_size: int) -> IntegerTrie:
    """The :class:`IntegerTrie` of a tokenizer (``tokenizer.encode(str(k), add_special_tokens=False)``)."""
    paths = [tuple(int(t) for t in tokenizer.encode(str(k), add_special_tokens=False)) for k in range(N_SCORES)]
    for k, p in enumerate(paths):
        if not p:
            raise errors.InputError(f"the tokenizer encodes {str(k)!r} to no tokens; it cannot be a local judge")
        if max(p) >= vocab_size:
            raise errors.InputError(f"the tokenizer encodes {str(k)!r} to ids outside the model's vocabulary")
    prefixes = sorted({p[:d] for p in paths for d in range(1, len(p) + 1)}, key=lambda q: (len(q), q))
    index = {q: j for j, q in enumerate(prefixes)}
    n = len(prefixes)
    tokens = np.array([q[-1] for q in prefixes], np.int32)
    parent_row = np.array([0 if len(q) == 1 else index[q[:-1]] + 1 for q in prefixes], np.int32)
    depth = np.array([len(q) for q in prefixes], np.int32)
    ancestors = np.zeros((n, n), bool)
    for j, q in enumerate(prefixes):
        for d in range(1, len(q) + 1):
            ancestors[j, index[q[:d]]] = True
    edge_tokens = np.array(sorted(set(tokens.tolist())), np.int32)
    edge_index = np.searchsorted(edge_tokens, tokens).astype(np.int32)
    node_of = np.array([index[p] for p in paths], np.int32)
    continues = np.array([t[:1] in tuple(DIGITS) for t in _token_texts(tokenizer, vocab_size)], bool)
    return IntegerTrie(tokens, parent_row, depth, ancestors, node_of, edge_tokens, edge_index, continues)


def _row_stats(params: Params, cfg: ModelConfig, h: jax.Array, trie: IntegerTrie, chunk: int = 32):
    """From final hidden states ``h [B, M, D]``: ``lse [B, M]``, ``log p(stop) [B, M]``, edge logits ``[B, M, E]``.

    The ``[B, M, V]`` logits are formed ``chunk`` rows at a time (large vocabularies stay in memory).
    """
    b, m, d = h.shape
    pad = -m % chunk if m > chunk else 0
    c = min(chunk, m)
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, (m + pad) // c, c, d).transpose(1, 0, 2, 3)

    def one(hc):
        logits = unembed(params, cfg, hc)  # [B, c, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        stop = jax.nn.logsumexp(jnp.where(trie.continues, -jnp.inf, logits), axis=-1) - lse
        return lse, stop, jnp.take(logits, trie.edge_tokens, axis=-1)

    lse, stop, edge = jax.lax.map(one, hp)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, m + pad, *x.shape[3:])[:, :m]  # noqa: E731
    return unchunk(lse), unchunk(stop), unchunk(edge)


@functools.partial(jax.jit, static_argnames=("cfg",))
def integer_logprobs(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array,
                     trie: IntegerTrie, prefix: jax.Array | None = None) -> jax.Array:
    """``log p(k)`` ``[B, 101]`` for left-padded prompts ``tokens``/``valid [B, T]`` (see :class:`LocalJudge`).

    One prefill writes the prompt into a KV cache; then all ``N`` trie nodes go through the model as
    one chunk of ``N`` tokens with a *tree* attention mask: node ``j`` sees the prompt and its own
    ancestors, at rope position ``prompt_len + depth_j - 1`` -- exactly what feeding each path after
    the prompt would compute, for one short extra forward.

    ``prefix [P]``: token ids every prompt starts with (a judge rubric's head), prefilled once for the
    whole batch; ``tokens`` are then each prompt's remainder (left-padded, so there is padding between
    the two: not for sliding-window models, whose masks measure distance in slots).
    """
    b, t = tokens.shape
    n = trie.tokens.shape[0]
    p = 0 if prefix is None else prefix.shape[0]
    dtype = activation_dtype(params)
    cache = KVCache.empty(cfg, b, p + t + n, dtype)
    if prefix is not None:
        one = forward(params, cfg, prefix[None], cache=KVCache.empty(cfg, 1, p + t + n, dtype), logits=False).cache
        cache = jax.tree.map(lambda x, like: jnp.broadcast_to(x, like.shape), one, cache)
    pre = forward(params, cfg, tokens, valid=valid, cache=cache, cache_index=p, logits="last")
    cache = pre.cache
    valid = jnp.concatenate([jnp.ones((b, p), bool), valid], axis=1)  # [B, P+T]: the whole prompt

    # the tree chunk at slots p+t .. p+t+n-1
    prompt_len = valid.sum(axis=1).astype(jnp.int32)  # [B]
    q_pos = prompt_len[:, None] + jnp.asarray(trie.depth)[None, :] - 1  # [B, N]
    tvalid = jnp.ones((b, n), bool)
    prep = prepare(cfg, tvalid, q_pos, cache, p + t)
    k_pos = jnp.concatenate([jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0), q_pos], axis=1)
    prompt_part = jnp.broadcast_to(valid[:, None, :], (b, n, p + t))
    tree_part = jnp.broadcast_to(jnp.asarray(trie.ancestors)[None], (b, n, n))
    mask_full = jnp.concatenate([prompt_part, tree_part], axis=2)  # [B, N, P+T+N]
    if cfg.sliding_window is None:
        mask_local = mask_full
    else:
        mask_local = mask_full & ((q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window)
    prep = prep._replace(mask_full=mask_full, mask_local=mask_local)
    record = Recorder.make(cfg, None, tvalid)
    h = embed(params, cfg, jnp.broadcast_to(jnp.asarray(trie.tokens)[None], (b, n)))
    h, _, _ = run_layers(params, cfg, h, prep, record.empty(h), record, cache=cache, cache_index=p + t)

    # distributions: row 0 = after the prompt, row j+1 = after node j's path
    root = pre.logits[:, 0]
    root_lse = jax.nn.logsumexp(root, axis=-1)
    root_stop = jax.nn.logsumexp(jnp.where(trie.continues, -jnp.inf, root), axis=-1) - root_lse
    root_edge = jnp.take(root, trie.edge_tokens, axis=-1)
    lse, stop, edge = _row_stats(params, cfg, h, trie)
    lse = jnp.concatenate([root_lse[:, None], lse], axis=1)  # [B, N+1]
    stop = jnp.concatenate([root_stop[:, None], stop], axis=1)
    edge = jnp.concatenate([root_edge[:, None], edge], axis=1)  # [B, N+1, E]

    step = edge[:, trie.parent_row, trie.edge_index] - lse[:, trie.parent_row]  # [B, N] log p(token_j | parent)
    path = jnp.sum(jnp.where(jnp.asarray(trie.ancestors)[None], step[:, None, :], 0.0), axis=-1)  # [B, N]
    return path[:, trie.node_of] + stop[:, trie.node_of + 1]


class LocalJudge(Judge):
    """A judge run in JAX on any jaxpersona :class:`~jaxpersona.compute.handle.Model`, with exact integer mass.

    The prompt is rendered with the model's chat template as one user message (plus ``answer_prefix``
    after the generation prompt, e.g. ``"Score: "``); a model without a chat template gets the raw text.
    For ``k`` in 0..100 with ``ids_k = tokenizer.encode(str(k))`` (most tokenizers split digits:
    ``"57" -> ["5", "7"]``)::

        p(k) = prod_i p(ids_k[i] | prompt, ids_k[:i])  *  p(stop | prompt, ids_k)

    where ``p(stop)`` is the mass of all tokens that do not continue the number (tokens whose text
    does not start with a digit 0-9). These events are disjoint, so ``sum_k p(k) <= 1``. Only the
    canonical tokenization of each integer is counted (e.g. ``" 57"`` or ``["5", "7"]`` spelled with
    a merged ``"57"`` token are not), so pick an ``answer_prefix`` after which the model writes the
    number directly (for byte-level BPE models such as SmolLM2, one ending in a space).

    Cost per batch: one prefill plus one forward of the ~100 trie nodes with a tree attention mask
    (:func:`integer_logprobs`), jitted once per (batch, bucketed length) shape. The prompts' common
    head (the rubric before the question) is prefilled once per batch and shared by its rows.
    """

    def __init__(self, model: Model, *, batch_size: int = 8, answer_prefix: str = "") -> None:
        self.batch_size = check_count(batch_size)
        model.base_only("the local judge")
        self.model = model
        self.answer_prefix = answer_prefix
        self._trie: IntegerTrie | None = None
        self._device_trie: IntegerTrie | None = None

    def __repr__(self) -> str:
        return (f"LocalJudge(model={self.model.name or self.model.cfg.family!r}, batch_size={self.batch_size}, "
                f"answer_prefix={self.answer_prefix!r})")

    @property
    def trie(self) -> IntegerTrie:
        if self._trie is None:
            self._trie = build_trie(self.model.tokenizer, self.model.cfg.vocab_size)
        return self._trie

    def render(self, prompt: str) -> list[int]:
        """Token ids of one judge prompt as the model sees it (up to where the number starts)."""
        tok = self.model.tokenizer
        if getattr(tok, "chat_template", None):
            text = self.model.format_chat([{"role": "user", "content": prompt}]) + self.answer_prefix
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(prompt + self.answer_prefix))

    def logprobs(self, prompts: list[str]) -> np.ndarray:
        """``[N, 101]`` log p(k) (float32 precision, float64 array)."""
        prompts = _check_prompts(prompts)
        if not prompts:
            return np.zeros((0, N_SCORES))
        trie = self.trie
        seqs = [self.render(p) for p in prompts]
        # the tokens every prompt starts with (chat template + rubric head) are prefilled once per batch;
        # rounded down to a multiple of 16 so calls with similar prompts share a compile. Not with a
        # sliding window: the left padding between head and remainder would widen slot distances.
        share = len(seqs) > 1 and self.model.cfg.sliding_window is None
        shared = len(os.path.commonprefix(seqs)) if share else 0
        shared = min(shared, min(len(x) for x in seqs) - 1) // 16 * 16
        prefix = jnp.asarray(seqs[0][:shared], jnp.int32) if shared else None
        seqs = [x[shared:] for x in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        out = np.zeros((len(seqs), N_SCORES), np.float64)
        rows = min(self.batch_size, 1 << (len(order) - 1).bit_length())  # one batch shape per call
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            chunk = [seqs[i] for i in idx]
            chunk += [chunk[-1]] * (rows - len(chunk))
            batch = pad_left(chunk, self.model.pad_id)
            self.model.check_length(batch, trie.max_depth + shared)
            if self._device_trie is None:
                self._device_trie = jax.tree.map(jnp.asarray, trie)
            lp = integer_logprobs(self.model.params, self.model.cfg, jnp.asarray(batch.tokens),
                                  jnp.asarray(batch.valid), self._device_trie, prefix)
            out[idx] = np.asarray(lp, np.float64)[: len(idx)]
        return out

    def probs(self, prompts: list[str]) -> np.ndarray:
        return np.exp(self.logprobs(prompts))




LOCAL_ANSWER_PREFIX = "Score: "  # the local judge answers after this prefix


def build_judge(subject: Model, spec: str = "self", *, url: str | None = None, judge_model: str | None = None,
                key_env: str | None = "OPENAI_API_KEY", answer_prefix: str = LOCAL_ANSWER_PREFIX) -> tuple[Any, str]:
    """``(judge, judge_id)``: an HTTP judge when ``url`` is given, else a local JAX judge running
    ``subject`` (``spec == "self"``) or the model ``spec`` names. ``judge_id`` keys the judgement cache
    (it never contains credentials).

    Local judges start their reply with ``answer_prefix`` ("Score: "): small chat models otherwise
    rarely put their first token on a number (SmolLM2-135M: ~10% integer mass without it, ~95% with
    it; the trailing space matters because its tokenizer writes " 57" as [" ", "5", "7"])."""

    if url:
        if not judge_model:
            raise errors.InputError("--judge-url needs --judge-model (the model name at that endpoint)")
        return HTTPJudge(OpenAIEndpoint(url, judge_model, api_key_env=key_env)), f"http:{redact_url(url)}:{judge_model}"
    if spec == "self":
        model = subject
    else:
        model = load(spec, dtype="float32")
    judge = LocalJudge(model, answer_prefix=answer_prefix)
    return judge, f"local:{model.name or model.cfg.family}:{getattr(judge, 'answer_prefix', '')!r}"
