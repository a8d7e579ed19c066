"""Judge-free measures, anchors and the judge check: statistics against textbook values, the judge
check against judges that do and do not separate the anchors, the pipeline's judge-free path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.measure import stats
from jaxpersona.measure.judge_check import check_judge
from jaxpersona.edit.directions import steering_vectors
from jaxpersona.data.traits import ANCHOR_LABELS, anchors_from_dict, list_traits, load_anchors, load_trait


def test_auroc_spearman_pearson_ci_bootstrap():
    assert stats.auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert stats.auroc([0, 1], [2, 3]) == 0.0
    assert stats.auroc([1, 1], [1, 1]) == 0.5  # ties count one half
    assert stats.auroc([2, 0], [1]) == 0.5
    assert stats.auroc([], [1]) is None
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 2], [1, 2]) is None
    x = np.arange(50.0)
    y = x + np.random.default_rng(0).normal(scale=10, size=50)
    ci = stats.pearson_ci(x, y)
    assert ci["lo"] < ci["r"] < ci["hi"] and ci["n"] == 50
    assert ci["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    # Fisher z: r = 0.5, n = 28 -> z = 0.5493 +- 1.96/5 -> [0.1568, 0.7302]
    r, n = 0.5, 28
    want = (math.tanh(math.atanh(r) - 1.959964 / 5), math.tanh(math.atanh(r) + 1.959964 / 5))
    assert stats._normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert want[0] == pytest.approx(0.1569, abs=1e-3)
    mean, lo, hi = stats.bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0)
    assert mean == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    assert stats.bootstrap_ci([1.0, 2.0, 3.0], seed=3) == stats.bootstrap_ci([1.0, 2.0, 3.0], seed=3)
    assert stats.bootstrap_ci([5.0]) == (5.0, 5.0, 5.0)


def test_text_stats_and_coherence_thresholds():
    assert stats.distinct_n([1, 2, 3, 4], 2) == 1.0
    assert stats.distinct_n([7, 7, 7, 7, 7], 2) == 0.25  # one distinct bigram of four
    assert stats.longest_repeat([1, 2, 3, 1, 2, 3, 9]) == 3
    assert stats.longest_repeat([1, 2, 3, 4]) == 0
    assert stats.longest_repeat([5, 5, 5, 5]) == 3  # overlapping repeats count
    ref = [{"nll": 2.0 + 0.1 * i, "distinct2": 0.95, "repeat_frac": 0.05} for i in range(10)]
    thr = stats.CoherenceThresholds.calibrate(ref)
    assert thr.nll_max == pytest.approx(np.quantile([r["nll"] for r in ref], 0.95) + 1.0)
    assert not any(thr.bad(r) for r in ref)  # unsteered answers pass
    loop = {"nll": 0.3, **stats.text_stats([42] * 24)}  # "resilient resilient ...": likely, but repetitive
    assert thr.bad(loop)
    assert thr.bad({"nll": 9.0, "distinct2": 1.0, "repeat_frac": 0.0})  # word salad: unlikely
    cell = thr.point([ref[0]] * 3 + [loop])
    assert cell["coherent"] and cell["bad_frac"] == 0.25  # 1 of 4 is not more than max_bad
    assert not thr.point([ref[0], loop])["coherent"]
    with pytest.raises(errors.InputError, match="reference"):
        stats.CoherenceThresholds.calibrate(ref[:2])


def test_shipped_anchors_validate_and_mismatches_are_errors(tmp_path):
    for name in list_traits():
        a = load_anchors(load_trait(name))
        assert a is not None and a.trait == name and all(len(a.of(lab)) >= 3 for lab in ANCHOR_LABELS)
    evil, opt = load_trait("evil"), load_trait("optimistic")
    data = json.loads((Path(load_anchors(evil).source)).read_text())
    with pytest.raises(errors.TraitFileError, match="is for trait 'evil', not 'optimistic'"):
        anchors_from_dict(data, opt)
    few = {"trait": "evil", "anchors": data["anchors"][:2] + [a for a in data["anchors"] if a["label"] != "trait"]}
    with pytest.raises(errors.TraitFileError, match="too few anchors"):
        anchors_from_dict(few, evil)
    bad = {"trait": "evil", "anchors": [{"label": "evilish", "question": "q", "answer": "a"}]}
    with pytest.raises(errors.TraitFileError, match="label"):
        anchors_from_dict(bad, evil)
    p = tmp_path / "a.json"
    p.write_text(json.dumps(data))
    assert load_anchors(evil, p).trait == "evil"


def _labels_judge(anchors, trait_good: bool, coherence_good: bool):
    """A scorer that knows the anchors' labels: separates them perfectly, or not at all."""
    from jaxpersona.data.traits import coherence_prompt

    evil = load_trait("evil")
    label = {}
    for lab, q, a in anchors.rows:
        label[evil.judge_prompt(q, a)] = ("t", lab)
        label[coherence_prompt(q, a)] = ("c", lab)

    def score(prompts):
        out = []
        for p in prompts:
            kind, lab = label[p]
            good = trait_good if kind == "t" else coherence_good
            hit = lab == "trait" if kind == "t" else lab != "incoherent"
            out.append((90.0 if hit else 10.0) if good else 50.0)
        return out
    return score


