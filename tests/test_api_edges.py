"""The library's edges, called directly (not through the CLI or a pipeline): inputs that used to give a silent
wrong number, a silent no-op, or a bare Python/JAX error now raise a typed ``jaxpersona.errors`` error; the
inputs next to them still work and give the right numbers.

The model is a random 3-block Llama with SmolLM2's real tokenizer and chat template: every call takes
milliseconds after its compile.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import jaxpersona as jp
from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.compute.activations import contrast_vectors
from jaxpersona.compute.generate import generate
from jaxpersona.compute.handle import Model, weights_source
from jaxpersona.compute.scoring import ScoringSet, mean_logprobs
from jaxpersona.compute.sweep import Grid, run_sweep
from jaxpersona.data.chat import conversation
from jaxpersona.edit import interventions as iv
from jaxpersona.edit.capping import CapConfig, percentile_floors
from jaxpersona.edit.directions import steering_vectors
from jaxpersona.model.loaders.hf import load_tokenizer
from jaxpersona.model.transformer import Capture

DATA = ScoringSet(("How are you?", "Name a colour."), ("Fine, thanks.", "Blue."))


def _tiny(seed: int, name: str) -> Model:
    cfg = jp.from_hf_config(dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                 tie_word_embeddings=True, rms_norm_eps=1e-5))
    return Model(cfg, jp.init_params(cfg, jax.random.key(seed), scale=0.2), load_tokenizer(weights_source().path), name)


@pytest.fixture(scope="module")
def model() -> Model:
    return _tiny(0, "tiny-a")


@pytest.fixture(scope="module")
def other() -> Model:
    return _tiny(1, "tiny-b")


def _vec(model: Model, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, model.cfg.d_model)).astype(np.float32)


# --- a sweep's resumable rows belong to one model -------------------------------------------------
def test_a_sweep_out_dir_never_serves_another_models_rows(model, other, tmp_path):
    grid = Grid("steer", _vec(model), ("v",), (1,), (0.0, 2.0))
    mine = run_sweep(model, grid, DATA, out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "model.json").read_text())["model"]
    assert run_sweep(model, grid, DATA, out_dir=tmp_path, progress=False) == mine  # the same model resumes
    with pytest.raises(errors.ResumeMismatchError, match="another model"):
        run_sweep(other, grid, DATA, out_dir=tmp_path, progress=False)
    fresh = run_sweep(other, grid, DATA, progress=False)
    assert [r["logprob"] for r in fresh] != [r["logprob"] for r in mine]  # what it would have served was wrong


def test_a_sweep_out_dir_from_before_the_model_record_is_adopted(model, tmp_path):
    grid = Grid("steer", _vec(model), ("v",), (1,), (0.0, 2.0))
    rows = run_sweep(model, grid, DATA, out_dir=tmp_path, progress=False)
    (tmp_path / "model.json").unlink()  # a store written before 0.7.10
    assert run_sweep(model, grid, DATA, out_dir=tmp_path, progress=False) == rows
    assert (tmp_path / "model.json").exists()


# --- grids: what a row would not say --------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (dict(kind="cap", coeffs=(1.0,), cap_floor=5.0), "cap_floor"),  # a floor above the ceiling
    (dict(kind="cap", coeffs=(1.0,), cap_floor=float("nan")), "cap_floor"),
    (dict(kind="cap", coeffs=(1.0,), cap_floor=float("inf")), "cap_floor"),
    (dict(kind="ablate", vectors=np.zeros((1, 64), np.float32)), "non-zero"),
    (dict(kind="cap", vectors=np.zeros((1, 64), np.float32)), "non-zero"),
    (dict(layers=(1.5,)), "whole resid indices"),  # was run, and reported, as layer 1
    (dict(layers=(1, 1)), "layers repeat"),
    (dict(coeffs=(1.0, 1.0)), "coefficients repeat"),
    (dict(vectors=np.ones((2, 64), np.float32), names=("v", "v")), "names repeat"),
    (dict(names="v"), "sequence of non-empty strings"),
    (dict(window=0), "window"),
])
def test_a_grid_refuses_what_its_rows_could_not_show(model, change, match):
    kw = dict(kind="steer", vectors=_vec(model), names=("v",), layers=(1,), coeffs=(1.0,))
    kw.update(change)
    with pytest.raises(errors.InputError, match=match):
        run_sweep(model, Grid(**kw), DATA, progress=False)


def test_a_cap_grid_with_a_floor_below_its_ceilings_runs(model):
    rows = run_sweep(model, Grid("cap", _vec(model), ("v",), (1,), (1.0, 2.0), cap_floor=-1.0), DATA, progress=False)
    assert len(rows) == 4 and all(np.isfinite(r["logprob"]) for r in rows)


@pytest.mark.parametrize("kw,match", [
    (dict(project={"p": np.ones(64, np.float32)}), "project_layers"),  # no columns would appear
    (dict(project_layers=(1,)), "project"),
    (dict(project={"p": np.ones(64, np.float32)}, project_layers=(2.9,)), "whole resid indices"),
    (dict(generate_tokens=-1), "generate_tokens"),
    (dict(budget_bytes=0), "budget_bytes"),
])
def test_run_sweep_refuses_bad_options(model, kw, match):
    with pytest.raises(errors.InputError, match=match):
        run_sweep(model, Grid("steer", _vec(model), ("v",), (1,), (1.0,)), DATA, progress=False, **kw)


# --- capping configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("floor,ceiling,direction,match", [
    (np.inf, np.inf, 1.0, "must be numbers"),  # every logit NaN
    (np.nan, 1.0, 1.0, "must be numbers"),  # a silent no-op (NaN > ceiling is False)
    (-1.0, -np.inf, 1.0, "must be numbers"),
    (-1.0, 1.0, 0.0, "non-zero"),  # a zero direction: a silent no-op
    (-1.0, 1.0, np.nan, "non-zero"),
    (2.0, 1.0, 1.0, "above its ceiling"),
])
def test_a_capping_config_refuses_bounds_and_directions_that_cap_nothing(floor, ceiling, direction, match):
    d = np.full((1, 8), direction, np.float32)
    with pytest.raises(errors.InputError, match=match):
        CapConfig("m", 4, 8, (2,), d, np.asarray([floor], np.float32), np.asarray([ceiling], np.float32))
    CapConfig("m", 4, 8, (2,), np.ones((1, 8), np.float32), np.asarray([-np.inf]), np.asarray([1.0]))  # open floor


def test_percentile_floors_of_only_empty_answers_is_an_input_error():
    with pytest.raises(errors.InputError, match="no tokens"):
        percentile_floors([np.zeros((4, 0))], [1, 2], 25.0)


# --- texts, pairs, batches ---------------------------------------------------------------------------
def test_contrast_vectors_reads_a_string_as_one_text(model):
    one = contrast_vectors(model, "I am extremely happy today, wow!", "I feel flat.", batch_size=16)
    listed = contrast_vectors(model, ["I am extremely happy today, wow!"], ["I feel flat."], batch_size=16)
    np.testing.assert_array_equal(one, listed)  # not 16-character slices of it
    with pytest.raises(errors.InputError, match="batch_size"):
        contrast_vectors(model, ["a"], ["b"], batch_size=0)


def test_scoring_refuses_unpaired_or_bare_string_inputs(model):
    with pytest.raises(errors.InputError, match="sequence of strings"):
        ScoringSet("Hi there", "Good day")  # was scored one character per row
    with pytest.raises(errors.InputError, match="one response per prompt"):
        ScoringSet(("a", "b"), ("c",))
    convs = [conversation(q) for q in ("Hi?", "2+2?", "Sky?")]
    with pytest.raises(errors.InputError, match="3 prompts and 2 responses"):
        mean_logprobs(model, convs, ["Great!", "Four."])  # was two numbers for three conversations
    with pytest.raises(errors.InputError, match="batch_size"):
        mean_logprobs(model, convs, ["a", "b", "c"], batch_size=0)


# --- hooks fit the model and the batch they run on ----------------------------------------------------
def test_positions_for_another_number_of_rows_are_refused(model):
    two = model.encode(["Hi", "Yo"], chat=True)
    three = iv.steer(model.cfg.n_resid, _vec(model)[0], 1.0, 1, iv.Positions.all(np.ones((3, two.tokens.shape[1]), bool)))
    with pytest.raises(errors.InputError, match="has 2 rows"):  # was a bare broadcasting ValueError inside JAX
        model.run(two, hook=three)
    with pytest.raises(errors.InputError, match="has 2 rows"):
        model.generate_tokens(two, max_new_tokens=2, hook=three)
    one_row = iv.steer(model.cfg.n_resid, _vec(model)[0], 1.0, 1, iv.Positions.all(two.valid[:1]))
    model.run(two, hook=one_row)  # one row of positions broadcasts over the batch
    # a mask narrower than the batch is meaningful: [B, 1] all True with `after` is every token
    narrow = iv.steer(model.cfg.n_resid, _vec(model)[0], 1.0, 1, iv.Positions(np.ones((2, 1), bool), np.ones(2, bool)))
    wide = iv.steer(model.cfg.n_resid, _vec(model)[0], 1.0, 1, iv.Positions.all(two.valid))
    np.testing.assert_array_equal(model.run(two, hook=narrow).logits, model.run(two, hook=wide).logits)


def test_the_pure_generate_checks_its_hook(model):
    b = model.encode(["Hi"], chat=True)
    short = np.ones((model.cfg.n_resid - 1, model.cfg.d_model), np.float32)  # one resid point short
    hook = iv.Steer(jax.numpy.asarray(short), jax.numpy.float32(1.0), iv.layer_weights(model.cfg.n_resid, 1),
                    iv.Positions.all(b.valid), False)
    with pytest.raises(errors.InputError, match="per-layer vectors cover"):  # was read clamped: no error
        generate(model.params, model.cfg, b.tokens, b.valid, max_new_tokens=2, hook=hook)


@pytest.mark.parametrize("bad", ["lambda", "list", "capture_mask", "logits", "seed", "resid_layers"])
def test_model_calls_refuse_bad_arguments_with_typed_errors(model, bad):
    b = model.encode(["Hi"], chat=True)
    steer = iv.steer(model.cfg.n_resid, _vec(model)[0], 1.0, 1, iv.Positions.all(b.valid))
    call = {
        "lambda": lambda: model.run(b, hook=lambda layer, h, ctx: h),
        "list": lambda: model.run(b, hook=[steer, steer]),
        "capture_mask": lambda: model.run(b, capture=Capture((1,), "mean"), capture_mask=np.ones((1, 3), bool)),
        "logits": lambda: model.run(b, logits="first"),
        "seed": lambda: model.generate("Hi", seed=jax.random.key(0), max_new_tokens=2),
        "resid_layers": lambda: model.resid(["hi"], (1.7,)),  # was read as resid[1]
    }[bad]
    with pytest.raises(errors.InputError):
        call()


@pytest.mark.parametrize("make,match", [
    (lambda n, v, p: iv.steer(n, v, [1.0, 2.0], 1, p), "must be a number"),
    (lambda n, v, p: iv.ablate(n, v, 1, p, mean=np.ones(3)), "must be a number"),
    (lambda n, v, p: iv.Positions.explicit(np.ones(5, bool)), r"\[B, P\]"),
])
def test_intervention_constructors_refuse_shapes_they_cannot_use(model, make, match):
    with pytest.raises(errors.InputError, match=match):
        make(model.cfg.n_resid, _vec(model)[0], iv.Positions.all(np.ones((1, 4), bool)))
    iv.cap(model.cfg.n_resid, _vec(model)[0], 1, iv.Positions.all(np.ones((1, 4), bool)),
           lo=np.full(model.cfg.n_resid, -1.0), hi=1.0)  # per-layer bounds stay allowed


def test_a_mixture_with_per_row_weights_for_another_batch_is_refused(model):
    b = model.encode(["Hi"], chat=True)
    mix = iv.mixture(model.cfg.n_resid, np.eye(2, model.cfg.d_model, dtype=np.float32), 1, iv.Positions.all(b.valid),
                     alpha=1.0, weights=np.full((2, 2), 0.5))
    with pytest.raises(errors.InputError, match="per-row weights for 2 rows"):
        model.run(b, hook=mix)


def test_steering_units_must_be_named_exactly():
    v, norms = np.ones((4, 8), np.float32), np.arange(1, 5, dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(steering_vectors(v, norms, "relative"), axis=-1), norms, rtol=1e-6)
    with pytest.raises(errors.InputError, match="'relative' or 'absolute'"):
        steering_vectors(v, norms, "absolut")  # was read as relative


# --- vector banks ---------------------------------------------------------------------------------
def test_bank_meta_survives_a_replaced_entry_and_is_checked(tmp_path):
    bank = VectorBank.from_vectors("m", {"joy": np.ones((4, 8))},
                                   meta={"joy": {"resid_norm": [1.0, 2.0, 3.0, 4.0], "best_layer": np.int64(2)}})
    assert bank.meta_of("joy")["best_layer"] == 2  # a numpy scalar is stored as the number it is
    again = bank.with_entry("joy", np.full((4, 8), 2.0))
    assert again.meta_of("joy") == bank.meta_of("joy")  # was reset to {}, losing resid_norm
    assert bank.with_entry("joy", np.ones((4, 8)), meta={"x": 1}).meta_of("joy") == {"x": 1}
    with pytest.raises(errors.InputError, match="not entries of the bank"):
        VectorBank.from_vectors("m", {"joy": np.ones((4, 8))}, meta={"jo": {"x": 1}})
    with pytest.raises(errors.InputError, match="out of range"):
        bank.unit("joy", True)  # a bool is no resid index
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.InputError, match="is a file"):
        bank.save(tmp_path / "file" / "bank")


# --- pipeline configs: a value that passes every `x < 0` check (NaN), or a layer that is no index ---------------
@pytest.mark.parametrize("which,change,match", [
    ("extract", dict(steer_layers=(15.5,)), "wrong type"),  # failed only at the steering stage
    ("extract", dict(temperature=float("inf")), "finite"),
    ("extract", dict(filter="absolute", trait_threshold=500.0), r"in \[0, 100\]"),
    ("train", dict(kl_beta=float("nan")), "finite"),  # was a NaN loss at the first update, blamed on lr
    ("train", dict(weight_decay=float("nan")), "finite"),
    ("regimes", dict(steer_coeff=float("nan")), "finite"),
    ("regimes", dict(kl_beta=-1.0), "kl_beta"),
    ("space", dict(edit_coeff=float("nan")), "finite"),
])
def test_pipeline_configs_refuse_nan_and_non_whole_layers(model, which, change, match):
    from jaxpersona.compute.train import TrainConfig
    from jaxpersona.pipelines.persona import ExtractConfig
    from jaxpersona.pipelines.regimes import RegimesConfig
    from jaxpersona.pipelines.space import SpaceConfig

    base = {"extract": ExtractConfig(), "train": TrainConfig(), "regimes": RegimesConfig(), "space": SpaceConfig()}
    cfg = base[which]
    cfg.validate() if which == "train" else cfg.validate(model.cfg.n_resid if which == "extract" else model.cfg)
    bad = dataclasses.replace(cfg, **change)
    with pytest.raises(errors.InputError, match=match):
        bad.validate() if which == "train" else bad.validate(model.cfg.n_resid if which == "extract" else model.cfg)
