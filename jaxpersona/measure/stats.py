"""Judge-free measures and the statistics every pipeline reports through.

Nothing here needs a judge model:

* **intervals**: percentile bootstrap over units (questions), Fisher-z intervals for Pearson r;
* **rank statistics**: AUROC (with ties), Spearman rho;
* **text coherence** of a generation from its tokens: distinct-n and the longest repeated span,
  plus the per-token NLL under the *unsteered* model (computed by the caller), each compared to
  thresholds calibrated on unsteered answers (:class:`CoherenceThresholds`).

All functions are plain numpy, deterministic (bootstrap draws come from an explicit seed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpersona import errors


# --- intervals ------------------------------------------------------------------------------------
def bootstrap_ci(values: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values [n]`` (or of rows of ``[n, k]``: the mean of row
    means) with a percentile bootstrap interval over the ``n`` units. ``n == 1`` gives ``lo == hi``."""
    x = np.asarray(values, np.float64)
    if x.ndim > 1:
        x = x.mean(axis=tuple(range(1, x.ndim)))
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def jackknife_interval(point: Any, leave_one_out: Sequence[Any] | np.ndarray, level: float = 0.95
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``point +- z * SE`` with the jackknife standard error from leave-one-unit-out estimates ``[n, ...]``
    (elementwise). For statistics the bootstrap biases strongly — a cosine of resampled means is pulled
    toward 0 by the duplicated units, so a percentile interval can miss its own estimate — the jackknife
    stays centred on the estimate."""
    loo = np.asarray(leave_one_out, np.float64)
    n = len(loo)
    se = np.sqrt((n - 1) / n * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
    z = _normal_quantile(0.5 + level / 2)
    p = np.asarray(point, np.float64)
    return p - z * se, p + z * se


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Pearson r of ``x [N]`` and ``y [N]`` (None with < 3 points or a constant input)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def pearson_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, level: float = 0.95
               ) -> dict[str, float | int | None]:
    """``{r, lo, hi, n}``: Pearson r with a Fisher-z interval (None where it is undefined; the
    interval needs n >= 4)."""
    r = pearson(x, y)
    n = len(x)
    if r is None:
        return {"r": None, "lo": None, "hi": None, "n": n}
    if n < 4:
        return {"r": r, "lo": None, "hi": None, "n": n}
    z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    q = _normal_quantile(0.5 + level / 2) / math.sqrt(n - 3)
    return {"r": r, "lo": math.tanh(z - q), "hi": math.tanh(z + q), "n": n}


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation; |error| < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - 0.02425:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


# --- rank statistics ---------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 1-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        sel = x == v
        if sel.sum() > 1:
            ranks[sel] = ranks[sel].mean()
    return ranks


def auroc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting 1/2 (None if a side is empty)."""
    p, n = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    p, n = p[np.isfinite(p)], n[np.isfinite(n)]
    if p.size == 0 or n.size == 0:
        return None
    r = _ranks(np.concatenate([p, n]))
    return float((r[: p.size].sum() - p.size * (p.size + 1) / 2) / (p.size * n.size))


def auroc_ci(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray, *, n_boot: int = 2000,
             level: float = 0.95, seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """``(auroc, lo, hi)``: :func:`auroc` with a percentile bootstrap interval, positives and negatives resampled
    separately (stratified). All None if a side is empty."""
    p, n = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    p, n = p[np.isfinite(p)], n[np.isfinite(n)]
    a = auroc(p, n)
    if a is None:
        return None, None, None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        b = auroc(p[rng.integers(0, p.size, p.size)], n[rng.integers(0, n.size, n.size)])
        draws.append(b if b is not None else a)
    q = (1 - level) / 2
    return a, float(np.quantile(draws, q)), float(np.quantile(draws, 1 - q))


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Spearman rho of ``x [N]`` and ``y [N]`` (Pearson r of average ranks); None with < 3 points or a
    constant input."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) < 3:
        return None
    return pearson(_ranks(a), _ranks(b))


# --- coherence of generated text ------------------------------------------------------------------
def distinct_n(tokens: Sequence[int], n: int = 2) -> float:
    """Distinct n-grams / n-grams (1.0 for text shorter than ``n + 1`` tokens)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 if len(grams) < 2 else len(set(grams)) / len(grams)


def longest_repeat(tokens: Sequence[int]) -> int:
    """Length of the longest token span that occurs at least twice (overlaps allowed): 0 if none.

    ``O(n^2)`` dynamic programming over suffix pairs; generations are short."""
    t = list(tokens)
    n, best = len(t), 0
    prev = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        cur = [0] * (n + 1)
        for j in range(n - 1, i, -1):
            if t[i] == t[j]:
                cur[j] = prev[j + 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def text_stats(tokens: Sequence[int]) -> dict[str, float]:
    """``{distinct2, repeat_frac}``: distinct bigrams and the longest repeated span as a fraction
    of the length (both judge-free, from the token ids of one generation)."""
    n = max(len(tokens), 1)
    return {"distinct2": distinct_n(tokens, 2), "repeat_frac": longest_repeat(tokens) / n}


@dataclasses.dataclass(frozen=True)
class CoherenceThresholds:
    """Cut-offs for one generation, calibrated on unsteered answers (:meth:`calibrate`).

    A generation is *incoherent* when any of: its mean token NLL under the unsteered model is above
    ``nll_max``, its distinct-bigram ratio is below ``distinct2_min``, or its longest repeated span
    covers more than ``repeat_max`` of it. A grid point is incoherent when more than ``max_bad``
    of its generations are.
    """

    nll_max: float
    distinct2_min: float
    repeat_max: float
    max_bad: float = 0.25

    @classmethod
    def calibrate(cls, reference: Sequence[dict[str, float]], *, quantile: float = 0.95, nll_margin: float = 1.0,
                  ratio_margin: float = 0.25, max_bad: float = 0.25) -> CoherenceThresholds:
        """From the stats of unsteered answers: the ``quantile`` of the reference on the bad tail's
        side, widened by ``nll_margin`` nats (NLL) and ``ratio_margin`` (distinct-2, repeat fraction),
        so unsteered answers almost never fail a cut."""
        ref = [r for r in reference if all(math.isfinite(r[k]) for k in ("nll", "distinct2", "repeat_frac"))]
        if len(ref) < 3:
            raise errors.InputError(f"need >= 3 unsteered reference answers to calibrate coherence, got {len(ref)}")
        col = {k: np.asarray([r[k] for r in ref]) for k in ("nll", "distinct2", "repeat_frac")}
        return cls(
            nll_max=float(np.quantile(col["nll"], quantile) + nll_margin),
            distinct2_min=float(max(0.0, np.quantile(col["distinct2"], 1 - quantile) - ratio_margin)),
            repeat_max=float(min(1.0, np.quantile(col["repeat_frac"], quantile) + ratio_margin)),
            max_bad=max_bad,
        )

    def bad(self, stats: dict[str, float]) -> bool:
        return bool(stats["nll"] > self.nll_max or stats["distinct2"] < self.distinct2_min
                    or stats["repeat_frac"] > self.repeat_max)

    def point(self, stats: Sequence[dict[str, float]]) -> dict[str, Any]:
        """``{coherent, bad_frac, nll, distinct2, repeat_frac}`` of one grid point's generations."""
        bad = [self.bad(s) for s in stats]
        frac = float(np.mean(bad)) if bad else 1.0
        mean = {k: float(np.mean([s[k] for s in stats])) if stats else math.nan
                for k in ("nll", "distinct2", "repeat_frac")}
        return {"coherent": frac <= self.max_bad, "bad_frac": frac, **mean}
