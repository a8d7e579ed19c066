"""Regime grids as one batched computation: adapters × system prompts × interventions on the same items.

A :class:`Condition` is *which adapter* (an index into an :class:`~jaxpersona.model.lora.AdapterStack`, 0 = the
base model when the stack was built with ``None`` first), *which system prompt* and *which intervention*.
:func:`score_conditions` scores every item (a question and a response) under every condition with one
jitted ``vmap`` over conditions per chunk of rows: adapter selection, tokens (the system prompt changes
them) and the intervention's arrays are all per-condition data, so base, base + prompt, base + adapter,
base + steering and their combinations run together, as multi-adapter servers batch requests.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.batching import Batch
from jaxpersona.compute.handle import Model
from jaxpersona.compute.scoring import encode_targets, target_logprob, target_shape
from jaxpersona.data.chat import conversation
from jaxpersona.edit import interventions as iv
from jaxpersona.model.lora import AdapterStack, check_adapter
from jaxpersona.model.params import Params
from jaxpersona.model.transformer import final_hidden


@dataclasses.dataclass(frozen=True)
class Condition:
    """One cell of a regime grid. ``hook``: an intervention (its positions are replaced by all tokens);
    conditions of one grid share one hook structure (use ``None`` for no intervention)."""

    name: str
    adapter: int = 0
    system: str | None = None
    hook: Any = None


def with_positions(hook: Any, positions: iv.Positions) -> Any:
    """``hook`` (an intervention or a :class:`~jaxpersona.edit.interventions.Chain`) acting at ``positions``."""
    if isinstance(hook, iv.Chain):
        return iv.Chain(tuple(with_positions(h, positions) for h in hook.items))
    return dataclasses.replace(hook, positions=positions)


def switched_off(hook: Any) -> Any:
    """The same intervention with every layer weight 0: structurally identical, changes nothing."""
    if isinstance(hook, iv.Chain):
        return iv.Chain(tuple(switched_off(h) for h in hook.items))
    return dataclasses.replace(hook, layers=jnp.zeros_like(hook.layers))


def _stacked_hooks(conditions: Sequence[Condition]) -> Any:
    hooks = [c.hook for c in conditions]
    template = next((h for h in hooks if h is not None), None)
    if template is None:
        return None
    dummy = iv.Positions.all(np.ones((1, 1), bool))
    filled = [with_positions(switched_off(template) if h is None else h, dummy) for h in hooks]
    structs = {jax.tree.structure(h) for h in filled}
    if len(structs) > 1:
        raise errors.InputError("the conditions' interventions differ in structure (kind/order); give every "
                                "condition the same kind of intervention (None = switched off)")
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *filled)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grid_chunk(params: Params, cfg: Any, stack: AdapterStack | None, data: dict[str, jax.Array],
                select: jax.Array, hooks: Any, adapter: Any = None) -> jax.Array:
    """``[C, B]`` log-probs: condition ``c`` runs ``data[c]`` (``[C, B, ...]``) under adapter ``select[c]`` of
    ``stack`` and hook ``hooks[c]``; without a stack, under the model's own ``adapter`` (or none)."""
    def one(d, sel, hook):
        ad, ad_sel = (adapter, None) if stack is None else (stack, jnp.broadcast_to(sel, d["valid"].shape[:1]))
        hook = None if hook is None else with_positions(hook, iv.Positions.all(d["valid"]))
        h = final_hidden(params, cfg, d["tokens"], d["valid"], hook, adapter=ad, adapter_select=ad_sel)
        return target_logprob(params, cfg, h, d)

    return jax.vmap(one)(data, select, hooks)


def score_conditions(model: Model, stack: AdapterStack | None, conditions: Sequence[Condition],
                     questions: Sequence[str], responses: Sequence[str], *, batch_size: int = 8) -> np.ndarray:
    """``[C, N]``: mean per-token log-prob of ``responses[n]`` after the user turn ``questions[n]`` under each
    condition (NaN for an empty response). The stack's adapters replace any adapter the model carries
    (:meth:`~jaxpersona.compute.handle.Model.with_adapter`); without a stack the model's own adapter applies."""
    if not conditions:
        raise errors.InputError("score_conditions: no conditions")
    if len(questions) != len(responses) or not questions:
        raise errors.InputError(f"need one response per question, got {len(questions)} and {len(responses)}")
    n_adapters = 1 if stack is None else len(stack)
    bad = [c.name for c in conditions if not 0 <= c.adapter < n_adapters]
    if bad:
        raise errors.InputError(f"conditions {bad} select an adapter outside the stack of {n_adapters}")
    if stack is not None:
        check_adapter(stack, model.cfg)
    hooks = _stacked_hooks(conditions)
    if hooks is not None:
        iv.check_for_model(jax.tree.map(lambda x: x[0], hooks), model.cfg.d_model, model.cfg.n_resid)
    out = np.full((len(conditions), len(questions)), np.nan)
    live = [i for i, r in enumerate(responses) if r and model.tokenizer.encode(r, add_special_tokens=False)]
    if not live:
        return out
    convs = {c.system: [conversation(questions[i], c.system) for i in live] for c in conditions}
    resps = [responses[i] for i in live]
    width, r_width = target_shape(model, [c for cv in convs.values() for c in cv], resps * len(convs))
    enc = {s: encode_targets(model, cv, resps, width=width, r_width=r_width) for s, cv in convs.items()}
    keys = ("tokens", "valid", "pred_idx", "pred_tok", "pred_ok")
    table = {k: np.stack([enc[c.system][k] for c in conditions]) for k in keys}  # [C, N, ...]
    select = jnp.asarray([c.adapter for c in conditions], jnp.int32)
    rows = min(batch_size, len(live))
    for s in range(0, len(live), rows):
        idx = np.arange(s, s + rows).clip(max=len(live) - 1)
        data = {k: jnp.asarray(v[:, idx]) for k, v in table.items()}
        model.check_length(Batch(table["tokens"][0, idx], table["valid"][0, idx]))
        lp = np.asarray(_grid_chunk(model.params, model.cfg, stack, data, select, hooks, model.adapter))
        n = min(rows, len(live) - s)
        out[:, [live[j] for j in range(s, s + n)]] = lp[:, :n]
    return out
