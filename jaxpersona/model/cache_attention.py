"""A CPU kernel for a decode step's attention over one layer of the carried KV cache, read in place.

``attend(cfg, q, k, v, layer, mask, prefix)`` is :func:`jaxpersona.model.transformer.attention` of
``q [B, T, H, hd]`` over ``k[layer]``/``v[layer]`` (``k``/``v`` the whole cache ``[L, B, KV, S, hd]``), after the
slots of a shared prompt prefix if one is given (a :class:`~jaxpersona.model.transformer.KVPrefix`'s whole
``[L, B, KV, Pp, hd]``) -> ``[B, T, H*hd]``; ``mask [B, T, Pp + Sm]``, ``Sm <= S``: only the first ``Sm`` own slots
are read. Inside the layer scan XLA:CPU copies each layer's slice of the cache out before its two attention
products (~9% of a sampled 16x64 generation's op time); the kernel (``cache_attention.cc``, built with
:mod:`jaxpersona.model.skinny`'s kernels) reads it where it lies, and only the slots a row may attend.

Numerics: per (row, head) a fixed-order dot, XLA's softmax (a masked slot is skipped, as XLA's ``exp`` makes it
exactly 0) and the weighted sum in slot order: a row's numbers depend on its own query, keys, values and mask
only (any batch, grid point or thread count; a prefix's keys then the cache's give the bits of one cache
holding both), and differ from XLA's in the last bits. Under ``vmap`` the batch becomes more points of one
call, the prefix staying one shared array. No gradient: it serves forward-only decode steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpersona.model import skinny
from jaxpersona.model.config import ModelConfig

TARGET = skinny.ATTENTION_TARGET  # registered with the other kernels (skinny.KERNELS)


def applies(cfg: ModelConfig, q: jax.Array, k: jax.Array) -> bool:
    """Whether :func:`attend` may use the kernel: float32 query and cache, no attention softcap, a head size that
    is a multiple of 16, the kernels available."""
    return (q.dtype == jnp.float32 and k.dtype == jnp.float32 and cfg.attn_softcap is None
            and cfg.head_dim % 16 == 0 and skinny.available())


@jax.custom_batching.custom_vmap
def _call(q: jax.Array, k: jax.Array, v: jax.Array, pk: jax.Array, pv: jax.Array, layer: jax.Array,
          mask: jax.Array, scale: jax.Array) -> jax.Array:
    """q ``[..., B, T, H, hd]``, k/v ``[..., L, B, KV, S, hd]``, prefix pk/pv ``[L, B, KV, Pp, hd]`` (shared by
    every leading index) or ``[..., L, B, KV, Pp, hd]`` (one per leading index), mask ``[..., B, T, Pp + Sm]``
    -> ``[..., B, T, H*hd]`` (the same leading dims on q, k/v and mask: none, or vmapped points). The cache goes
    in as it is: a reshape of it after the layer's in-place write would make XLA write a second copy for the call."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((*q.shape[:-2], q.shape[-2] * q.shape[-1]), jnp.float32))
    return call(q, k, v, pk, pv, layer, mask, scale)


@_call.def_vmap
def _call_vmap(axis_size: int, in_batched: list[bool], *args: jax.Array) -> tuple[jax.Array, bool]:
    """The batch becomes one more leading dim of one call (each row's numbers are its own, so this equals one
    call per element); an unbatched query, cache or mask is broadcast. A prefix stays one shared array while
    unbatched (read once per row for all points), and becomes one per point when batched (a sweep's steered
    prompts). A batched layer or scale, or a prefix batched at one level of nested vmaps and shared at
    another: one call per element."""
    q, k, v, pk, pv, layer, mask, scale = args
    if in_batched[5] or in_batched[7] or in_batched[3] != in_batched[4]:
        return skinny.map_batched(_call, args, in_batched), True

    def lead(a: jax.Array, batched: bool) -> jax.Array:
        return a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))

    q, k, v, mask = (lead(a, in_batched[i]) for i, a in zip((0, 1, 2, 6), (q, k, v, mask)))
    if in_batched[3] and pk.ndim - 5 != q.ndim - 4:  # per point at this level only, shared below it
        return skinny.map_batched(_call, args, in_batched), True
    if not in_batched[3] and pk.ndim > 5:  # per point below this level, shared at it
        pk, pv = lead(pk, False), lead(pv, False)
    return _call(q, k, v, pk, pv, layer, mask, scale), True


def attend(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, layer: jax.Array, mask: jax.Array,
           prefix: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """The kernel: attention of ``q [B, T, H, hd]`` over layer ``layer`` of the cache ``k``/``v``
    ``[L, B, KV, S, hd]``, its first ``Sm`` slots, after the ``Pp`` slots of a shared ``prefix`` (its whole
    ``k``/``v`` ``[L, B, KV, Pp, hd]``, a :class:`~jaxpersona.model.transformer.KVPrefix`'s) -> ``[B, T, H*hd]``;
    ``mask [B, T, Pp + Sm]`` (True = may attend). Only where :func:`applies`, on a CPU (the caller keeps XLA's
    attention elsewhere)."""
    if prefix is None:
        empty = jnp.zeros((k.shape[-5], q.shape[-4], cfg.n_kv_heads, 0, cfg.head_dim), jnp.float32)
        prefix = (empty, empty)
    return _call(q, k, v, prefix[0], prefix[1], layer.astype(jnp.int32), mask, jnp.float32(cfg.scale))
