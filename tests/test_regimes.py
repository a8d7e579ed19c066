"""Regimes: BiPO steering vectors, and the regimes pipeline end to end on the tiny llama."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona import interventions as iv
from jaxpersona.model import Model
from test_pipeline import full_word_tokenizer


@pytest.fixture(scope="module")
def model(tiny_llama) -> Model:
    return Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


def test_bipo_vector_prefers_the_trait_answer_in_both_directions(model) -> None:
    from jaxpersona.bipo import bipo_vector
    from jaxpersona.grid import Condition, score_conditions

    qs = ["hello world", "what is the capital", "the dog sat", "you are a cat", "paris is", "what is a mat"]
    pos = ["the cat sat on the mat ."] * len(qs)
    neg = ["hello paris world , dog !"] * len(qs)
    v, losses = bipo_vector(model, qs, pos, neg, layer=2, steps=25, lr=5e-2, batch_size=4, seed=0)
    assert v.shape == (model.cfg.d_model,) and np.linalg.norm(v) > 0
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    allp = iv.Positions.all(np.ones((1, 1), bool))
    conds = [Condition("base"), Condition("+v", hook=iv.steer(model.cfg.n_resid, v, 1.0, [2], allp)),
             Condition("-v", hook=iv.steer(model.cfg.n_resid, v, -1.0, [2], allp))]
    margin = (score_conditions(model, None, conds, qs, pos) - score_conditions(model, None, conds, qs, neg)).mean(1)
    assert margin[1] > margin[0] + 0.05 and margin[2] < margin[0] - 0.05
    with pytest.raises(errors.InputError, match="outside"):
        bipo_vector(model, qs, pos, neg, layer=0)
    with pytest.raises(errors.InputError, match=">= 2"):
        bipo_vector(model, qs[:1], pos[:1], neg[:1], layer=1)
