"""Regimes: BiPO steering vectors, and the regimes pipeline end to end on the tiny llama."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.edit import interventions as iv
from jaxpersona.compute.handle import Model
from test_pipeline import full_word_tokenizer


@pytest.fixture(scope="module")
def model(tiny_llama) -> Model:
    return Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


def test_bipo_vector_prefers_the_trait_answer_in_both_directions(model) -> None:
    from jaxpersona.compute.bipo import bipo_vector
    from jaxpersona.compute.conditions import Condition, score_conditions

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


SMALL = dict(n_pairs=1, n_train_questions=4, n_eval_questions=2, max_new_tokens=6, batch_size=4, bipo_steps=3,
             bipo_batch=2, n_boot=50, n_splits=20)
TRAIN_SMALL = dict(rank=2, epochs=1, batch_size=2, save_every=1, lr=1e-2, warmup_steps=0)


def test_regimes_run_end_to_end_and_resumes(model, tmp_path, monkeypatch) -> None:
    from jaxpersona.compute import train as train_mod
    from jaxpersona.pipelines.regimes import RegimesConfig, run_regimes
    from jaxpersona.data.traits import load_trait
    from jaxpersona.compute.train import TrainConfig

    cfg, tcfg = RegimesConfig().replace(**SMALL), TrainConfig().replace(**TRAIN_SMALL)
    a, b = load_trait("evil"), load_trait("optimistic")
    s = run_regimes(model, a, cfg, tcfg, tmp_path, trait_b=b, progress=False, log=lambda _: None)
    assert set(s["runs"]) == {"plain-trait", "steer-trait", "inoculate-trait", "kl-trait", "plain-mixed", "plain-neutral"}
    base = s["points"][0]
    assert base["run"] == "base" and base["shift"] == 0.0 and base["trait_delta"][0] == 0.0
    assert len(s["points"]) == 1 + sum(len(r["checkpoints"]) for r in s["runs"].values())
    assert {"r", "lo", "hi", "n"} <= set(s["correlation"]["response_mean"])
    per = s["cosines"]["per_layer"]["prompt_vs_finetune"]
    assert len(per["cos"]) == model.cfg.n_resid and all(lo <= hi for lo, hi in zip(per["lo"], per["hi"]))
    assert set(s["grid"]) == {"base", "base+steer", "base+prompt", "base+prompt+steer", "adapter", "adapter+steer",
                              "adapter+prompt", "adapter+prompt+steer"}
    comp = s["composition"]
    assert set(comp["steering"]) == {"none", "A", "B", "A+B", "A then B", "B then A"}
    assert comp["steering"]["none"]["A"][0] == 0.0
    for f in ("regimes.json", "regimes.txt", "cosines.png", "shift_vs_trait.png", "data/trait.jsonl",
              "data/neutral.jsonl", "data/mixed.jsonl"):
        assert (tmp_path / f).exists(), f
    from jaxpersona.artifacts.bank import VectorBank

    bank = VectorBank.load(tmp_path / "vectors")
    assert bank.names[0] == "prompt:evil" and len(bank) == 3
    # its HTML report, opened in headless chromium (tests/faces/test_report.py's checks)
    from test_report import check_report

    from jaxpersona.report import write_report

    page = write_report(tmp_path, tmp_path.parent / f"{tmp_path.name}_report" / "regimes.html")
    dom = check_report(page, tmp_path, "regimes", {"bank:vectors", "steer"})
    assert {i["alt"].split(":")[0] for i in dom.images} >= {"cosines.png", "shift_vs_trait.png"}
    assert '<span class="kind">regimes</span>' in page.read_text()
    # the trait data is stored without the system prompt that produced it
    rows = [json.loads(l) for l in (tmp_path / "data" / "trait.jsonl").read_text().splitlines()]
    assert rows and all(m["role"] != "system" for r in rows for m in r["messages"])
    # a rerun trains, generates and scores nothing and gives the same numbers
    monkeypatch.setattr(train_mod, "_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    monkeypatch.setattr(model.__class__, "generate_tokens",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    again = run_regimes(model, a, cfg, tcfg, tmp_path, trait_b=b, progress=False, log=lambda _: None)
    assert json.dumps(again["points"]) == json.dumps(s["points"])
    assert again["composition"]["steering"] == s["composition"]["steering"]


def test_regimes_bad_config(model, tmp_path) -> None:
    from jaxpersona.pipelines.regimes import RegimesConfig, load_regimes_config, run_regimes
    from jaxpersona.data.traits import load_trait
    from jaxpersona.compute.train import TrainConfig

    ev = load_trait("evil")
    for bad, needle in (({"trainers": ("plain", "magic")}, "unknown trainers"), ({"prevention": "cap"}, "steer"),
                        ({"bipo_layers": (99,)}, "outside"), ({"n_train_questions": 2}, ">= 4")):
        with pytest.raises(errors.InputError, match=needle):
            run_regimes(model, ev, RegimesConfig().replace(**{**SMALL, **bad}), TrainConfig(), tmp_path, progress=False,
                        log=lambda _: None)
    p = tmp_path / "c.toml"
    p.write_text("[regimes]\nn_pairs = 3\n[train]\nrank = 4\n")
    rc, tc = load_regimes_config(p)
    assert rc.n_pairs == 3 and tc.rank == 4
    p.write_text("[train]\nrnak = 4\n")
    with pytest.raises(errors.InputError, match="unknown train config keys"):
        load_regimes_config(p)
