"""Directions from activations: contrastive mean differences, and the per-response activation
means the persona-vector pipeline (Chen et al. 2025) extracts from.

Three reductions of a (prompt, response) sequence, all computed in one jitted forward without
materialising ``[L+1, B, T, D]``:

* ``response_mean`` — mean over the response tokens (the paper's default),
* ``prompt_mean``   — mean over the prompt tokens (system + user turn + template),
* ``prompt_last``   — the last prompt token (what the model "plans" before answering; monitoring).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.batching import check_count, pad_pairs
from jaxpersona.compute.handle import Model
from jaxpersona.data.chat import Message
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.params import Params
from jaxpersona.model.transformer import embed, prepare, run_layers

VARIANTS = ("response_mean", "prompt_mean", "prompt_last")


def contrast_vectors(
    model: Model,
    positive: list[str],
    negative: list[str],
    *,
    reduce: Literal["mean", "last"] = "mean",
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """``mean(resid | positive) - mean(resid | negative)`` at every resid point: ``[L+1, D]`` float32.

    Each text is reduced over its tokens (``mean``) or taken at its ``last`` token, inside the jitted
    forward; texts are chat user turns when ``chat`` (with an optional system prompt).
    """
    positive, negative = ([x] if isinstance(x, str) else list(x) for x in (positive, negative))  # a str: one text
    if not positive or not negative:
        raise errors.InputError("contrast_vectors needs at least one positive and one negative text")
    check_count(batch_size)
    layers = tuple(range(model.cfg.n_resid))

    def mean_resid(texts: list[str]) -> np.ndarray:
        parts = [model.resid(texts[i : i + batch_size], layers, reduce, chat=chat, system=system)
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts, axis=1).mean(axis=1)  # [L+1, D]

    return (mean_resid(positive) - mean_resid(negative)).astype(np.float32)


class _WeightedMeans(NamedTuple):
    """Recorder for ``run_layers``: ``means[l] = einsum(w [V, B, T], resid[l] [B, T, D])`` -> ``[V, B, D]``
    and ``norms[l] = einsum(w, |resid[l]|)`` -> ``[V, B]`` (the weighted mean token norm)."""

    weights: jax.Array

    def __call__(self, buf: tuple[jax.Array, jax.Array], layer: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        hf = h.astype(jnp.float32)
        red = jnp.einsum("vbt,btd->vbd", self.weights, hf)
        nrm = jnp.einsum("vbt,bt->vb", self.weights, jnp.linalg.norm(hf, axis=-1))
        return (jax.lax.dynamic_update_index_in_dim(buf[0], red, layer, axis=0),
                jax.lax.dynamic_update_index_in_dim(buf[1], nrm, layer, axis=0))


@functools.partial(jax.jit, static_argnames=("cfg",))
def reduced_resid(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array,
                   weights: jax.Array, adapter: Any = None) -> tuple[jax.Array, jax.Array]:
    """Weighted token means of every resid point ``[L+1, V, B, D]`` and of its token norms
    ``[L+1, V, B]``, float32."""
    prep = prepare(cfg, valid)
    record = _WeightedMeans(weights)
    h = embed(params, cfg, tokens)
    v, b = weights.shape[0], tokens.shape[0]
    buf = (jnp.zeros((cfg.n_resid, v, b, cfg.d_model), jnp.float32), jnp.zeros((cfg.n_resid, v, b), jnp.float32))
    buf = record(buf, jnp.int32(0), h)
    _, buf, _ = run_layers(params, cfg, h, prep, buf, record, adapter=adapter)
    return buf


def encode_pairs(model: Model, prompts: list[list[Message]], responses: list[str], *,
                 width: int | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
    """Tokenize chat prompt + response text per row (left-padded to a multiple of 16, or to ``width``
    when every row fits it: fixed shapes, one compile).

    Returns ``(batch, prompt_mask [B, T], response_mask [B, T])``. The response is re-tokenized
    from its text, as persona_vectors does.
    """
    if len(prompts) != len(responses) or not prompts:
        raise errors.InputError(f"need one response per prompt, got {len(prompts)} prompts, {len(responses)} responses")
    batch, n_prompt, length = pad_pairs(model.pair_ids(prompts, responses), model.pad_id, width=width)
    t = batch.tokens.shape[1]
    pmask = np.zeros(batch.tokens.shape, bool)
    rmask = np.zeros(batch.tokens.shape, bool)
    for i, (n, ln) in enumerate(zip(n_prompt, length)):
        off = t - ln
        pmask[i, off : off + n] = True
        rmask[i, off + n :] = True
    return batch, pmask, rmask


def response_activations(model: Model, prompts: list[list[Message]], responses: list[str], *,
                         rows: int | None = None, width: int | None = None,
                         with_norms: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per-row activation means of every resid point for each variant in :data:`VARIANTS`.

    ``prompts``: chat conversations (ending with the user turn); ``responses``: the assistant reply
    texts. Returns ``[3, L+1, N, D]`` float32 (order of :data:`VARIANTS`); with ``with_norms`` also the
    mean token norms ``[3, L+1, N]`` over the same tokens. A row with an empty response has zeros
    for ``response_mean``. Callers chunk ``N``; ``rows``/``width`` pad the batch to a fixed
    ``[rows, width]`` so every chunk reuses one compile (see :func:`iter_activations`).
    """
    n = len(prompts)
    if rows is not None and rows > n:  # pad with copies of the last row (dropped below)
        prompts = list(prompts) + [prompts[-1]] * (rows - n)
        responses = list(responses) + [responses[-1]] * (rows - n)
    batch, pmask, rmask = encode_pairs(model, prompts, responses, width=width)
    model.check_length(batch)
    nxt = np.zeros_like(pmask)
    nxt[:, :-1] = pmask[:, 1:]
    last = pmask & ~nxt  # the last prompt token

    def norm(m: np.ndarray) -> np.ndarray:
        return m / np.maximum(m.sum(axis=1, keepdims=True), 1)

    w = np.stack([norm(rmask.astype(np.float32)), norm(pmask.astype(np.float32)), last.astype(np.float32)])
    means, norms = reduced_resid(model.params, model.cfg, jnp.asarray(batch.tokens), jnp.asarray(batch.valid),
                                  jnp.asarray(w), model.adapter)
    acts = np.asarray(means).transpose(1, 0, 2, 3)[:, :, :n]  # [V, L+1, N, D]
    return (acts, np.asarray(norms).transpose(1, 0, 2)[:, :, :n]) if with_norms else acts


def iter_activations(model: Model, prompts: list[list[Message]], responses: list[str], batch_size: int = 16,
                     with_norms: bool = False, bucket: int = 32):
    """Yield ``(idx, acts [3, L+1, n, D])`` (with ``with_norms``: ``(idx, (acts, norms [3, L+1, n]))``) over
    chunks of rows; ``idx`` holds the chunk's row indices into the inputs.

    Rows are grouped by length (longest first) so a chunk pads only to its own longest row, rounded up
    to ``bucket`` tokens: a few compiles, far less padding than one width for all. Every chunk has the
    same number of rows."""
    check_count(batch_size)
    lengths = np.asarray([len(p) + len(r) for p, r in model.pair_ids(prompts, responses)])
    order = np.argsort(-lengths, kind="stable")
    n_chunks = -(-len(prompts) // batch_size)
    rows = -(-len(prompts) // n_chunks)  # equal chunks: no padded rows beyond the last chunk's remainder
    for i in range(0, len(prompts), rows):
        idx = order[i : i + rows]
        width = -(-int(lengths[idx].max()) // bucket) * bucket
        yield idx, response_activations(model, [prompts[j] for j in idx], [responses[j] for j in idx],
                                        rows=rows, width=width, with_norms=with_norms)
