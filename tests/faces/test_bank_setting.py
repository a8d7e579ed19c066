"""The steering setting a bank records (positions, coefficient) is what the server, the report and the
exports use by default."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.interop import export_control_vector
from jaxpersona.report import example_steer
from jaxpersona.serve.protocol import Resources, parse_item

N, D = 5, 8


def _resources(positions: dict[str, str]) -> Resources:
    vec = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    return Resources("m", N, D, {"evil": vec, "kind": vec}, {"evil": None, "kind": None}, {"evil": 2}, {}, 4, 4,
                     positions)


def test_server_steers_at_the_banks_chosen_positions_unless_told() -> None:
    res = _resources({"evil": "response"})
    steer = {"kind": "steer", "vector": "evil", "layers": 2, "coeff": 1.0}
    assert parse_item(steer, res, "x")[0].positions == "response"
    assert parse_item({**steer, "positions": "all"}, res, "x")[0].positions == "all"
    assert parse_item({**steer, "vector": "kind"}, res, "x")[0].positions == "all"  # no recorded setting
    raw = {**steer, "vector": [0.0] * (D - 1) + [1.0]}
    assert parse_item(raw, res, "x")[0].positions == "all"
    cap = {"kind": "cap", "vector": "evil", "layers": 2, "ceiling": 1.0}
    assert parse_item(cap, res, "x")[0].positions == "all"  # the setting was chosen for steering


def test_report_example_uses_the_recorded_setting() -> None:
    vec = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
    meta = {"best_layer": 3, "best_coeff": 0.25, "positions": "all", "resid_norm": [2.0] * N}
    hook, caption = example_steer(vec, "evil", meta)
    assert "resid[3]" in caption and "0.25" in caption and "at all positions" in caption
    assert bool(np.asarray(hook.positions.after).all()) and float(hook.coeff) == 0.25
    hook, caption = example_steer(vec, "evil", {"best_layer": 3, "resid_norm": [2.0] * N})
    assert "at response positions" in caption and "records no chosen setting" in caption


def test_control_vector_export_says_llama_cpp_steers_every_position(tmp_path) -> None:
    vec = np.random.default_rng(2).standard_normal((1, N, D)).astype(np.float32)
    bank = VectorBank(vec, ("evil",), "m", ({"positions": "response"},))
    with pytest.warns(UserWarning, match="steers every position"):
        export_control_vector(bank, "evil", tmp_path / "a.gguf")
    bank = VectorBank(vec, ("evil",), "m", ({"positions": "all"},))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_control_vector(bank, "evil", tmp_path / "b.gguf")
