"""The check a judge must pass before it is trusted: one mechanism for every use.

A judge is checked on **labelled sets**: judge prompts of one rubric, each labelled 1 (the judge should
score it high) or 0 (low). Its **AUROC** on a set (label-1 scores vs label-0 scores; an unscored prompt
never separates) is compared with a threshold, giving a :class:`Verdict` for that **use**:

* ``trait`` — the trait rubric on a trait's anchor answers (clearly the trait = 1, clearly not = 0);
* ``coherence`` — the coherence rubric on the same anchors plus broken text (coherent = 1, incoherent = 0);
* ``role`` — a role's rubric on a space run's own answers (role-prompted answer = 1, the default
  Assistant's answer to the same question = 0).

:func:`check_set` scores one set; :func:`run_checks` scores sets in order (stopping after the first failed
verdict unless ``full``);
:func:`check_judge` is the trait + coherence check of ``extract`` (:class:`JudgeCheck`), and
``pipelines.space`` builds its ``role`` set from the run's answers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from jaxpersona import errors
from jaxpersona.data.traits import coherence_prompt
from jaxpersona.measure import stats

USES = ("trait", "coherence", "role")

Score = Callable[[list[str]], list[float | None]]


@dataclasses.dataclass(frozen=True)
class Labelled:
    """Judge prompts of one rubric (``use``) with 0/1 labels: ``labels[i] == 1`` -> ``prompts[i]`` should score high."""

    use: str
    prompts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.use not in USES:
            raise errors.InputError(f"a judge check's use must be one of {USES}, got {self.use!r}")
        if len(self.prompts) != len(self.labels) or any(x not in (0, 1) for x in self.labels):
            raise errors.InputError(f"labelled set {self.use!r}: need one 0/1 label per prompt, got "
                                    f"{len(self.prompts)} prompts and labels {sorted(set(self.labels))[:4]}")

    @classmethod
    def of(cls, use: str, high: Sequence[str], low: Sequence[str]) -> Labelled:
        """``high`` (label 1) then ``low`` (label 0): the order in which they are scored."""
        return cls(use, (*high, *low), (1,) * len(high) + (0,) * len(low))


def separation(scores: Sequence[float | None], labels: Sequence[int]) -> float | None:
    """AUROC of the label-1 scores against the label-0 scores (None -> NaN: an unscored prompt never
    separates); None when a side has no finite score."""
    vals = [math.nan if x is None else x for x in scores]
    return stats.auroc([v for v, y in zip(vals, labels) if y == 1], [v for v, y in zip(vals, labels) if y == 0])


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judge's result on one labelled set: its AUROC against ``min_auroc``."""

    use: str
    auroc: float | None
    n: int  # prompts scored
    min_auroc: float
    interval: tuple[float | None, float | None] = (None, None)  # bootstrap 95% of the AUROC

    @property
    def passed(self) -> bool:
        return self.auroc is not None and self.auroc >= self.min_auroc


def check_set(score: Score, labelled: Labelled, min_auroc: float) -> tuple[Verdict, list[float | None]]:
    """Score one labelled set with ``score(prompts)`` (one call) -> its verdict and the scores."""
    got = list(score(list(labelled.prompts)))
    vals = [(v, y) for v, y in zip(got, labelled.labels) if v is not None]
    _, lo, hi = stats.auroc_ci([v for v, y in vals if y == 1], [v for v, y in vals if y == 0])
    return Verdict(labelled.use, separation(got, labelled.labels), len(labelled.prompts), min_auroc, (lo, hi)), got


def run_checks(score: Score, sets: Sequence[Labelled], min_auroc: float, *, full: bool = False
               ) -> tuple[list[Verdict | None], list[float | None]]:
    """:func:`check_set` on each set in order -> a verdict per set and every score given. After a failed
    verdict the remaining sets are not scored (their verdict is None) unless ``full``: a judge that
    failed one use is already not trusted."""
    verdicts: list[Verdict | None] = []
    scores: list[float | None] = []
    stop = False
    for s in sets:
        if stop:
            verdicts.append(None)
            continue
        v, got = check_set(score, s, min_auroc)
        scores += got
        verdicts.append(v)
        stop = not (full or v.passed)
    return verdicts, scores


