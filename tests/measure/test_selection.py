"""Choosing a steering setting on some questions and reporting on others (measure/selection.py)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.measure import selection as sel

N = 10


def _grid(gains: dict[tuple[str, str, int, float], float], noise: float = 0.0, bad_at: dict | None = None,
          seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    deltas = {k: np.full(N, g) + noise * rng.standard_normal(N) for k, g in gains.items()}
    bad = {k: np.zeros(N, bool) for k in gains}
    for k, frac in (bad_at or {}).items():
        bad[k] = np.arange(N) < round(frac * N)
    return deltas, bad


def test_select_respects_the_cliff_and_prefers_lower_layers_on_ties() -> None:
    gains = {("response", "response_mean", 4, 0.5): 0.2, ("response", "response_mean", 4, 1.0): 0.9,
             ("response", "response_mean", 4, 2.0): 0.5, ("response", "response_mean", 8, 0.5): 0.3,
             ("response", "response_mean", 8, 1.0): 0.3, ("response", "response_mean", 4, 0.0): 0.0}
    # at layer 4, c=1.0 is incoherent (the cliff) and c=2.0 coherent again: both are excluded
    deltas, bad = _grid(gains, bad_at={("response", "response_mean", 4, 1.0): 0.5})
    got = sel.select(deltas, bad, None, max_bad=0.25)
    assert got["setting"] == ("response", "response_mean", 8, 0.5)  # 0.3 beats layer 4's 0.2; ties: lower c
    assert got["cliff"] is None
    # 3 of 10 bad is above max_bad 0.25 -> layer 8's 1.0 would be its cliff; 2 of 10 is not
    deltas, bad = _grid(gains, bad_at={("response", "response_mean", 8, 0.5): 0.2,
                                       ("response", "response_mean", 4, 1.0): 0.5})
    assert sel.select(deltas, bad, None, max_bad=0.25)["setting"] == ("response", "response_mean", 8, 0.5)
    deltas, bad = _grid(gains, bad_at={("response", "response_mean", 8, 0.5): 0.3,
                                       ("response", "response_mean", 4, 1.0): 0.5})
    got = sel.select(deltas, bad, None, max_bad=0.25)
    assert got["setting"] == ("response", "response_mean", 4, 0.5) and got["cliff"] == 1.0


def test_select_keeps_the_default_unless_beaten_by_more_than_its_standard_error() -> None:
    d, a = ("response", "response_mean", 4, 0.5), ("all", "response_mean", 4, 0.5)
    default = np.linspace(0.1, 0.5, N)
    wobble = np.tile([0.5, -0.44], N // 2)  # mean +0.03, standard error ~0.16
    ok = {d: np.zeros(N, bool), a: np.zeros(N, bool)}
    got = sel.select({d: default, a: default + wobble}, ok, None, max_bad=0.25)
    assert got["setting"] == d and "default" in got["reason"]
    got = sel.select({d: default, a: default + wobble + 0.5}, ok, None, max_bad=0.25)
    assert got["setting"] == a and "beat the default" in got["reason"]
    got = sel.select({d: default, a: default + wobble}, ok, None, max_bad=0.25, default=("all", "response_mean"))
    assert got["setting"] == a  # the default is the top itself
    assert set(got["per_how"]) == {"response/response_mean", "all/response_mean"}


def test_select_without_any_coherent_positive_coefficient() -> None:
    k = ("response", "response_mean", 4, 0.5)
    deltas, bad = _grid({k: 1.0}, bad_at={k: 1.0})
    assert sel.select(deltas, bad, None, max_bad=0.25)["setting"] is None
    with pytest.raises(errors.InputError):
        sel.select(deltas, bad, [], max_bad=0.25)


def test_cross_fit_reads_each_fold_under_the_setting_the_other_fold_chose() -> None:
    a, b = ("response", "response_mean", 4, 0.5), ("response", "response_mean", 8, 0.5)
    folds = sel.folds_of(N, 2, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(N)) and abs(len(folds[0]) - len(folds[1])) <= 1
    # a is good exactly on fold 0's questions, b on fold 1's: each fold is read under the other's winner
    da, db = np.zeros(N), np.zeros(N)
    da[folds[0]], db[folds[1]] = 1.0, 0.8
    got = sel.cross_fit({a: da, b: db}, {a: np.zeros(N, bool), b: np.zeros(N, bool)}, folds=2, max_bad=0.25, seed=3)
    held = np.zeros(N)  # fold 0 chosen on fold 1 -> b (0 on fold 0); fold 1 chosen on fold 0 -> a (0 on fold 1)
    assert got["gain"] == pytest.approx(held.mean()) and got["n"] == N
    assert [tuple(f["setting"]) for f in got["folds"]] == [b, a] and not got["stable"]
    # one setting better everywhere: stable, and the held-out gain is its gain
    got = sel.cross_fit({a: da + 1.0, b: db}, {a: np.zeros(N, bool), b: np.zeros(N, bool)}, folds=2, max_bad=0.25,
                        seed=3)
    assert got["stable"] and got["gain"] == pytest.approx((da + 1.0).mean()) and got["lo"] <= got["gain"] <= got["hi"]
    assert got["share_positive"] == 1.0
    with pytest.raises(errors.InputError):
        sel.folds_of(3, 4, 0)


def test_dose_response_slope_below_the_cliff() -> None:
    rng = np.random.default_rng(0)
    slopes = rng.uniform(0.5, 1.5, N)
    deltas = {c: slopes * c + 0.3 for c in (-0.25, 0.0, 0.25, 0.5, 1.0, 2.0)}
    deltas[2.0] = slopes * -5.0  # past the cliff: must not count
    got = sel.dose_response(deltas, cliff=2.0)
    assert got["slope"] == pytest.approx(slopes.mean()) and got["lo"] <= got["slope"] <= got["hi"]
    assert got["coeffs"] == [-0.25, 0.0, 0.25, 0.5, 1.0] and got["n"] == N
    assert sel.dose_response(deltas, cliff=0.25)["slope"] is None  # only -0.25 and 0 below it


def test_paired_gain_against_a_control() -> None:
    g = np.linspace(0.5, 1.5, N)
    got = sel.paired_gain(g, g - 0.4)
    assert got["diff"] == pytest.approx(0.4) and got["beats"]
    assert not sel.paired_gain(g, g + np.linspace(-0.2, 0.2, N))["beats"]


def test_instruction_words_and_echo() -> None:
    words = sel.instruction_words(["You are an evil assistant. Be malicious and cruel in every answer."],
                                  ["You are a helpful assistant. Be kind in every answer."])
    assert words == ["cruel", "evil", "malicious"]
    assert sel.echo_rate(["That is cruel.", "Sunny today.", "EVIL!", "evilness"], words) == 0.5
    assert sel.echo_rate([], words) is None


def test_extract_config_rejects_bad_steering_axes() -> None:
    from jaxpersona.pipelines.persona import ExtractConfig

    ok = ExtractConfig()
    ok.validate(31)
    for bad in ({"steer_positions": ("response", "middle")}, {"steer_positions": ()},
                {"steer_variants": ("response_mean", "response_mean")}, {"folds": 1}, {"folds": 21},
                {"n_random": 0}):
        with pytest.raises(errors.InputError):
            ExtractConfig(**bad).validate(31)
