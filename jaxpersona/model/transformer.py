"""One pure forward for every supported decoder family (Llama, Mistral, Qwen2/3, Gemma 2/3).

Model = data: ``params`` is a nested dict of arrays whose per-layer weights are stacked on a
leading ``[L]`` axis; ``cfg`` is a frozen :class:`~jaxpersona.model.config.ModelConfig`. The forward is
a ``lax.scan`` over the stacked layers and is usable under ``jit``, ``vmap`` and ``grad``.

Residual-stream convention (used by capture and interventions alike)::

    resid[0]   = embedding output (after Gemma's sqrt(d) scale)
    resid[l]   = output of block l-1, for l = 1..L      (L + 1 points in all)

This is HF's ``hidden_states`` convention for ``l < L``. HF's ``hidden_states[L]`` has the final
norm applied; ``resid[L]`` here is the raw residual (the final norm is part of the unembedding).

Hook point: ``hook(layer, h, ctx) -> h`` is called on every ``resid[l]`` before it flows on, with
``layer`` a traced int32 scalar, so a hook that is a pytree of arrays (an intervention) never
forces a recompile when its values change.

Meshes: the forward knows none, but marks the layout it wants for its activations
(:func:`jaxpersona.model.sharding.constrain`: residual, q / k / v, MLP hidden, logits); the marks act only
while a caller has set a ``(data, model)`` mesh with ``jax.set_mesh`` and are no-ops otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.lora import TARGETS, Adapter, AdapterStack, LayerFactors, layer_factors
from jaxpersona.model.params import Params, activation_dtype
from jaxpersona.model import cache_attention, skinny
from jaxpersona.model.sharding import constrain

Reduce = Literal["tokens", "mean", "last"]


# --- capture / hook types ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Capture:
    """Which residual points to return, and how to reduce them over tokens (static under jit).

    ``layers`` index ``resid`` (``0..L``). ``reduce``:
      * ``"tokens"``: per token, ``[n, B, T, D]``
      * ``"mean"``:   mean over the capture mask, ``[n, B, D]``
      * ``"last"``:   the last position of the capture mask, ``[n, B, D]``
    Only the requested layers are ever kept; nothing of size ``L x T`` is materialised.
    """

    layers: tuple[int, ...]
    reduce: Reduce = "tokens"

    def validate(self, cfg: ModelConfig) -> None:
        if not self.layers:
            raise errors.InputError("Capture.layers is empty; ask for at least one resid index")
        bad = [l for l in self.layers if not 0 <= l <= cfg.n_layers]
        if bad:
            raise errors.InputError(
                f"capture layers {bad} are outside resid[0..{cfg.n_layers}] "
                f"(resid[0] = embeddings, resid[l] = output of block l-1)"
            )
        if len(set(self.layers)) != len(self.layers):  # one slot per resid point: a repeat would stay zeros
            raise errors.InputError(f"capture layers {list(self.layers)} repeat a resid index; ask for each once")
        if self.reduce not in ("tokens", "mean", "last"):
            raise errors.InputError(f"capture reduce {self.reduce!r}; use 'tokens', 'mean' or 'last'")


class HookContext(NamedTuple):
    """What a hook sees besides the residual. All ``[B, T]``."""

    positions: jax.Array  # rope position of each token
    slots: jax.Array  # absolute index in the sequence / KV cache
    valid: jax.Array  # bool, False on padding


Hook = Callable[[jax.Array, jax.Array, HookContext], jax.Array]


class KVPrefix(NamedTuple):
    """Keys/values of a prompt prefix that many caches share, read and never written: ``k``/``v``
    ``[L, B, KV, P, hd]``, ``valid [B, P]``. A :class:`KVCache` that carries one attends over the prefix's ``P``
    slots first and then its own, as one cache of ``P + S`` slots would; its ``cache_index`` counts its own
    slots only. Under ``vmap`` over grid points the prefix stays unbatched: each layer's prefix is read once for
    all of them, not copied per point (a sweep's greedy generations after one unintervened prompt)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array


class KVCache(NamedTuple):
    """Fixed-size cache. ``k``/``v``: ``[L, B, KV, S, hd]``; ``valid``: ``[B, S]`` (False = padding/empty);
    ``prefix``: an optional shared :class:`KVPrefix` attended before these slots."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    prefix: KVPrefix | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int, dtype: Any) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, size, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, size), bool))


class ForwardOutput(NamedTuple):
    """What :func:`forward` returns: logits (as asked), captured residuals, and the KV cache when one was given."""

    logits: jax.Array | None  # [B, T, V] float32 (None when not asked for)
    captured: jax.Array | None  # [n, B, T, D] or [n, B, D]
    cache: KVCache | None

    def last_logits(self) -> jax.Array:
        """``[B, V]`` float32: the logits of the last position (of a forward run with ``logits`` on)."""
        if self.logits is None:
            raise errors.InputError("this forward ran with logits=False: there are no logits to read")
        return self.logits[:, -1]

    def kv(self) -> KVCache:
        """The updated :class:`KVCache` (of a forward run with ``cache=``)."""
        if self.cache is None:
            raise errors.InputError("this forward ran without a cache: there is no KV cache to read")
        return self.cache


# --- shared math ------------------------------------------------------------------------------
def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32. ``offset=1`` is Gemma's ``(1 + w)`` scale."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:  # Gemma: scale in float32, then cast
        return (normed * (offset + w.astype(jnp.float32))).astype(x.dtype)
    return w * normed.astype(x.dtype)  # Llama: cast, then scale


def rope_tables(inv_freq: np.ndarray, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, T, hd]`` (HF rotate-half layout) for integer positions ``[B, T]``."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x``: ``[B, T, heads, hd]``; cos/sin ``[B, T, hd]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    xf = x.astype(jnp.float32)
    out = xf * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def activation(name: str, x: jax.Array) -> jax.Array:
    return jax.nn.silu(x) if name == "silu" else jax.nn.gelu(x, approximate=True)


def attention_masks(cfg: ModelConfig, q_slots: jax.Array, k_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Boolean masks ``[B, T, S]`` (True = may attend) for global and sliding layers.

    ``q_slots``: ``[B, T]`` absolute index of each query; keys are slots ``0..S-1``.
    """
    k_slots = jnp.arange(k_valid.shape[1])
    causal = (k_slots[None, None, :] <= q_slots[:, :, None]) & k_valid[:, None, :]
    if cfg.sliding_window is None:
        return causal, causal
    near = (q_slots[:, :, None] - k_slots[None, None, :]) < cfg.sliding_window
    return causal, causal & near


class Blocked(NamedTuple):
    """Attention over the first ``span`` cache slots in blocks of ``block`` keys (online softmax, blocks in
    slot order). A row's result does not depend on ``span`` once it covers the row's keys: a block with no key
    to attend leaves the running max, sum and output exactly as they were. So a server may attend over only
    the slots in use (``span`` = a bucket of the longest row) and still give each row the numbers it gets
    alone. Both are static (``span % block == 0``, ``span <= S``)."""

    block: int
    span: int


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              blocked: Blocked | None = None, prefix: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Grouped-query attention. q ``[B,T,H,hd]``, k/v ``[B,KV,S,hd]``, mask ``[B,T,S]`` -> ``[B,T,H*hd]``.

    Heads are laid out ``[B, KV, G*T, hd]`` so both products are plain batched matmuls (fast on CPU).
    ``blocked``: see :class:`Blocked`. ``prefix``: keys/values ``[B,KV,P,hd]`` attended before ``k``/``v`` (one
    softmax over both; ``mask [B,T,P+S]``), each read where it lies instead of concatenated (:class:`KVPrefix`).
    """
    b, t, h, hd = q.shape
    kvh, g = cfg.n_kv_heads, h // cfg.n_kv_heads
    qg = q.reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, hd)
    if blocked is not None:
        if prefix is not None:
            raise ValueError("blocked attention over a cache with a shared prefix is not supported")
        return _blocked_attention(cfg, qg, k, v, mask, blocked).reshape(b, kvh, g, t, hd).transpose(
            0, 3, 1, 2, 4).reshape(b, t, h * hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32)
    if prefix is not None:
        scores = jnp.concatenate([jnp.einsum("bkqd,bksd->bkqs", qg, prefix[0], preferred_element_type=jnp.float32),
                                  scores], axis=-1)
    scores = softcap(scores * cfg.scale, cfg.attn_softcap).reshape(b, kvh, g, t, -1)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kvh, g * t, -1)
    if prefix is None:
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    else:
        p, f32 = prefix[1].shape[2], jnp.float32  # the two partial sums in float32, rounded once as one product is
        out = (jnp.einsum("bkqs,bksd->bkqd", probs[..., :p], prefix[1], preferred_element_type=f32)
               + jnp.einsum("bkqs,bksd->bkqd", probs[..., p:], v, preferred_element_type=f32)).astype(v.dtype)
    return out.reshape(b, kvh, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)


def layer_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, layer: jax.Array, mask: jax.Array,
                    blocked: Blocked | None = None, prefix: KVPrefix | None = None, *,
                    kernel: bool = True) -> jax.Array:
    """:func:`attention` of ``q [B,T,H,hd]`` over layer ``layer`` of a whole cache ``k``/``v`` ``[L,B,KV,S,hd]``
    (``mask [B,T,S]``, or ``[B,T,P+S]`` after a shared ``prefix``; ``blocked``: only the first ``span`` slots)
    -> ``[B,T,H*hd]``. With ``kernel``, one new token a row (``T = 1``, a decode step) is read in place by the
    CPU kernel of :mod:`jaxpersona.model.cache_attention` where it applies on a CPU backend; else (and for a
    chunk of several tokens, a server's prefill: a small matmul, faster in XLA) the layer's slices, by XLA.
    The kernel is chosen here, not by ``lax.platform_dependent``: that is a conditional, and XLA:CPU copies a
    whole cache into it. The same numbers for any ``blocked`` span that covers a row's keys."""
    sm = k.shape[3] if blocked is None else blocked.span
    pkv = None if prefix is None else (prefix.k, prefix.v)
    if (kernel and q.shape[1] == 1 and jax.default_backend() == "cpu" and sm <= k.shape[3]
            and cache_attention.applies(cfg, q, k)):
        width = sm + (0 if prefix is None else prefix.k.shape[3])
        return cache_attention.attend(cfg, q, k, v, layer, mask[..., :width], pkv)
    pre = None if pkv is None else (pkv[0][layer], pkv[1][layer])
    return attention(cfg, q, k[layer], v[layer], mask, blocked, pre)


def _blocked_attention(cfg: ModelConfig, qg: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                       blocked: Blocked) -> jax.Array:
    """``qg [B, KV, G*T, hd]`` over the first ``span`` slots of k/v ``[B, KV, S, hd]`` in blocks, scanned in
    slot order with a running max ``m``, sum ``l`` and output ``acc`` (float32) -> ``[B, KV, G*T, hd]``."""
    bs, span = blocked.block, blocked.span
    if span % bs or span > k.shape[2]:
        raise ValueError(f"blocked attention: span {span} must be a multiple of the block {bs} and <= {k.shape[2]}")
    b, kvh, gt, hd = qg.shape
    t = mask.shape[1]
    g = gt // t
    nb = span // bs
    low = jnp.finfo(jnp.float32).min
    def step(carry: tuple[jax.Array, jax.Array, jax.Array], xs: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        m, l, acc = carry
        kk, vv, mm = xs
        s = jnp.einsum("bkqd,bksd->bkqs", qg, kk, preferred_element_type=jnp.float32) * cfg.scale
        s = softcap(s, cfg.attn_softcap).reshape(b, kvh, g, t, bs)
        s = jnp.where(mm[:, None, None], s, low).reshape(b, kvh, gt, bs)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        return (m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv), None

    init = (jnp.full((b, kvh, gt), low, jnp.float32), jnp.zeros((b, kvh, gt), jnp.float32),
            jnp.zeros((b, kvh, gt, hd), jnp.float32))
    carry = init
    for i in range(nb):  # static slices, unrolled: each block is read in place (no transposed copy of the span)
        sl = slice(i * bs, (i + 1) * bs)
        carry, _ = step(carry, (k[:, :, sl], v[:, :, sl], mask[:, :, sl]))
    _, l, acc = carry
    return (acc / l[..., None]).astype(v.dtype)


def unembed(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Final norm + LM head: ``[..., D] -> [..., V]`` float32 logits."""
    x = rms_norm(h, params["final_norm"], cfg.rms_eps, cfg.norm_offset)
    return _head_slice(params, cfg, x, jnp.int32(0), cfg.vocab_size)


VOCAB_CHUNK = 65536  # vocabularies larger than this (Gemma's 262k) are reduced chunk by chunk
SCORE_CHUNK = 4096  # forward-only log-probs of many positions: chunks this size keep the logits in cache


def score_vocab_chunk(rows: int, vocab: int) -> int:
    """The vocabulary chunk for forward-only :func:`token_logprobs` of ``rows`` positions: ``SCORE_CHUNK`` once
    the ``[rows, V]`` logits pass 16 MiB, else ``VOCAB_CHUNK``. Measured on a 2-core CPU, SmolLM2's 49k
    vocabulary: 4 x 144 positions (a sweep chunk) 227 -> 139 ms, 384 positions 149 -> 95 ms; 32 positions
    are slower chunked (18 -> 22 ms), and so is the gradient (430 -> 560 ms), which keeps ``VOCAB_CHUNK``.
    Small chunks are used only where they are strided with a multiple of 256 ids each (SmolLM2's 49,152 and
    Gemma's 262,144 ids): a vocabulary split over a mesh's ``model`` axis then splits every chunk evenly, so no
    device gathers the head. Other vocabularies (Qwen's 151,936, Llama 3's 128,256) keep ``VOCAB_CHUNK``."""
    if rows * vocab < 1 << 22:
        return VOCAB_CHUNK
    n = vocab_stride(vocab, SCORE_CHUNK)
    return SCORE_CHUNK if n and (vocab // n) % 256 == 0 else VOCAB_CHUNK


def _head_slice(params: Params, cfg: ModelConfig, x: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """Logits of vocabulary ids ``start .. start+size-1`` for the normed ``x [..., D]``: ``[..., size]`` float32.
    A tied head contracts against ``[V, D]`` directly: no transposed copy of the embedding. A head held as its
    bits (inside :func:`_vocab_scan`'s loop, :func:`cpu_loop_weights`) is read as bfloat16."""
    if cfg.tie_embeddings:
        w = jax.lax.dynamic_slice_in_dim(params["embed"], start, size, axis=0)
    else:
        w = jax.lax.dynamic_slice_in_dim(params["lm_head"], start, size, axis=1)
    return _head_logits(cfg, x, w)


def _head_logits(cfg: ModelConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., D]`` against a slice of the head: ``w [v, D]`` (tied: rows of the embedding) or ``[D, v]``
    (``lm_head``), possibly as its bits -> softcapped float32 logits ``[..., v]``."""
    w = from_bits(w)
    spec = "...d,vd->...v" if cfg.tie_embeddings else "...d,dv->...v"
    return softcap(jnp.einsum(spec, as_operand(x, w), w, preferred_element_type=jnp.float32), cfg.final_softcap)


def vocab_stride(vocab: int, chunk: int) -> int:
    """The number of strided vocabulary chunks for :func:`_vocab_scan`: the smallest divisor ``n`` of ``vocab``
    with ``vocab / n <= chunk``, or 0 when ``vocab`` has none near ``ceil(vocab / chunk)`` (then contiguous,
    shifted chunks are used)."""
    need = -(-vocab // chunk)
    return next((n for n in range(need, 4 * need + 1) if vocab % n == 0), 0)


def _vocab_scan(params: Params, cfg: ModelConfig, xs: tuple[jax.Array, ...], chunk: int, init: Any,
                step: Callable[[Any, tuple[jax.Array, ...], jax.Array], Any]) -> Any:
    """Fold ``step(carry, logits per x [..., c], ids [c]) -> carry`` over the vocabulary in chunks of ``c``
    (ids ``-1`` mark padding a step must ignore). Each chunk's logits are recomputed in the backward
    (``jax.checkpoint``): ``[..., V]`` never exists.

    Chunks are **strided** when the vocabulary allows (:func:`vocab_stride`: chunk ``i`` holds ids ``i, i+n,
    i+2n, ...``): the head viewed as ``[D, V/n, n]`` is indexed on its minor axis, so a head whose vocabulary is
    split over a mesh's ``model`` axis is read shard-locally (a contiguous slice of a sharded dimension makes the
    partitioner gather the whole head in every chunk). Otherwise contiguous chunks, the last shifted back to end
    at ``V`` (ids it shares with the previous chunk come as ``-1``)."""
    v = cfg.vocab_size
    size = min(chunk, v)
    normed = tuple(rms_norm(x, params["final_norm"], cfg.rms_eps, cfg.norm_offset) for x in xs)
    n = vocab_stride(v, size)
    if n:
        if cfg.tie_embeddings:
            head = params["embed"].reshape(v // n, n, cfg.d_model)
        else:
            head = params["lm_head"].reshape(cfg.d_model, v // n, n)

        def scan(w3: jax.Array) -> Any:
            @jax.checkpoint
            def strided(carry: Any, i: jax.Array) -> tuple[Any, None]:
                ids = jnp.arange(v // n, dtype=jnp.int32) * n + i
                w = jax.lax.dynamic_index_in_dim(w3, i, axis=1 if cfg.tie_embeddings else 2, keepdims=False)
                return step(carry, tuple(_head_logits(cfg, x, w) for x in normed), ids), None

            return jax.lax.scan(strided, init, jnp.arange(n, dtype=jnp.int32))[0]

        return cpu_loop_weights(scan, head)

    key = "embed" if cfg.tie_embeddings else "lm_head"

    def chunks(head: jax.Array) -> Any:
        @jax.checkpoint
        def body(carry: Any, i: jax.Array) -> tuple[Any, None]:
            start = jnp.minimum(i * size, v - size)
            ids = start + jnp.arange(size, dtype=jnp.int32)
            ids = jnp.where(ids >= i * size, ids, -1)
            logits = tuple(jnp.where(ids >= 0, _head_slice({key: head}, cfg, x, start, size), -jnp.inf)
                           for x in normed)
            return step(carry, logits, ids), None

        return jax.lax.scan(body, init, jnp.arange(-(-v // size), dtype=jnp.int32))[0]

    return cpu_loop_weights(chunks, params[key])


def token_logprobs(params: Params, cfg: ModelConfig, h: jax.Array, tokens: jax.Array,
                   chunk: int = VOCAB_CHUNK) -> jax.Array:
    """``log p(tokens)`` ``[...]`` float32 from the last residual ``h [..., D]``: the token's logit minus the
    log-sum-exp of all logits. The ``[..., V]`` log-softmax is never formed; above ``chunk`` ids the
    vocabulary is reduced in chunks (an online log-sum-exp), so neither are the ``[..., V]`` logits."""
    if cfg.vocab_size <= chunk:
        logits = unembed(params, cfg, h)
        target = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1)
    lead = h.shape[:-1]
    init = (jnp.full(lead, -jnp.inf), jnp.zeros(lead), jnp.zeros(lead))

    def step(carry, logits, ids):
        m, z, target = carry
        (lg,) = logits
        m_new = jnp.maximum(m, lg.max(-1))
        z = z * jnp.exp(m - m_new) + jnp.exp(lg - m_new[..., None]).sum(-1)
        target = target + jnp.where(ids == tokens[..., None], lg, 0.0).sum(-1)
        return m_new, z, target

    m, z, target = _vocab_scan(params, cfg, (h,), chunk, init, step)
    return target - (m + jnp.log(z))


def token_kl(params: Params, cfg: ModelConfig, h_base: jax.Array, h_new: jax.Array,
             chunk: int = VOCAB_CHUNK) -> jax.Array:
    """``KL(p_base || p_new)`` ``[...]`` float32 of the next-token distributions at residuals ``h_base``,
    ``h_new`` ``[..., D]`` (gradients flow through both; stop the base's yourself). Above ``chunk`` ids the
    vocabulary is reduced in chunks: ``sum_v p_b (z_b - z_n) - lse_b + lse_n`` with online log-sum-exps."""
    if cfg.vocab_size <= chunk:
        lb = jax.nn.log_softmax(unembed(params, cfg, h_base), axis=-1)
        zn = unembed(params, cfg, h_new)
        return (jnp.exp(lb) * (lb - zn)).sum(-1) + jax.nn.logsumexp(zn, axis=-1)
    lead = h_base.shape[:-1]
    init = (jnp.full(lead, -jnp.inf), jnp.zeros(lead), jnp.zeros(lead), jnp.full(lead, -jnp.inf), jnp.zeros(lead))

    def step(carry, logits, ids):
        mb, zb, s, mn, zn = carry
        lb, ln = logits
        mb_new, mn_new = jnp.maximum(mb, lb.max(-1)), jnp.maximum(mn, ln.max(-1))
        eb = jnp.exp(lb - mb_new[..., None])
        rescale = jnp.exp(mb - mb_new)
        diff = jnp.where(ids >= 0, lb - ln, 0.0)
        s = s * rescale + (eb * diff).sum(-1)
        zb = zb * rescale + eb.sum(-1)
        zn = zn * jnp.exp(mn - mn_new) + jnp.exp(ln - mn_new[..., None]).sum(-1)
        return mb_new, zb, s, mn_new, zn

    mb, zb, s, mn, zn = _vocab_scan(params, cfg, (h_base, h_new), chunk, init, step)
    return s / zb - (mb + jnp.log(zb)) + (mn + jnp.log(zn))


# --- input checks (outside jit) ---------------------------------------------------------------
def check_tokens(cfg: ModelConfig, tokens: Any, valid: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a host-side batch: ``tokens [B, T]`` ids in ``[0, vocab)``, ``valid`` of the same shape.

    Returns numpy ``(tokens int32, valid bool)``; raises :class:`~jaxpersona.errors.InputError`.
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise errors.InputError(f"empty batch (tokens shape {tokens.shape}); give at least one non-empty prompt")
    if tokens.ndim != 2:
        raise errors.InputError(f"tokens must be [B, T] (2-D), got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise errors.InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise errors.InputError(
            f"token ids must be in [0, vocab_size={cfg.vocab_size}), got min {tokens.min()} max {tokens.max()}; "
            "was the batch encoded with another model's tokenizer?"
        )
    valid = np.ones(tokens.shape, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != tokens.shape:
        raise errors.InputError(f"valid mask shape {valid.shape} != tokens shape {tokens.shape}")
    return tokens.astype(np.int32), valid


def check_context(cfg: ModelConfig, valid: np.ndarray, new_tokens: int = 0) -> None:
    """Refuse a batch whose longest prompt (valid tokens, not padding) + ``new_tokens`` exceeds the context."""
    longest = int(np.asarray(valid).sum(axis=1).max())
    if longest + new_tokens > cfg.max_position:
        raise errors.ContextLengthError(
            f"prompt of {longest} tokens (+{new_tokens} new) exceeds the model's context of {cfg.max_position} "
            "tokens; shorten the prompt or ask for fewer new tokens"
        )


# --- the block --------------------------------------------------------------------------------
def as_operand(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x`` as the left operand of a product with ``w``: cast to ``w``'s dtype when the weight is stored narrower
    (bfloat16 weights under float32 activations, :func:`~jaxpersona.model.params.with_matmul_dtype`)."""
    return x.astype(w.dtype) if jnp.finfo(w.dtype).bits < jnp.finfo(x.dtype).bits else x


@jax.custom_jvp
def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


@_bits.defjvp
def _bits_jvp(primals: Any, tangents: Any) -> Any:
    raise errors.UnsupportedDtypeError(
        "gradients with respect to bfloat16 weights are not supported (the forward reads them as their bits); "
        "differentiate a float32 model, or only adapter factors / intervention arrays (the frozen weights are fine)")


def as_bits(tree: Any) -> Any:
    """bfloat16 leaves as their ``uint16`` bits (a free bitcast): how stacked weights enter a loop. XLA:CPU
    otherwise converts a bfloat16 loop operand to float32 whole before the loop and each slice back inside it,
    so every step reads float32 weights (measured: a 30-layer scan of bf16 products 155 -> 134 ms; decode, which
    streams the weights, gains more). :func:`from_bits` undoes it on the slice. Differentiating through it with
    respect to the weights is an error, never a silent zero gradient."""
    return jax.tree.map(lambda x: _bits(x) if x.dtype == jnp.bfloat16 else x, tree)


_as_bits_jit = jax.jit(as_bits)


def from_bits(tree: Any) -> Any:
    """The inverse of :func:`as_bits` (params hold no ``uint16`` leaves of their own: a ``uint16`` leaf is a
    bfloat16 weight's bits, from :func:`as_bits` or :func:`layers_as_bits`)."""
    return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x, tree)


def layers_as_bits(params: Params) -> Params:
    """``params`` with the bfloat16 stacked layer weights held as their ``uint16`` bits, converted once: for a
    caller that runs many jitted forwards on a CPU (the serving engine, one call per decode step). A bitcast
    inside a jitted call is a copy of every weight on XLA:CPU (~50 ms a decode step for SmolLM2-135M);
    weights that arrive as bits need none, and :func:`cpu_loop_weights` passes them through. The forward reads
    such params as it reads the bfloat16 ones (the loops take :func:`from_bits` of each slice), on any platform;
    gradients with respect to them are not defined. On one CPU device the bits share the bfloat16 weights' memory.
    Params without bfloat16 layer weights, or not on CPU devices, come back as they are."""
    leaves = jax.tree.leaves(params["layers"])
    if not all(d.platform == "cpu" for x in leaves if isinstance(x, jax.Array) for d in x.devices()):
        return params  # a GPU / TPU compile keeps bfloat16 loop operands as they are

    def bits(x: jax.Array) -> jax.Array:
        if not isinstance(x, jax.Array) or x.dtype != jnp.bfloat16:
            return x
        devices = x.devices()
        if len(devices) == 1:  # a view of the same memory, no copy; placed as the weights were (committed or not)
            view = np.asarray(x).view(np.uint16)
            return jax.device_put(view, next(iter(devices))) if x.committed else jax.device_put(view)
        return _as_bits_jit(x)  # sharded: keeps its sharding

    return {**params, "layers": jax.tree.map(bits, params["layers"])}


def cpu_loop_weights(loop: Callable[[Any], Any], weights: Any) -> Any:
    """``loop(weights)``, where ``loop`` slices ``weights`` inside a ``lax`` loop and applies :func:`from_bits` to
    each slice. Compiled for a CPU, bfloat16 weights enter the loop as their bits (:func:`as_bits`); for any other
    platform (a GPU, a TPU, or a deviceless TPU compile on a CPU host) as they are: there XLA keeps them bfloat16,
    and the bitcast would add a copy of every weight (``jax.lax.platform_dependent`` picks at lowering)."""
    if not any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(weights)):
        return loop(weights)
    return jax.lax.platform_dependent(cpu=lambda: loop(as_bits(weights)), default=lambda: loop(weights))


class LayerWeight(NamedTuple):
    """One layer's weight left in its stack ``[L, in, out]``: ``stack[layer]``, read in place by the CPU kernel
    (:mod:`jaxpersona.model.skinny`) instead of being sliced out (a copy on XLA:CPU). See ``run_layers(...,
    cpu_kernel=True)``."""

    stack: jax.Array
    layer: jax.Array


KERNEL_WEIGHTS = tuple(TARGETS.values())  # the projections the kernel reads in place (a LoRA's targets)


def matmul(x: jax.Array, w: jax.Array | LayerWeight) -> jax.Array:
    """``x @ w`` ``[..., in] x [in, out]``, accumulated and returned in ``x``'s dtype; with a narrower weight the
    product is taken in the weight's dtype (:func:`as_operand`). A :class:`LayerWeight` is multiplied by
    :func:`jaxpersona.model.skinny.matmul` (float32)."""
    if isinstance(w, LayerWeight):
        return skinny.matmul(x, w.stack, w.layer)
    if w.dtype == x.dtype:
        return x @ w
    return jnp.dot(as_operand(x, w), w, preferred_element_type=x.dtype)


def linear(lp: Params, lora: LayerFactors, name: str, x: jax.Array) -> jax.Array:
    """``x @ lp[name]``, plus a low-rank adapter's ``(x @ A) @ B`` when ``lora`` holds one for ``name``.

    ``lora`` is this layer's slice of :func:`jaxpersona.model.lora.layer_factors` (``{}``: no adapter):
    ``a [in, r]``, ``b [r, out]`` (scale folded in), or a stack ``a [K, in, r]``, ``b [K, r, out]`` with
    ``select [B]`` choosing each example's adapter. Merged weights are never formed.
    """
    ad = lora.get(name)
    if ad is not None and "select" in ad:  # one adapter per example, gathered from the stack
        a, b = ad["a"].astype(x.dtype)[ad["select"]], ad["b"].astype(x.dtype)[ad["select"]]
        return matmul(x, lp[name]) + jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, a), b)
    # tokens flattened to one [B*T, in] matrix (a free reshape): the backward's weight-side products then
    # contract one row-major axis; with [B, T] kept apart XLA:CPU transposes the activations first (2x slower)
    flat = x.reshape(-1, x.shape[-1])
    y = matmul(flat, lp[name])
    if ad is not None:
        y = y + (flat @ ad["a"].astype(x.dtype)) @ ad["b"].astype(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def project_qkv(
    cfg: ModelConfig, lp: Params, lora: LayerFactors, x: jax.Array, rope: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention inputs of one block: q ``[B,T,H,hd]``, k/v ``[B,KV,T,hd]`` (rope applied). ``lora``: this
    layer's adapter factors (``{}`` for none)."""
    b, t, _ = x.shape
    eps, off = cfg.rms_eps, cfg.norm_offset
    hx = rms_norm(x, lp["attn_norm"], eps, off)
    q, k, v = linear(lp, lora, "wq", hx), linear(lp, lora, "wk", hx), linear(lp, lora, "wv", hx)
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], eps, off), rms_norm(k, lp["k_norm"], eps, off)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    kv_names = ("batch", "kv_heads", "seq", "head_dim")
    return (constrain(q, "batch", "seq", "heads", "head_dim"), constrain(k.transpose(0, 2, 1, 3), *kv_names),
            constrain(v.transpose(0, 2, 1, 3), *kv_names))


def finish_block(
    cfg: ModelConfig, lp: Params, lora: LayerFactors, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
    mask: jax.Array, blocked: Blocked | None = None, prefix: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Attention over k/v ``[B,KV,S,hd]`` (mask ``[B,T,S]``; ``blocked``: see :class:`Blocked`; ``prefix``: this
    layer's shared prefix keys/values, see :func:`attention`), output projection, MLP; residual adds."""
    return block_tail(cfg, lp, lora, x, attention(cfg, q, k, v, mask, blocked, prefix))


def block_tail(cfg: ModelConfig, lp: Params, lora: LayerFactors, x: jax.Array, heads: jax.Array) -> jax.Array:
    """The rest of a block after its attention ``heads [B,T,H*hd]``: output projection, MLP; residual adds."""
    eps, off = cfg.rms_eps, cfg.norm_offset
    attn = linear(lp, lora, "wo", constrain(heads, "batch", "seq", "heads"))
    if cfg.o_bias:
        attn = attn + lp["bo"]
    if cfg.sandwich_norm:
        attn = rms_norm(attn, lp["post_attn_norm"], eps, off)
    x = constrain(x + attn, "batch", "seq", "embed")
    hx = rms_norm(x, lp["mlp_norm"], eps, off)
    hidden = activation(cfg.activation, linear(lp, lora, "w_gate", hx)) * linear(lp, lora, "w_up", hx)
    mlp = linear(lp, lora, "w_down", constrain(hidden, "batch", "seq", "mlp"))
    if cfg.sandwich_norm:
        mlp = rms_norm(mlp, lp["post_mlp_norm"], eps, off)
    return constrain(x + mlp, "batch", "seq", "embed")


def block(cfg: ModelConfig, lp: Params, lora: LayerFactors, x: jax.Array, rope: tuple[jax.Array, jax.Array],
          mask: jax.Array) -> jax.Array:
    """One decoder block on ``x [B, T, D]`` attending to itself; ``lp`` = this layer's weights, ``lora`` its
    adapter factors (``{}`` for none)."""
    q, k, v = project_qkv(cfg, lp, lora, x, rope)
    return finish_block(cfg, lp, lora, x, q, k, v, mask)


# The block for a backward pass: only the projections' outputs (matmuls without batch dims) are kept for the
# backward; norms, rope, attention and activations are recomputed from them. The scan then stacks a few
# [L, B, T, *] residuals instead of every intermediate, which on CPU is what the step spent its time writing
# (`scripts/profile_ops.py train`: 3.8 -> 3.2 s per LoRA step of SmolLM2, batch 8 x 128).
remat_block = jax.checkpoint(block, static_argnums=(0,),
                             policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


# --- capture helpers --------------------------------------------------------------------------
def _reduce(h: jax.Array, reduce: Reduce, cmask: jax.Array) -> jax.Array:
    """``h [B,T,D]`` -> capture value under ``cmask [B,T]``."""
    if reduce == "tokens":
        return h
    w = cmask.astype(jnp.float32)
    if reduce == "mean":
        return (jnp.einsum("btd,bt->bd", h.astype(jnp.float32), w) / jnp.maximum(w.sum(1), 1.0)[:, None]).astype(
            h.dtype
        )
    last = jnp.max(jnp.where(cmask, jnp.arange(h.shape[1])[None, :], 0), axis=1)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]


# --- the forward, in pieces ------------------------------------------------------------------
class Prepared(NamedTuple):
    """Per-call tensors every layer needs: hook context, attention masks, rope tables."""

    ctx: HookContext
    mask_full: jax.Array  # [B, T, S]
    mask_local: jax.Array  # [B, T, S]
    rope_g: tuple[jax.Array, jax.Array]
    rope_l: tuple[jax.Array, jax.Array]
    k_valid: jax.Array  # [B, S]


def prepare(
    cfg: ModelConfig,
    valid: jax.Array,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
) -> Prepared:
    """Masks, rope tables and hook context for a ``[B, T]`` chunk written at ``cache_index`` (a scalar, or
    ``[B]``: each row its own slot, as in a continuously batched server). With a cache's shared
    :class:`KVPrefix` of ``P`` slots, the masks cover ``P + S`` keys and the hook context's slots count from the
    prefix's first (as in one cache of ``P + S`` slots); ``k_valid`` stays the cache's own ``[B, S]``."""
    b, t = valid.shape
    valid = valid.astype(bool)
    index = jnp.asarray(cache_index, jnp.int32)
    prefix = None if cache is None else cache.prefix
    if positions is None:
        prior = jnp.zeros((b,), jnp.int32) if cache is None else cache.valid.sum(axis=1).astype(jnp.int32)
        if prefix is not None:
            prior = prior + prefix.valid.sum(axis=1).astype(jnp.int32)
        positions = jnp.maximum(prior[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    slots = chunk_slots(index, b, t)
    if cache is None:
        k_valid = valid
    elif index.ndim == 0:
        k_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, index, axis=1)
    else:
        k_valid = cache.valid.at[jnp.arange(b)[:, None], slots].set(valid)
    keys = k_valid
    if prefix is not None:  # the prefix's slots come first
        slots, keys = slots + prefix.valid.shape[1], jnp.concatenate([prefix.valid.astype(bool), k_valid], 1)
    mask_full, mask_local = attention_masks(cfg, slots, keys)
    rope_g = rope_tables(cfg.rope.inv_freq(cfg.head_dim), positions)
    rope_l = rope_tables(cfg.rope_local.inv_freq(cfg.head_dim), positions) if cfg.rope_local else rope_g
    return Prepared(HookContext(positions, slots, valid), mask_full, mask_local, rope_g, rope_l, k_valid)


def chunk_slots(index: jax.Array, b: int, t: int) -> jax.Array:
    """Cache slots ``[B, T]`` of a ``[B, T]`` chunk written at ``index`` (scalar, or ``[B]`` per row)."""
    start = index[:, None] if index.ndim else index
    return start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def streams_cache(h: jax.Array, index: jax.Array, blocked: Blocked | None) -> bool:
    """Whether :func:`run_layers` scans a cache layer by layer instead of carrying it: several new tokens a row
    (``h [..., B, T, D]`` with ``T > 1``) written at one slot for every row (``index`` a scalar), no blocked
    span, on a CPU backend. Decode steps keep the carried cache (written and read in place, see
    :func:`layer_attention`), and so do a server's chunks (a slot per row, a blocked span)."""
    return h.shape[-2] > 1 and index.ndim == 0 and blocked is None and jax.default_backend() == "cpu"


def write_cache(c: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """Write one layer's keys or values ``new [B, KV, T, hd]`` into ``c [L, B, KV, S, hd]`` at slot ``index``
    (scalar: one in-place slice; ``[B]``: a scatter, each row at its own slot)."""
    new = new.astype(c.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(c, new[None], (layer, jnp.int32(0), jnp.int32(0), index, jnp.int32(0)))
    b, _, t, _ = new.shape
    return c.at[layer, jnp.arange(b)[:, None], :, chunk_slots(index, b, t)].set(jnp.swapaxes(new, 1, 2))


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """``resid[0]``: token embeddings ``[B, T, D]`` (Gemma scales by sqrt(d) in the model dtype). On a mesh the
    table is first brought to its activation layout (vocabulary over model, ``d_model`` whole: an FSDP table is
    gathered over data once, as every FSDP weight is), so the lookup is a local gather plus one all-reduce."""
    h = constrain(params["embed"], "vocab", "embed")[tokens].astype(activation_dtype(params))
    if cfg.embed_scale != 1.0:
        h = h * jnp.asarray(cfg.embed_scale, h.dtype)
    return h


Buf = TypeVar("Buf")  # what a recorder carries through the layer scan: an array or a pytree of arrays


class Record(Protocol[Buf]):
    """What :func:`run_layers` calls after each block: ``record(buf, layer, resid[layer]) -> buf`` (e.g. a
    :class:`Recorder`)."""

    def __call__(self, buf: Buf, layer: jax.Array, h: jax.Array, /) -> Buf: ...


class Recorder(NamedTuple):
    """Capture state: writes ``reduce(resid[l])`` into ``buf[slot_of[l]]`` for requested layers."""

    capture: Capture | None
    slot_of: np.ndarray  # [L+1] slot index or -1
    cmask: jax.Array

    @classmethod
    def make(cls, cfg: ModelConfig, capture: Capture | None, cmask: jax.Array) -> Recorder:
        slot_of = np.full(cfg.n_resid, -1, np.int32)
        if capture is not None:
            capture.validate(cfg)
            for i, l in enumerate(capture.layers):
                slot_of[l] = i
        return cls(capture, slot_of, cmask.astype(bool))

    def empty(self, h: jax.Array) -> jax.Array:
        if self.capture is None:
            return jnp.zeros((0,), h.dtype)
        reduce, cmask = self.capture.reduce, self.cmask
        probe = jax.eval_shape(lambda x: _reduce(x, reduce, cmask), h)
        return jnp.zeros((len(self.capture.layers), *probe.shape), h.dtype)

    def __call__(self, buf: jax.Array, layer: jax.Array, h: jax.Array) -> jax.Array:
        if self.capture is None:
            return buf
        s = jnp.asarray(self.slot_of)[layer]
        i = jnp.maximum(s, 0)
        new = jnp.where(s >= 0, _reduce(h, self.capture.reduce, self.cmask), buf[i])
        return jax.lax.dynamic_update_index_in_dim(buf, new, i, axis=0)


def apply_hook(hook: Hook | None, layer: jax.Array, h: jax.Array, ctx: HookContext) -> jax.Array:
    return h if hook is None else hook(layer, h, ctx).astype(h.dtype)


def run_layers(
    params: Params,
    cfg: ModelConfig,
    h: jax.Array,
    prep: Prepared,
    buf: Buf,
    record: Record[Buf],
    *,
    hook: Hook | None = None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    span: tuple[jax.Array, jax.Array] | None = None,
    adapter: Adapter | AdapterStack | None = None,
    adapter_select: jax.Array | None = None,
    remat: bool = False,
    blocked: Blocked | None = None,
    read_only: bool = False,
    cpu_kernel: bool = False,
) -> tuple[jax.Array, Buf, KVCache | None]:
    """Blocks ``0..L-1`` (or only ``start <= l < stop`` with ``span``) as one ``lax.scan``.

    After block ``l`` the hook and the recorder see ``resid[l+1]``: ``buf = record(buf, l + 1, h)``
    (a :class:`Recorder`, or any :class:`Record` over a pytree ``buf``, e.g. a tuple of arrays). ``span`` may
    be traced (one compile serves every split point): layers outside it are skipped with ``lax.cond``. ``adapter``
    (``adapter_select [B]`` for a stack): its per-layer factors are scanned beside the layer weights. ``remat``
    (no cache; for gradients): see :func:`remat_block`. ``blocked`` (with a cache): attention over the cache's
    first slots in blocks, see :class:`Blocked`. ``read_only`` (with a cache): each block attends over its
    layer of the cache with the new keys/values written into a copy of that layer only, and no cache is
    returned — the cache is never carried through the scan, so one shared cache serves many vmapped rows
    (a sweep's grid points over one prompt prefix) without a per-row copy of every layer. ``cpu_kernel``: the
    float32 projections (:data:`KERNEL_WEIGHTS`) are read in place from their stacks by the CPU kernel
    (:class:`LayerWeight`, :mod:`jaxpersona.model.skinny`) where it is available — for few-row calls (a decode
    step) on one CPU device; the other weights are sliced as before. With a carried cache,
    attention reads its layer of the cache (and of a shared prefix) in place too (:func:`layer_attention`).

    Several new tokens a row (a prefill: ``T > 1``) at one slot for all rows, on a CPU: the cache is not carried
    but scanned, each block's layer in and that layer with its new keys/values out (:func:`streams_cache`).
    Carried, XLA:CPU copied the whole cache at every layer of a prefill (a 40 x 64-token prefill into 96 slots
    paid ~20% over the same forward without a cache). The same keys, values and logits: bit for bit on SmolLM2's
    prefill, to float rounding elsewhere (XLA fuses the two programs differently).
    """
    index = jnp.asarray(cache_index, jnp.int32)
    shared = cache if read_only else None  # read, never carried
    prefix = None if cache is None else cache.prefix  # read, never carried (see KVPrefix)
    if prefix is not None and read_only:
        raise ValueError("a read-only cache cannot carry a shared prefix")
    stream = not read_only and cache is not None and streams_cache(h, index, blocked)

    def make_step(stacked: Params) -> Callable[..., Any]:
        def step(carry, xs):
            h, buf, ck, cv = carry
            h = constrain(h, "batch", "seq", "embed")
            lp, lora, layer, is_sliding, kv_in = xs
            if stream:  # this layer of the cache [B, KV, S, hd], not the carried whole
                ck, cv = kv_in
            mask = jnp.where(is_sliding, prep.mask_local, prep.mask_full)
            rope = jax.tree.map(lambda a, c: jnp.where(is_sliding, a, c), prep.rope_l, prep.rope_g)

            def run(h, buf, ck, cv):
                w = from_bits(lp if span is None else jax.tree.map(lambda x: x[layer], stacked))  # see `xs` below
                if cpu_kernel:  # these slices are then unused, and XLA drops them (bfloat16 bits stay sliced)
                    w = {**w, **{n: LayerWeight(stacked[n], layer) for n in KERNEL_WEIGHTS
                                 if skinny.applies(h, stacked[n])}}
                if cache is None:
                    h = (remat_block if remat else block)(cfg, w, lora, h, rope, mask)
                elif shared is not None or stream:  # one layer of the cache, with the new keys/values written in:
                    # read_only, this layer of the shared cache (a copy, dropped after); streamed, the scan's slice
                    # (handed on as the scan's output)
                    q, k, v = project_qkv(cfg, w, lora, h, rope)
                    kl, vl = (shared.k[layer], shared.v[layer]) if shared is not None else (ck, cv)
                    kl = write_cache(kl[None], k, jnp.int32(0), index)[0]
                    vl = write_cache(vl[None], v, jnp.int32(0), index)[0]
                    pre = None if prefix is None else (prefix.k[layer], prefix.v[layer])  # None when read_only
                    h = finish_block(cfg, w, lora, h, q, kl, vl, mask, blocked, pre)
                    if stream:
                        ck, cv = kl, vl
                else:  # write the new keys/values in place first, then read this layer's slice
                    q, k, v = project_qkv(cfg, w, lora, h, rope)
                    ck, cv = write_cache(ck, k, layer, index), write_cache(cv, v, layer, index)
                    heads = layer_attention(cfg, q, ck, cv, layer, mask, blocked, prefix, kernel=cpu_kernel)
                    h = block_tail(cfg, w, lora, h, heads)
                h = apply_hook(hook, layer + 1, h, prep.ctx)
                return h, record(buf, layer + 1, h), ck, cv

            if span is None:
                out = run(h, buf, ck, cv)
            else:
                inside = (layer >= span[0]) & (layer < span[1])
                out = jax.lax.cond(inside, run, lambda *a: a, h, buf, ck, cv)
            if stream:
                return (*out[:2], carry[2], carry[3]), out[2:]
            return out, None
        return step

    carried = None if read_only else cache
    ck = carried.k if carried is not None and not stream else jnp.zeros((0,), h.dtype)
    cv = carried.v if carried is not None and not stream else jnp.zeros((0,), h.dtype)
    kv_in = (carried.k, carried.v) if stream and carried is not None else None
    lora = layer_factors(adapter, adapter_select)
    # with a span, each layer's weights are read inside its branch: XLA copies a layer's slice of the stacked
    # weights out, and a skipped layer should not pay for that copy (a sweep chunk skips the layers below its start)
    def scan(stacked: Params) -> Any:
        xs = (stacked if span is None else None, lora, jnp.arange(cfg.n_layers, dtype=jnp.int32),
              jnp.asarray(cfg.layer_sliding), kv_in)
        carry, kv_out = jax.lax.scan(make_step(stacked), (h, buf, ck, cv), xs)
        return (*carry[:2], *kv_out) if stream else carry

    h, buf, ck, cv = cpu_loop_weights(scan, params["layers"])
    return h, buf, (KVCache(ck, cv, prep.k_valid, prefix) if carried is not None else None)


def final_hidden(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array, hook: Hook | None = None,
                 span: tuple[Any, Any] | None = None, h: jax.Array | None = None, *,
                 adapter: Adapter | AdapterStack | None = None, adapter_select: jax.Array | None = None,
                 remat: bool = False) -> jax.Array:
    """The last residual ``resid[L]`` ``[B, T, D]`` of a full-sequence forward (no cache, no logits).

    With ``span=(start, L)`` and ``h = resid[start]`` given, only blocks ``start..L-1`` run (a prefix
    computed once and reused, e.g. when only later layers depend on what is being optimised).
    ``adapter`` / ``adapter_select``: as in :func:`forward`; ``remat``: recompute the cheap parts of each block
    in the backward (:func:`remat_block`), for losses that are differentiated."""
    prep = prepare(cfg, valid)
    if h is None:
        h = apply_hook(hook, jnp.int32(0), embed(params, cfg, tokens), prep.ctx)
    h, _, _ = run_layers(params, cfg, h, prep, jnp.zeros((0,), h.dtype), Recorder.make(cfg, None, valid), hook=hook,
                         span=span, adapter=adapter, adapter_select=adapter_select, remat=remat)
    return h


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    *,
    valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    capture: Capture | None = None,
    capture_mask: jax.Array | None = None,
    hook: Hook | None = None,
    logits: bool | Literal["last"] = True,
    adapter: Adapter | AdapterStack | None = None,
    adapter_select: jax.Array | None = None,
    blocked: Blocked | None = None,
    cpu_kernel: bool = False,
) -> ForwardOutput:
    """Run the model on ``tokens [B, T]`` (int32).

    Args:
      valid: ``[B, T]`` bool, False on (left) padding. Default: all True.
      positions: ``[B, T]`` rope positions. Default: ``cumsum(valid) - 1`` (+ tokens already cached).
      cache: a :class:`KVCache`; the ``T`` new keys/values are written at slots
        ``cache_index .. cache_index + T - 1`` and attention covers the whole cache. ``cache_index`` is a
        scalar or ``[B]`` (each row written at its own slot).
      capture: which ``resid`` points to return (see :class:`Capture`); ``capture_mask [B, T]``
        selects the tokens for ``mean``/``last`` (default ``valid``).
      hook: ``hook(layer, h, ctx) -> h`` applied at every ``resid[l]`` (an intervention). Not checked here (this
        runs traced): check it with :func:`jaxpersona.edit.interventions.check_for_model`, as ``Model.run`` does.
      logits: True for ``[B, T, V]``, ``"last"`` for the last position only ``[B, 1, V]``, False for none.
      adapter: a :class:`~jaxpersona.model.lora.Adapter` (or an ``AdapterStack`` with ``adapter_select [B]``,
        the adapter each example uses), applied inside every block: its per-layer factors are scanned beside
        the layer weights (``params`` stay the plain weights).
      blocked: with a cache, attend over its first ``span`` slots in blocks (:class:`Blocked`): a row's
        numbers do not depend on ``span``, so a server can attend over only the slots in use.
      cpu_kernel: read the float32 projections in place with the CPU kernel (see :func:`run_layers`).
    """
    chex.assert_rank(tokens, 2)
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
    prep = prepare(cfg, valid, positions, cache, cache_index)
    record = Recorder.make(cfg, capture, valid if capture_mask is None else capture_mask)
    h = apply_hook(hook, jnp.int32(0), embed(params, cfg, tokens), prep.ctx)
    buf = record(record.empty(h), jnp.int32(0), h)
    h, buf, new_cache = run_layers(
        params, cfg, h, prep, buf, record, hook=hook, cache=cache, cache_index=cache_index, adapter=adapter,
        adapter_select=adapter_select, blocked=blocked if cache is not None else None, cpu_kernel=cpu_kernel,
    )
    out_logits = None
    if logits == "last":
        out_logits = constrain(unembed(params, cfg, h[:, -1:]), "batch", "seq", "vocab")
    elif logits:
        out_logits = constrain(unembed(params, cfg, h), "batch", "seq", "vocab")
    return ForwardOutput(out_logits, buf if capture is not None else None, new_cache)