def scored_fraction(scores: Sequence[float | None]) -> float:
    """Fraction of judgements that got a score (integer mass >= min_mass)."""
    return sum(x is not None for x in scores) / max(len(scores), 1)


# --- the trait judge of ``extract`` ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JudgeCheck:
    """How well a judge separates a trait's anchors. ``passed``: both AUROCs >= ``min_auroc``."""

    judge: str
    trait_auroc: float | None  # trait vs no_trait answers, on the trait rubric
    coherence_auroc: float | None  # trait + no_trait vs incoherent answers, on the coherence rubric
    min_auroc: float
    n: dict[str, int]
    scored_frac: float  # fraction of anchor judgements that got a score (integer mass >= min_mass)
    checked: bool  # False: no anchors for this trait (an unchecked judge is not trusted)
    intervals: dict[str, tuple[float | None, float | None]] = dataclasses.field(default_factory=dict)  # 95% bootstrap

    @property
    def passed(self) -> bool:
        return (self.checked and self.trait_auroc is not None and self.coherence_auroc is not None
                and self.trait_auroc >= self.min_auroc and self.coherence_auroc >= self.min_auroc)

    def describe(self) -> str:
        if not self.checked:
            return f"judge {self.judge} is UNCHECKED (no anchor answers for this trait): not trusted"

        def f(x: float | None, use: str) -> str:
            lo, hi = self.intervals.get(use, (None, None))
            return "not run" if x is None else f"{x:.2f}" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")
        verdict = "passed" if self.passed else "FAILED"
        return (f"judge {self.judge} {verdict} its check on {sum(self.n.values())} anchor answers: AUROC trait "
                f"{f(self.trait_auroc, 'trait')}, coherence {f(self.coherence_auroc, 'coherence')} (need >= {self.min_auroc:g}; "
                f"{self.scored_frac:.0%} of judgements scored)")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


def anchor_sets(trait: Any, anchors: Any) -> list[Labelled]:
    """The ``trait`` and ``coherence`` labelled sets of a trait's anchors (a
    :class:`~jaxpersona.data.traits.Anchors`)."""
    yes, no, bad = anchors.of("trait"), anchors.of("no_trait"), anchors.of("incoherent")
    return [Labelled.of("trait", [trait.judge_prompt(q, a) for q, a in yes], [trait.judge_prompt(q, a) for q, a in no]),
            Labelled.of("coherence", [coherence_prompt(q, a) for q, a in yes + no],
                        [coherence_prompt(q, a) for q, a in bad])]


def check_judge(score: Score, trait: Any, anchors: Any, judge_id: str, min_auroc: float = 0.8,
                full: bool = False) -> JudgeCheck:
    """Score ``anchors`` (a :class:`~jaxpersona.data.traits.Anchors` or None) with ``score(prompts)`` on the
    trait rubric (trait vs no_trait) and the coherence rubric (coherent vs incoherent). The coherence
    rubric is skipped (AUROC None) when the trait check already failed, unless ``full``."""
    if anchors is None:
        return JudgeCheck(judge_id, None, None, min_auroc, {}, 0.0, False)
    (trait_v, coherence_v), scores = run_checks(score, anchor_sets(trait, anchors), min_auroc, full=full)
    n = {"trait": len(anchors.of("trait")), "no_trait": len(anchors.of("no_trait")),
         "incoherent": len(anchors.of("incoherent"))}
    intervals = {v.use: v.interval for v in (trait_v, coherence_v) if v is not None}
    return JudgeCheck(judge_id, trait_v.auroc if trait_v else None, coherence_v.auroc if coherence_v else None,
                      min_auroc, n, scored_fraction(scores), True, intervals)
