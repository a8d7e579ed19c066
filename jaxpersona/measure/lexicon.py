"""A model-free second scorer: the share of an answer's words found in a trait lexicon.

Used where a check must not come from the model under study nor from anything the pipeline optimises
(the fidelity table's second scorer, named per trait in ``configs/fidelity_scorers.toml`` before a
table is run). Matching is on lower-case words: a stem ending in ``*`` matches every word starting with
it; any other stem matches the word itself or with an inflection (:data:`INFLECTIONS`); a stem of
several words matches that phrase (its last word as above). A lexicon is valid for a trait only if it
tells the trait's anchor answers from the coherent non-trait ones (:func:`anchor_auroc`).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxpersona import errors
from jaxpersona.data.traits import Anchors
from jaxpersona.measure import stats

INFLECTIONS = ("", "s", "es", "ed", "d", "ing", "ly", "er", "est")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case words (letters, digits, an inner apostrophe) of ``text``."""
    return _WORD.findall(text.lower())


def _matches(word: str, stem: str) -> bool:
    if stem.endswith("*"):
        return word.startswith(stem[:-1])
    return word.startswith(stem) and word[len(stem):] in INFLECTIONS


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """A trait lexicon: ``stems`` (see the module docstring)."""

    trait: str
    stems: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.stems or not all(isinstance(s, str) and words(s.rstrip("*")) for s in self.stems):
            raise errors.InputError(f"lexicon for {self.trait!r}: stems must be a non-empty list of words, "
                                    f"got {list(self.stems)!r}")

    def score(self, text: str) -> float | None:
        """Share of the words of ``text`` that start a match (None for a text without words)."""
        ws = words(text)
        if not ws:
            return None
        phrases = [s.split() for s in self.stems]
        hits = sum(any(i + len(p) <= len(ws) and all(w == q for w, q in zip(ws[i:i + len(p) - 1], p[:-1]))
                       and _matches(ws[i + len(p) - 1], p[-1]) for p in phrases) for i in range(len(ws)))
        return hits / len(ws)

    def scores(self, texts: Sequence[str]) -> list[float | None]:
        return [self.score(t) for t in texts]


def anchor_auroc(lexicon: Lexicon, anchors: Anchors) -> float | None:
    """AUROC of the lexicon score, the anchors' ``trait`` answers vs their ``no_trait`` answers."""
    pos = [lexicon.score(a) for _, a in anchors.of("trait")]
    neg = [lexicon.score(a) for _, a in anchors.of("no_trait")]
    return stats.auroc([x for x in pos if x is not None], [x for x in neg if x is not None])


def load_scorers(path: str | Path) -> tuple[dict[str, Lexicon], float]:
    """``({trait: Lexicon}, min_auroc)`` from a scorer config (``configs/fidelity_scorers.toml``)."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise errors.InputError(f"scorer config {path}: {e}") from e
    table = data.get("scorers")
    if not isinstance(table, dict) or not table:
        raise errors.InputError(f"scorer config {path}: needs [scorers.<trait>] tables")
    out = {}
    for trait, spec in table.items():
        if not isinstance(spec, dict) or spec.get("kind") != "lexicon":
            raise errors.InputError(f"scorer config {path}: scorers.{trait}.kind must be \"lexicon\"")
        out[trait] = Lexicon(trait, tuple(spec.get("stems", ())))
    return out, float(data.get("min_auroc", 0.8))
