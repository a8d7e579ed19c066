"""Choosing how to steer on some questions and reporting the effect on others (judge-free).

A steering *setting* is ``(positions, variant, layer, coeff)``: where the vector is added (``response``,
``all`` or ``prompt`` tokens), which extracted vector (``response_mean``, ``prompt_mean``,
``prompt_last``), at which resid point and how strongly. A sweep gives, per setting and evaluation
question ``q``, the **gain** ``delta[q]``: the change of the contrastive likelihood ``lp(pos answer) -
lp(neg answer)`` against the unsteered model, and whether the greedy generation under the setting is
incoherent (``bad[q]``, from judge-free thresholds).

* :func:`select` — the rule: per (positions, variant, layer) the *cliff* is the smallest positive
  coefficient whose generations are incoherent on more than ``max_bad`` of the questions; among the
  positive coefficients below it the largest mean gain wins (ties: the lower layer). The default
  (positions, variant) is kept unless another beats it by more than the standard error of their
  per-question difference.
* :func:`cross_fit` — ``k``-fold cross-fitting: each fold's setting is selected on the other folds'
  questions and its gain measured on the fold's own; the held-out gain pools those per-question gains
  (an interval over all ``n`` questions). The setting shipped is the one selected on all questions;
  the selection is *unstable* when the folds select differently.
* :func:`dose_response` — the per-question least-squares slope of gain against coefficient below the
  cliff (at least 3 coefficients), averaged over questions with a bootstrap interval.
* :func:`paired_gain` — a gain and its difference from a control's (e.g. a random direction of the
  same norm), both with intervals over questions.
* :func:`instruction_words` / :func:`echo_rate` — how often a generation repeats the trait
  instruction's own words, so a lexical effect is not taken for a persona.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.measure import stats

Setting = tuple[str, str, int, float]  # (positions, variant, layer, coeff)
DEFAULT_HOW = ("response", "response_mean")


def _how(s: Setting) -> tuple[str, str]:
    return s[0], s[1]


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def select(deltas: Mapping[Setting, np.ndarray], bad: Mapping[Setting, np.ndarray], questions: Sequence[int] | None,
           *, max_bad: float, default: tuple[str, str] = DEFAULT_HOW) -> dict[str, Any]:
    """The setting chosen on ``questions`` (indices into the ``[n]`` arrays; None: all).

    ``deltas[s] [n]``: per-question gains of setting ``s``; ``bad[s] [n]``: its incoherent generations.
    Coefficient-0 settings are the baseline and never chosen. Returns ``{setting, gain, cliff,
    per_how: {"positions/variant": {setting, gain, cliff}}, reason}``; ``setting`` is None when no
    positive coefficient stays coherent anywhere."""
    if not deltas:
        raise errors.InputError("no steering settings to select from")
    n = len(next(iter(deltas.values())))
    idx = np.arange(n) if questions is None else np.asarray(list(questions), int)
    if idx.size == 0:
        raise errors.InputError("selecting a steering setting needs at least one question")
    groups: dict[tuple[str, str, int], list[Setting]] = {}
    for s in deltas:
        if s[3] > 0:
            groups.setdefault((s[0], s[1], s[2]), []).append(s)
    best_per: dict[tuple[str, str], dict[str, Any]] = {}
    for (pos, var, layer), ss in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ss = sorted(ss, key=lambda s: s[3])
        cliff = next((s[3] for s in ss if float(np.mean(bad[s][idx])) > max_bad), None)
        ok = [s for s in ss if cliff is None or s[3] < cliff]
        if not ok:
            continue
        s_best = max(ok, key=lambda s: (_mean(deltas[s][idx]), -s[3]))
        gain = _mean(deltas[s_best][idx])
        cur = best_per.get((pos, var))
        if cur is None or gain > cur["gain"]:  # ties keep the lower layer (visited first)
            best_per[(pos, var)] = {"setting": s_best, "gain": gain, "cliff": cliff}
    if not best_per:
        return {"setting": None, "gain": None, "cliff": None, "per_how": {},
                "reason": "no positive coefficient kept the generations coherent in any setting"}
    top = max(best_per, key=lambda h: best_per[h]["gain"])
    reason = "largest judge-free gain among coherent coefficients"
    if default in best_per and top != default:
        d = deltas[best_per[top]["setting"]][idx] - deltas[best_per[default]["setting"]][idx]
        d = d[np.isfinite(d)]
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.inf
        if float(d.mean()) <= se:
            reason = (f"default {'/'.join(default)} kept: {'/'.join(top)} beat it by {float(d.mean()):+.3f}, "
                      f"not more than its standard error {se:.3f}")
            top = default
        else:
            reason += f" ({'/'.join(top)} beat the default by {float(d.mean()):+.3f} > its SE {se:.3f})"
    chosen = best_per[top]
    return {"setting": chosen["setting"], "gain": chosen["gain"], "cliff": chosen["cliff"],
            "per_how": {"/".join(h): v for h, v in best_per.items()}, "reason": reason}


def folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint folds of ``range(n)`` (a seeded permutation, sizes differing by at most one)."""
    if not 2 <= k <= n:
        raise errors.InputError(f"cross-fitting needs 2 <= folds <= questions, got {k} folds for {n} questions")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i::k]) for i in range(k)]


