"""The check a judge must pass before it is trusted."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from jaxpersona.data.traits import coherence_prompt
from jaxpersona.measure import stats


# --- the judge check --------------------------------------------------------------------------------
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

    @property
    def passed(self) -> bool:
        return (self.checked and self.trait_auroc is not None and self.coherence_auroc is not None
                and self.trait_auroc >= self.min_auroc and self.coherence_auroc >= self.min_auroc)

    def describe(self) -> str:
        if not self.checked:
            return f"judge {self.judge} is UNCHECKED (no anchor answers for this trait): not trusted"
        f = lambda x: "not run" if x is None else f"{x:.2f}"  # noqa: E731
        verdict = "passed" if self.passed else "FAILED"
        return (f"judge {self.judge} {verdict} its check on {sum(self.n.values())} anchor answers: AUROC trait "
                f"{f(self.trait_auroc)}, coherence {f(self.coherence_auroc)} (need >= {self.min_auroc:g}; "
                f"{self.scored_frac:.0%} of judgements scored)")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


def check_judge(score: Callable[[list[str]], list[float | None]], trait: Any, anchors: Any, judge_id: str,
                min_auroc: float = 0.8, full: bool = False) -> JudgeCheck:
    """Score ``anchors`` (a :class:`~jaxpersona.data.traits.Anchors` or None) with ``score(prompts)`` on the
    trait rubric (trait vs no_trait) and the coherence rubric (coherent vs incoherent). The coherence
    rubric is skipped (AUROC None) when the trait check already failed, unless ``full``."""
    if anchors is None:
        return JudgeCheck(judge_id, None, None, min_auroc, {}, 0.0, False)
    yes, no, bad = anchors.of("trait"), anchors.of("no_trait"), anchors.of("incoherent")
    nan = lambda xs: [math.nan if x is None else x for x in xs]  # noqa: E731  (unscored: never separates)
    ts = score([trait.judge_prompt(q, a) for q, a in yes + no])
    t_auc = stats.auroc(nan(ts[: len(yes)]), nan(ts[len(yes):]))
    cs: list[float | None] = []
    c_auc = None
    if full or (t_auc is not None and t_auc >= min_auroc):  # a failed trait check already fails the judge
        cs = score([coherence_prompt(q, a) for q, a in yes + no + bad])
        c_auc = stats.auroc(nan(cs[: len(yes) + len(no)]), nan(cs[len(yes) + len(no):]))
    scored = sum(x is not None for x in ts + cs) / max(len(ts) + len(cs), 1)
    return JudgeCheck(judge_id, t_auc, c_auc, min_auroc, {"trait": len(yes), "no_trait": len(no), "incoherent": len(bad)},
                      scored, True)
