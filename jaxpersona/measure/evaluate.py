"""Judge-free evaluation of persona vectors (the check a judge must pass before it is trusted is
:func:`jaxpersona.measure.judge_check.check_judge`).

* :func:`steering_table` — from a steering sweep's rows (teacher-forced log-probs of the evaluation
  answers, greedy generations): per (layer, coefficient) the **contrastive-likelihood trait score**
  (mean per-token log-prob of the positive answers minus the negative ones, no system prompt,
  under the intervention; bootstrap interval over questions) and the **judge-free coherence** of
  the generations (NLL under the unsteered model, distinct-2, longest repeated span vs thresholds
  calibrated on unsteered answers);
* :func:`choose_layer` — the layer whose steering raises the trait score most among coefficients
  whose generations stay coherent, the coefficient where coherence breaks, and Spearman rho of
  coefficient vs trait score below that cliff;
* :func:`answer_trait_scores` — a judge-free trait score of single answers: mean per-token log-prob
  of the answer under the trait's positive system prompts minus under the negative ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpersona.compute.handle import Model
from jaxpersona.compute.scoring import mean_logprobs
from jaxpersona.data.chat import conversation
from jaxpersona.measure import stats

Message = dict[str, str]


# --- judge-free trait score of single answers ------------------------------------------------------
def answer_trait_scores(model: Model, trait: Any, questions: Sequence[str], answers: Sequence[str],
                        pairs: Sequence[int], batch_size: int = 16) -> np.ndarray:
    """``[N]``: mean over instruction pairs ``i`` of ``logp(answer | pos_i system, question) -
    logp(answer | neg_i system, question)`` (mean per-token log-probs). NaN for an empty answer.

    The model is its own classifier: a positive score means the answer is more likely under the
    trait's persona than under the neutral one. Use pairs that did not generate the answers."""
    convs, resps = [], []
    for i in pairs:
        for side in ("pos", "neg"):
            system = trait.system_prompt(side, i)
            convs += [conversation(q, system) for q in questions]
            resps += list(answers)
    lp = mean_logprobs(model, convs, resps, batch_size=batch_size).reshape(len(pairs), 2, len(answers))
    return (lp[:, 0] - lp[:, 1]).mean(axis=0)


# --- steering sweep -> table ------------------------------------------------------------------------
def steering_table(rows: Sequence[dict[str, Any]], n_questions: int, coherence: dict[tuple[int, float], dict[str, Any]],
                   layers: Sequence[int], coeffs: Sequence[float], seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """``{layer: {coeff: cell}}`` (string keys) for one trait's sweep rows.

    Rows are ``run_sweep`` rows over a scoring set whose first ``n_questions`` prompts carry the
    positive answers and the next ``n_questions`` the negative ones (same questions, same order).
    A cell: ``score`` (mean over questions of lp(pos) - lp(neg)), ``lo``/``hi`` (bootstrap 95% over
    questions), ``delta`` (score - the unsteered score), and the point's coherence (``coherent``,
    ``bad_frac``, ``nll``, ``distinct2``, ``repeat_frac``). Coefficient 0 (run once) fills every layer.
    """
    by_point: dict[tuple[int, float], np.ndarray] = {}
    for r in rows:
        by_point.setdefault((r["layer"], r["coeff"]), np.full(2 * n_questions, np.nan))[r["prompt"]] = r["logprob"]
    base_key = next(k for k in by_point if k[1] == 0.0)
    diffs = {k: v[:n_questions] - v[n_questions:] for k, v in by_point.items()}
    base_score = float(np.mean(diffs[base_key]))
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for l in layers:
        row = {}
        for c in sorted(coeffs):
            key = base_key if c == 0 else (int(l), float(c))
            mean, lo, hi = stats.bootstrap_ci(diffs[key], seed=seed)
            d_mean, d_lo, d_hi = stats.bootstrap_ci(diffs[key] - diffs[base_key], seed=seed)
            row[f"{float(c):g}"] = {"score": mean, "lo": lo, "hi": hi, "delta": mean - base_score,
                                    "delta_lo": d_lo, "delta_hi": d_hi, **coherence[key]}
        table[str(l)] = row
    return table


def choose_layer(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Judge-free layer choice: for each layer, the largest trait-score gain over the unsteered score
    among positive coefficients whose generations stay coherent; the best layer has the largest gain
    (ties: the lower layer). Also per layer the *cliff* (smallest positive coefficient whose
    generations are incoherent; None if none in the grid) and Spearman rho of coefficient vs trait
    score over the coefficients below the cliff.

    Returns ``{best_layer, gain, cliff, rho, per_layer: {layer: {gain, best_coeff, cliff, rho}}, reason}``;
    ``best_layer`` is None when no positive coefficient is coherent at any layer."""
    per: dict[str, dict[str, Any]] = {}
    for l, row in table.items():
        cs = sorted(row, key=float)
        pos = [c for c in cs if float(c) > 0]
        cliff = next((float(c) for c in pos if not row[c]["coherent"]), None)
        below = [c for c in cs if cliff is None or float(c) < cliff]
        rho = stats.spearman([float(c) for c in below], [row[c]["score"] for c in below])
        ok = [c for c in pos if row[c]["coherent"] and (cliff is None or float(c) < cliff)]
        best_c = max(ok, key=lambda c: row[c]["delta"]) if ok else None
        per[l] = {"gain": row[best_c]["delta"] if best_c else None, "best_coeff": float(best_c) if best_c else None,
                  "cliff": cliff, "rho": rho, "n_coeffs_below_cliff": len(below)}
    cands = [l for l in per if per[l]["gain"] is not None]
    if not cands:
        return {"best_layer": None, "gain": None, "cliff": None, "rho": None, "per_layer": per,
                "reason": "no positive coefficient kept the generations coherent at any layer"}
    best = max(cands, key=lambda l: (per[l]["gain"], -int(l)))
    return {"best_layer": int(best), **{k: per[best][k] for k in ("gain", "cliff", "rho", "best_coeff")},
            "per_layer": per,
            "reason": "largest judge-free trait gain (contrastive likelihood) among coherent coefficients "
                      "(judge-free coherence: NLL under the unsteered model, distinct-2, longest repeat)"}


def coherence_stats(model: Model, questions: Sequence[str], texts: Sequence[str], batch_size: int = 16) -> list[dict[str, float]]:
    """Per text: ``nll`` (mean per-token NLL under the unsteered model after the bare question),
    ``distinct2`` and ``repeat_frac`` (of its tokens). An empty text is maximally incoherent."""
    lp = mean_logprobs(model, [conversation(q) for q in questions], list(texts), batch_size=batch_size)
    out = []
    for text, l in zip(texts, lp):
        ids = model.tokenizer.encode(text, add_special_tokens=False) if text else []
        if not ids:
            out.append({"nll": math.inf, "distinct2": 0.0, "repeat_frac": 1.0})
        else:
            out.append({"nll": float(-l), **stats.text_stats(ids)})
    return out