def cross_fit(deltas: Mapping[Setting, np.ndarray], bad: Mapping[Setting, np.ndarray], *, folds: int, max_bad: float,
              seed: int = 0, default: tuple[str, str] = DEFAULT_HOW) -> dict[str, Any]:
    """Held-out gain of the selection procedure by ``folds``-fold cross-fitting.

    Returns ``{gain, lo, hi, n, share_positive, folds: [{questions, setting, gain}], stable, heldout [n]}``:
    ``gain`` is the mean over all ``n`` questions of the gain each question got under the setting
    selected without it (bootstrap 95% interval over questions); ``share_positive`` the share of those
    gains above 0; ``stable`` whether every fold selected the same setting."""
    n = len(next(iter(deltas.values())))
    held = np.full(n, np.nan)
    per = []
    for f in folds_of(n, folds, seed):
        rest = np.setdiff1d(np.arange(n), f)
        sel = select(deltas, bad, rest, max_bad=max_bad, default=default)
        s = sel["setting"]
        if s is not None:
            held[f] = deltas[s][f]
        per.append({"questions": f.tolist(), "setting": _jsonable(s), "gain": None if s is None else _mean(deltas[s][f])})
    got = np.isfinite(held)
    mean, lo, hi = stats.bootstrap_ci(held, seed=seed) if got.any() else (math.nan, math.nan, math.nan)
    settings = {None if p["setting"] is None else tuple(p["setting"]) for p in per}
    return {"gain": mean, "lo": lo, "hi": hi, "n": int(got.sum()),
            "share_positive": float(np.mean(held[got] > 0)) if got.any() else None,
            "folds": per, "stable": len(settings) == 1 and None not in settings,
            "heldout": [None if not math.isfinite(x) else float(x) for x in held]}


def dose_response(deltas: Mapping[float, np.ndarray], cliff: float | None, *, seed: int = 0, min_points: int = 3
                  ) -> dict[str, Any]:
    """Slope of gain against coefficient at one (positions, variant, layer): ``deltas[c] [n]`` per
    coefficient (0 included, all zeros). Uses the coefficients below ``cliff`` (all when None); per
    question the least-squares slope, then their mean with a bootstrap interval over questions.
    Returns ``{slope, lo, hi, n, coeffs}``, ``slope`` None with fewer than ``min_points`` coefficients."""
    cs = sorted(c for c in deltas if cliff is None or c < cliff)
    if len(cs) < min_points:
        return {"slope": None, "lo": None, "hi": None, "n": 0, "coeffs": cs,
                "reason": f"{len(cs)} coefficient(s) below the cliff; a slope needs {min_points}"}
    x = np.asarray(cs, np.float64)
    y = np.stack([np.asarray(deltas[c], np.float64) for c in cs], axis=1)  # [n, C]
    y = y[np.all(np.isfinite(y), axis=1)]
    xc = x - x.mean()
    slopes = (y - y.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)
    mean, lo, hi = stats.bootstrap_ci(slopes, seed=seed)
    return {"slope": mean, "lo": lo, "hi": hi, "n": int(slopes.size), "coeffs": cs}


def paired_gain(gain: np.ndarray, control: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """``gain [n]`` and ``control [n]`` per-question gains: the control's mean with its interval and the
    paired difference ``gain - control`` with its interval. ``beats`` when that interval is above 0."""
    g, c = np.asarray(gain, np.float64), np.asarray(control, np.float64)
    cm, clo, chi = stats.bootstrap_ci(c, seed=seed)
    dm, dlo, dhi = stats.bootstrap_ci(g - c, seed=seed)
    return {"control": cm, "control_lo": clo, "control_hi": chi, "diff": dm, "diff_lo": dlo, "diff_hi": dhi,
            "n": int(np.isfinite(g - c).sum()), "beats": bool(math.isfinite(dlo) and dlo > 0)}


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_COMMON = frozenset(
    "a an the and or but if of to in on at by for with from as is are be been being was were it its this that "
    "these those you your yours they them their we our us he she his her i me my what which who whom how when where "
    "why all any each every some no not do does did have has had can could will would should may might must shall "
    "assistant helpful answer answers respond response responses question questions user users always never very "
    "more most less least also just only such than then there here about into over under".split())


def instruction_words(positive: Iterable[str], negative: Iterable[str], *, min_len: int = 4) -> list[str]:
    """Content words of the positive (trait) instructions that no negative instruction uses (lower case,
    at least ``min_len`` letters, common words dropped): the words whose echo in an answer is lexical."""
    neg = {w for t in negative for w in _WORD.findall(t.lower())}
    out = {w for t in positive for w in _WORD.findall(t.lower())
           if len(w) >= min_len and w not in neg and w not in _COMMON}
    return sorted(out)


def echo_rate(texts: Sequence[str], words: Sequence[str]) -> float | None:
    """Share of ``texts`` containing at least one of ``words`` as a whole word (None without texts or words)."""
    if not texts or not words:
        return None
    ws = set(words)
    return float(np.mean([bool(ws & set(_WORD.findall(t.lower()))) for t in texts]))


def _jsonable(s: Setting | None) -> list[Any] | None:
    return None if s is None else [s[0], s[1], int(s[2]), float(s[3])]


def setting_json(s: Setting | None) -> dict[str, Any] | None:
    """``{positions, variant, layer, coeff}`` of a setting (None stays None)."""
    return None if s is None else {"positions": s[0], "variant": s[1], "layer": int(s[2]), "coeff": float(s[3])}
