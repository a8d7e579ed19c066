"""Parameter shapes and logical axes of every supported family, in one table."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpersona import errors
from jaxpersona.model.config import ModelConfig

Params = dict[str, Any]  # nested dict of arrays: {'embed', 'layers': {name: [L, ...]}, 'final_norm', ('lm_head')}


# --- params -----------------------------------------------------------------------------------
def param_shapes(cfg: ModelConfig) -> Params:
    """The params pytree's structure with shapes (tuples) as leaves. Matmul weights are ``[in, out]``."""
    L, D, F, V = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layers: dict[str, tuple[int, ...]] = {
        "attn_norm": (L, D),
        "wq": (L, D, H * hd),
        "wk": (L, D, KV * hd),
        "wv": (L, D, KV * hd),
        "wo": (L, H * hd, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, H * hd), bk=(L, KV * hd), bv=(L, KV * hd))
    if cfg.o_bias:
        layers["bo"] = (L, D)
    if cfg.qk_norm:
        layers.update(q_norm=(L, hd), k_norm=(L, hd))
    if cfg.sandwich_norm:
        layers.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
    shapes: Params = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise :class:`~jaxpersona.errors.ShapeMismatchError` unless ``params`` fits ``cfg`` exactly."""
    want = jax.tree.leaves_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    flat_have = dict(jax.tree.leaves_with_path(params))
    problems = []
    for path, shape in want:
        have = flat_have.pop(path, None)
        name = jax.tree_util.keystr(path)
        if have is None:
            problems.append(f"missing {name} (expected shape {shape})")
        elif tuple(have.shape) != tuple(shape):
            problems.append(f"{name}: weights have shape {tuple(have.shape)}, config implies {tuple(shape)}")
    problems += [f"unexpected weight {jax.tree_util.keystr(p)}" for p in flat_have]
    if problems:
        raise errors.ShapeMismatchError(
            "weights do not match the config (wrong config.json for these weights?):\n  " + "\n  ".join(problems[:20])
        )


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, scale: float = 0.02) -> Params:
    """Random params (normal(0, scale) matrices, norms at their identity) — for tests and benchmarks."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.full(shape, 1.0 - cfg.norm_offset, dtype))
        else:
            out.append((scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# --- precision --------------------------------------------------------------------------------
MATMUL_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # per layer; plus "embed" and "lm_head"


def activation_dtype(params: Params) -> Any:
    """The dtype of the residual stream, KV caches and every elementwise op: that of the norm weights (the
    matmul weights may be stored narrower, see :func:`with_matmul_dtype`)."""
    return params["final_norm"].dtype


def with_matmul_dtype(params: Params, dtype: Any) -> Params:
    """``params`` with the matmul weights (projections, embedding / LM head) stored in ``dtype`` and everything
    else (norms, biases) as it was. The forward multiplies in the weights' dtype and accumulates in the
    activations' (:func:`jaxpersona.model.transformer.matmul`): float32 activations with bfloat16 weights is
    mixed precision, the usual accelerator setting, which on CPUs with AMX-BF16 runs the matmuls ~5x faster."""
    dt = jnp.dtype(dtype)
    cast = lambda x: x.astype(dt)  # noqa: E731  (keeps a sharded array's sharding)
    out = dict(params)
    out["layers"] = {k: cast(v) if k in MATMUL_WEIGHTS else v for k, v in params["layers"].items()}
    for k in ("embed", "lm_head"):
        if k in out:
            out[k] = cast(out[k])
    return out


def matmul_weight_dtype(params: Params) -> Any:
    """The dtype the matmul weights are multiplied in (bfloat16 for weights held as their ``uint16`` bits,
    :func:`~jaxpersona.model.transformer.layers_as_bits`)."""
    dtype = params["layers"]["wq"].dtype
    return jnp.dtype(jnp.bfloat16) if dtype == jnp.uint16 else dtype


# logical axes of every parameter (per dimension), keyed by its name in the params pytree
LAYER_AXES: dict[str, tuple[str | None, ...]] = {
    "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
    "post_attn_norm": ("layers", "norm"), "post_mlp_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads"), "wk": ("layers", "embed", "kv_heads"), "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "heads", "embed"),
    "bq": ("layers", "heads"), "bk": ("layers", "kv_heads"), "bv": ("layers", "kv_heads"), "bo": ("layers", "norm"),
    "q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"), "w_down": ("layers", "mlp", "embed"),
}


TOP_AXES = {"embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("norm",)}