def test_check_judge_passes_fails_and_skips():
    evil = load_trait("evil")
    anchors = load_anchors(evil)
    ok = check_judge(_labels_judge(anchors, True, True), evil, anchors, "perfect")
    assert ok.passed and ok.trait_auroc == 1.0 and ok.coherence_auroc == 1.0 and "passed" in ok.describe()
    flat = check_judge(_labels_judge(anchors, False, True), evil, anchors, "flat")
    assert not flat.passed and flat.trait_auroc == 0.5 and flat.coherence_auroc is None  # no need to go on
    assert "FAILED" in flat.describe()
    full = check_judge(_labels_judge(anchors, False, True), evil, anchors, "flat", full=True)
    assert full.coherence_auroc == 1.0 and not full.passed
    incoh = check_judge(_labels_judge(anchors, True, False), evil, anchors, "no-coherence")
    assert not incoh.passed and incoh.coherence_auroc == 0.5
    none = check_judge(_labels_judge(anchors, True, True), evil, None, "x")
    assert not none.checked and not none.passed and "UNCHECKED" in none.describe()


def test_relative_units_need_recorded_norms():
    v = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    norms = np.array([1.0, 2.0, 4.0], np.float32)
    rel = steering_vectors(v, norms, "relative")
    np.testing.assert_allclose(np.linalg.norm(rel, axis=-1), norms, rtol=1e-6)
    np.testing.assert_array_equal(steering_vectors(v, None, "absolute"), v)
    with pytest.raises(errors.InputError, match="re-run `jaxpersona extract`"):
        steering_vectors(v, None, "relative")
    with pytest.raises(errors.InputError, match="shape"):
        steering_vectors(v, norms[:2], "relative")


def test_cli_sweep_relative_units_on_a_bank_without_norms_exits_2(tmp_path, capsys):
    """An older bank (no recorded residual norms) with relative units: one clear line saying how to
    recompute them, exit 2."""
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.cli import main
    from jaxpersona.compute.handle import load

    cfg = load("smollm2-135m-instruct").cfg
    vecs = np.random.default_rng(0).normal(size=(1, cfg.n_resid, cfg.d_model)).astype(np.float32)
    VectorBank(vectors=vecs, names=("old",), model="smollm2-135m-instruct").save(tmp_path / "bank")
    conf = tmp_path / "s.toml"
    conf.write_text('[vector]\nbank = "bank"\nentry = "old"\n[grid]\nlayers = [10]\ncoeffs = [0.0, 0.5]\n'
                    'units = "relative"\n[data]\nprompts = ["Hi"]\nresponses = ["Hello!"]\n')
    assert main(["sweep", "--config", str(conf), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "re-run `jaxpersona extract`" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_jackknife_interval_of_a_mean_matches_the_standard_error() -> None:
    """For a mean the jackknife SE equals s / sqrt(n) exactly; and a cosine's interval holds its estimate."""
    from jaxpersona.measure.stats import jackknife_interval

    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    loo = np.array([np.delete(x, i).mean() for i in range(30)])
    lo, hi = jackknife_interval(x.mean(), loo)
    se = x.std(ddof=1) / np.sqrt(30)
    np.testing.assert_allclose([lo, hi], [x.mean() - 1.959964 * se, x.mean() + 1.959964 * se], rtol=1e-5)
    from jaxpersona.pipelines.regimes import regime_cosines

    a, b = rng.normal(size=(20, 3, 8)) + 0.5, rng.normal(size=(20, 3, 8)) + 0.5
    for paired in (False, True):
        r = regime_cosines(a, b, None, paired=paired)
        assert all(lo <= c <= hi for c, lo, hi in zip(r["cos"], r["lo"], r["hi"]))
        assert all(hi - lo > 0.01 for lo, hi in zip(r["lo"], r["hi"]))
