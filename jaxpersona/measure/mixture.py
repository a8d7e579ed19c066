"""Persona mixtures: an entity as a context-conditional mix of a persona bank, and attribution.

* :func:`~jaxpersona.edit.interventions.mixture` / :class:`~jaxpersona.edit.interventions.Mixture` — the
  intervention (``h + alpha * sum_k w_k v_k``; ``w = softmax(<h, v̂_k>/tau)`` from the current residual,
  or fixed weights);
* :func:`attribute` — non-negative least squares of an activation on the bank's unit vectors;
* :func:`compare_mixtures` — on held-out questions of each persona: no intervention, the intended
  persona's vector alone, a fixed uniform mix and the context-conditional mix, scored judge-free.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.activations import VARIANTS, iter_activations
from jaxpersona.compute.handle import Model
from jaxpersona.compute.scoring import mean_logprobs
from jaxpersona.data.chat import conversation
from jaxpersona.edit.interventions import Positions, mixture
from jaxpersona.measure import stats
from jaxpersona.measure.evaluate import answer_trait_scores


def attribute(acts: np.ndarray, vectors: np.ndarray, names: list[str] | None = None,
              baseline: np.ndarray | None = None, ridge: float = 1e-3) -> dict[str, Any]:
    """Decompose activations ``[N, D]`` (minus ``baseline [D]``, e.g. the unsteered mean: the shared part
    every answer carries) into non-negative combinations of the unit ``vectors [K, D]`` (non-negative
    least squares per row, with a small ``ridge`` so that a degenerate bank — e.g. deviations from
    their own mean, which sum to zero — still gets the smallest such weights): ``coeffs [N, K]``,
    ``unexplained [N]`` (the residual's share of the squared norm, 0..1) and the dominant name."""
    from scipy.optimize import nnls

    a = np.asarray(acts, np.float64)
    v = np.asarray(vectors, np.float64)
    if a.ndim != 2 or v.ndim != 2 or a.shape[1] != v.shape[1]:
        raise errors.ModelMismatchError(f"attribution: activations {a.shape} and vectors {v.shape} do not share "
                                        "d_model (a bank from another model?)")
    if baseline is not None:
        if np.shape(baseline) != a.shape[1:]:
            raise errors.ModelMismatchError(f"attribution: baseline {np.shape(baseline)} vs activations {a.shape}")
        a = a - np.asarray(baseline, np.float64)
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    coeffs = np.zeros((len(a), len(u)))
    unexplained = np.zeros(len(a))
    design = np.concatenate([u.T, np.sqrt(ridge) * np.eye(len(u))]) if ridge else u.T
    for i, row in enumerate(a):
        c, _ = nnls(design, np.concatenate([row, np.zeros(len(u))]) if ridge else row)
        coeffs[i] = c
        res = row - c @ u
        unexplained[i] = float(res @ res) / max(float(row @ row), 1e-30)
    names = names or [str(k) for k in range(len(u))]
    return {"coeffs": coeffs, "unexplained": unexplained, "names": names,
            "dominant": [names[int(np.argmax(c))] if c.any() else None for c in coeffs]}


CONDITIONS = ("none", "single", "fixed_mix", "conditional_mix")


def compare_mixtures(model: Model, traits: list[Any], vectors: np.ndarray, layer: int, *, alpha: float = 0.5,
                     tau: float = 1.0, n_questions: int = 4, max_new_tokens: int = 24, seed: int = 0,
                     batch_size: int = 16) -> dict[str, Any]:
    """For each trait ``p`` (bank entry ``vectors[p]``, scaled to ``|resid[layer]|`` so ``alpha`` is a
    fraction of the residual norm) and its held-out questions, greedy answers under: no intervention;
    the intended persona alone (one-hot weights); a fixed uniform mix; the context-conditional mix
    (``softmax(<h, v̂>/tau)``). Judge-free measures per condition, with bootstrap intervals over
    questions: the intended trait's score (log-lik under its positive vs neutral system prompt, pair
    1), coherence (mean log-lik of the answer under the unintervened model, distinct-2), and how
    often the attribution (NNLS on the bank, minus the unintervened mean) names the intended persona."""
    cfg = model.cfg
    v = np.asarray(vectors, np.float32)
    if v.ndim != 2 or v.shape[0] != len(traits) or v.shape[1] != cfg.d_model:
        raise errors.ModelMismatchError(f"mixture bank {v.shape} does not fit {len(traits)} traits x d_model {cfg.d_model}")
    items = [(p, q) for p, t in enumerate(traits) for q in t.eval_questions[:n_questions]]
    if not items:
        raise errors.InputError("the traits have no held-out (eval) questions to compare mixtures on")
    convs = [conversation(q) for _, q in items]
    intended = np.asarray([p for p, _ in items])
    batch = model.encode_conversations(convs)
    # relative units: each unit vector scaled to the mean token norm at the layer (unintervened answers' prompts)
    _, (_, norms) = next(iter_activations(model, convs[:batch_size], [""] * min(batch_size, len(convs)), batch_size,
                                          with_norms=True))
    scale = float(norms[VARIANTS.index("prompt_mean"), layer].mean())
    vs = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) * scale
    pos = Positions(jnp.ones((len(items), 1), bool), jnp.ones((len(items),), bool))
    k = len(traits)
    hooks = {"none": mixture(cfg.n_resid, vs, [layer], pos, alpha=0.0, weights=np.full(k, 1 / k)),
             "single": mixture(cfg.n_resid, vs, [layer], pos, alpha=alpha, weights=np.eye(k)[intended]),
             "fixed_mix": mixture(cfg.n_resid, vs, [layer], pos, alpha=alpha, weights=np.full(k, 1 / k)),
             "conditional_mix": mixture(cfg.n_resid, vs, [layer], pos, alpha=alpha, tau=tau)}
    answers = {c: model.decode(model.generate_tokens(batch, max_new_tokens=max_new_tokens, seed=seed, hook=h))
               for c, h in hooks.items()}
    acts = {}
    for c, ans in answers.items():
        a = np.zeros((len(items), cfg.d_model), np.float32)
        live = [i for i, x in enumerate(ans) if x.strip()]
        for idx, ac in iter_activations(model, [convs[i] for i in live], [ans[i] for i in live], batch_size):
            a[np.asarray(live)[idx]] = ac[VARIANTS.index("response_mean"), layer]
        acts[c] = (a, live)
    base = acts["none"][0][acts["none"][1]].mean(axis=0)
    out: dict[str, Any] = {"alpha": alpha, "tau": tau, "layer": layer, "questions": len(items), "conditions": {},
                           "examples": []}
    names = [t.name for t in traits]
    for c, ans in answers.items():
        score = np.full(len(items), np.nan)
        for p, t in enumerate(traits):
            sel = [i for i in range(len(items)) if intended[i] == p and ans[i].strip()]
            if sel:
                score[sel] = answer_trait_scores(model, t, [items[i][1] for i in sel], [ans[i] for i in sel],
                                                 [min(1, len(t.pairs) - 1)], batch_size)
        nll = mean_logprobs(model, convs, [a if a.strip() else "" for a in ans], batch_size=batch_size)
        d2 = [stats.distinct_n(model.tokenizer.encode(a, add_special_tokens=False), 2) for a in ans]
        a, live = acts[c]
        att = attribute(a[live], v, names, baseline=base)
        agree = np.mean([d == names[intended[i]] for d, i in zip(att["dominant"], live)]) if live else np.nan
        s_m, s_lo, s_hi = stats.bootstrap_ci(score, seed=seed)
        l_m, l_lo, l_hi = stats.bootstrap_ci(nll, seed=seed)
        out["conditions"][c] = {"trait_score": [s_m, s_lo, s_hi], "loglik": [l_m, l_lo, l_hi],
                                "distinct2": float(np.mean(d2)), "attribution_agrees": float(agree),
                                "unexplained": float(np.mean(att["unexplained"])) if live else None}
        if c == "conditional_mix" and live:
            i = live[0]
            out["examples"].append({"question": items[i][1], "intended": names[intended[i]], "answer": ans[i],
                                    "weights": {n: round(float(x), 3) for n, x in zip(names, att["coeffs"][0])},
                                    "unexplained": round(float(att["unexplained"][0]), 3)})
    out["answers"] = {c: list(a) for c, a in answers.items()}
    return out
