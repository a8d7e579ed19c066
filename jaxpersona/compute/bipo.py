"""Steering-regime vectors: a vector per layer optimised by the bi-directional preference objective (BiPO,
Cao et al. 2024) to make trait answers more likely than neutral ones.

For a batch and a random sign ``d`` (+1 or -1), with ``v`` added at ``resid[l]`` (all positions) as
``d * v``::

    ratio = [log p_{dv}(pos) - log p_0(pos)] - [log p_{dv}(neg) - log p_0(neg)]    (summed token log-probs)
    loss  = -log sigmoid(beta * d * ratio)

so ``+v`` prefers the trait answer and ``-v`` the neutral one. Only ``v`` trains (AdamW, zero init); the
reference log-probs ``p_0`` (unsteered) are computed once. The blocks below layer ``l`` do not depend on
``v``: their output ``resid[l]`` is computed once per example and only blocks ``l..L-1`` run per step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpersona import errors
from jaxpersona.compute.handle import Model
from jaxpersona.compute.scoring import encode_targets, target_logprob, target_shape
from jaxpersona.data.chat import conversation
from jaxpersona.model.transformer import VOCAB_CHUNK, Capture, final_hidden, forward


def _sum_logprob(params: Any, cfg: Any, h: jax.Array, data: dict[str, jax.Array]) -> jax.Array:
    ok = data["pred_ok"].astype(jnp.float32).sum(-1)
    # mean * count = sum over the response tokens; differentiated, so the vocabulary is not cut in small chunks
    return target_logprob(params, cfg, h, data, chunk=VOCAB_CHUNK) * ok


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefix(params: Any, cfg: Any, data: dict[str, jax.Array], layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``resid[layer]`` of every row (``[B, T, D]``) and the unsteered summed log-prob ``[B]``."""
    out = forward(params, cfg, data["tokens"], valid=data["valid"], capture=Capture(tuple(range(cfg.n_resid))),
                  logits=False)
    assert out.captured is not None  # every resid point was captured
    h_l = jnp.take(out.captured, layer, axis=0)
    ref = _sum_logprob(params, cfg, final_hidden(params, cfg, data["tokens"], data["valid"]), data)
    return h_l, ref


def bipo_vector(model: Model, questions: Sequence[str], pos: Sequence[str], neg: Sequence[str], layer: int, *,
                steps: int = 20, lr: float = 2e-3, beta: float = 0.1, batch_size: int = 8, weight_decay: float = 0.05,
                seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """A BiPO vector ``[D]`` at ``resid[layer]`` from (question, trait answer, neutral answer) triples (user
    turns, no system prompt; ``questions``, ``pos``, ``neg`` are ``[N]``, triples with an empty answer are
    dropped); returns ``(vector [D] float32, losses [steps])``."""
    cfg = model.cfg
    if not 1 <= layer <= cfg.n_layers:
        raise errors.InputError(f"BiPO layer {layer} outside resid[1..{cfg.n_layers}]")
    keep = [i for i in range(len(questions)) if pos[i].strip() and neg[i].strip()]
    if len(keep) < 2:
        raise errors.InputError(f"BiPO needs >= 2 (question, trait answer, neutral answer) triples, got {len(keep)}")
    convs = [conversation(questions[i]) for i in keep]
    n = len(keep)

    width, r_width = target_shape(model, convs + convs, [pos[i] for i in keep] + [neg[i] for i in keep])
    tabs = [{k: jnp.asarray(v) for k, v in encode_targets(model, convs, [side[i] for i in keep], width=width,
                                                          r_width=r_width).items() if k != "resp"} for side in (pos, neg)]
    lyr = jnp.int32(layer)
    model.base_only("BiPO")
    pre = [_prefix(model.params, cfg, t, lyr) for t in tabs]  # resid[layer] and reference log-probs, once
    span = (lyr, jnp.int32(cfg.n_layers))
    tx = optax.adamw(lr, weight_decay=weight_decay)

    def side_lp(params: Any, v: jax.Array, d: jax.Array, t: dict[str, jax.Array], h_l: jax.Array,
                idx: jax.Array) -> jax.Array:  # summed log-prob [bs] of rows idx with d * v added
        sub = {k: x[idx] for k, x in t.items()}
        h = h_l[idx] + (d * v).astype(h_l.dtype) * sub["valid"][..., None]
        last = final_hidden(params, cfg, sub["tokens"], sub["valid"], span=span, h=h, remat=True)
        return _sum_logprob(params, cfg, last, sub)

    def loss_fn(v: jax.Array, params: Any, tabs: list[dict[str, jax.Array]], pre: list[tuple[jax.Array, jax.Array]],
                d: jax.Array, idx: jax.Array) -> jax.Array:  # scalar BiPO loss of one batch
        lp_pos = side_lp(params, v, d, tabs[0], pre[0][0], idx) - pre[0][1][idx]
        lp_neg = side_lp(params, v, d, tabs[1], pre[1][0], idx) - pre[1][1][idx]
        return -jax.nn.log_sigmoid(beta * d * (lp_pos - lp_neg)).mean()

    @jax.jit  # weights and data are arguments, never closure constants
    def step(v: jax.Array, opt: Any, params: Any, tabs: list[dict[str, jax.Array]],
             pre: list[tuple[jax.Array, jax.Array]], d: jax.Array, idx: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
        loss, g = jax.value_and_grad(loss_fn)(v, params, tabs, pre, d, idx)
        upd, opt = tx.update(g, opt, v)
        return optax.apply_updates(v, upd), opt, loss

    v = jnp.zeros((cfg.d_model,), jnp.float32)
    opt = tx.init(v)
    key = jax.random.key(seed)
    bs = min(batch_size, n)
    losses = []
    for _ in range(steps):
        key, k1, k2 = jax.random.split(key, 3)
        idx = jax.random.choice(k1, n, (bs,), replace=False)
        d = jnp.where(jax.random.bernoulli(k2), 1.0, -1.0)
        v, opt, loss = step(v, opt, model.params, tabs, pre, d, idx)
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise errors.TrainingError(f"BiPO loss became {losses[-1]} at step {len(losses)}; lower bipo_lr")
    return np.asarray(v, np.float32), losses
