"""The model-free lexicon scorer of the fidelity table (measure/lexicon.py) and its committed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxpersona import errors
from jaxpersona.data.traits import Anchors, list_traits
from jaxpersona.measure.lexicon import Lexicon, anchor_auroc, load_scorers

ROOT = Path(__file__).resolve().parents[2]


def test_matching_rules() -> None:
    lex = Lexicon("t", ("hope", "opportunit*", "great question"))
    assert lex.score("Hope hopes hoped") == 1.0  # inflections
    assert lex.score("hoping") == 0.0  # a changed stem needs a * stem
    assert lex.score("hopeless hopeful") == 0.0  # not an inflection; no * on the stem
    assert lex.score("Opportunities opportunity!") == 1.0
    assert lex.score("What a great question, a great day") == pytest.approx(1 / 7)  # the phrase, once
    assert lex.score("...") is None
    with pytest.raises(errors.InputError):
        Lexicon("t", ())


def test_anchor_auroc() -> None:
    lex = Lexicon("t", ("sunny",))
    anchors = Anchors("t", (("trait", "q", "sunny sunny"), ("trait", "q", "a sunny day"), ("no_trait", "q", "rain"),
                            ("no_trait", "q", "grey sky"), ("incoherent", "q", "sunny sunny sunny")))
    assert anchor_auroc(lex, anchors) == 1.0
    assert anchor_auroc(Lexicon("t", ("rain",)), anchors) == 0.25


def test_committed_scorer_config_names_every_shipped_trait(tmp_path) -> None:
    scorers, min_auroc = load_scorers(ROOT / "configs" / "fidelity_scorers.toml")
    assert set(scorers) == set(list_traits()) and min_auroc == 0.8
    bad = tmp_path / "bad.toml"
    bad.write_text("[scorers.evil]\nkind = \"judge\"\n")
    with pytest.raises(errors.InputError, match="lexicon"):
        load_scorers(bad)
    bad.write_text("not toml = = 1")
    with pytest.raises(errors.InputError):
        load_scorers(bad)
