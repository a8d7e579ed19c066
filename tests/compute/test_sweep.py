"""The sweep: batched + shared-prefix grids equal one-by-one forwards; chunking, resume, sharding."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpersona.compute.sweep as sweep_mod
from jaxpersona import errors
from jaxpersona.edit import interventions as iv
from jaxpersona.compute.handle import load
from jaxpersona.compute.sweep import Grid, positions_for, run_sweep
from jaxpersona.compute.scoring import ScoringSet, encode_scoring

DATA = ScoringSet(
    ("How do you feel about tomorrow?", "Describe your week in one line."),
    ("I am so excited, tomorrow will be amazing!", "It was a wonderful, joyful week."),
    "You are a helpful assistant.",
)


@pytest.fixture(scope="module")
def model():
    return load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def bank(model):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, model.cfg.n_resid, model.cfg.d_model)) * 0.5).astype(np.float32)


def reference_logprob(model, enc, hook) -> np.ndarray:
    """Plain full forward with the hook (no prefix sharing, no vmap): mean response log-prob per prompt."""
    from jaxpersona.compute.batching import Batch

    out = model.run(Batch(enc["tokens"], enc["valid"]), hook=hook)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    lp = np.take_along_axis(np.asarray(logp), enc["pred_idx"][..., None], axis=1)
    lp = np.take_along_axis(lp, enc["pred_tok"][..., None], axis=-1)[..., 0]
    ok = enc["pred_ok"]
    return (lp * ok).sum(-1) / ok.sum(-1)


@pytest.mark.parametrize("kind,positions", [("steer", "all"), ("cap", "response"), ("ablate", "prompt")])
def test_grid_equals_points_one_by_one(model, bank, kind, positions):
    coeffs = {"steer": (-6.0, 0.0, 6.0), "cap": (-2.0, 5.0), "ablate": (0.0, 3.0)}[kind]
    grid = Grid(kind, bank, ("a", "b"), layers=(0, 7, 20), coeffs=coeffs, positions=positions, window=2)
    rows = run_sweep(model, grid, DATA, progress=False)
    enc = encode_scoring(model, DATA)
    pos = positions_for(positions, enc["valid"], enc["resp"])
    points = grid.points()
    assert len(rows) == len(points) * len(DATA.prompts)
    for p in points:
        hook = jax.tree.map(lambda x: x[0], sweep_mod.build_hooks(grid, model.cfg, [p], pos))
        want = reference_logprob(model, enc, hook)
        got = [r["logprob"] for r in rows if (r["vector"], r["layer"], r["coeff"]) == (p["vector"], p["layer"], p["coeff"])]
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)


def test_chunks_pad_only_to_their_group_and_still_equal_points_one_by_one(model, bank, monkeypatch):
    """With coefficient 0 scored once the lowest layer's group has one point more than the others: each
    group is one chunk padded to its own size (no padding points computed), and the rows still equal plain
    one-point forwards."""
    grid = Grid("steer", bank, ("a", "b"), layers=(0, 7, 20), coeffs=(-6.0, 0.0, 6.0), baseline_once=True)
    chunks, csize = sweep_mod._chunks(grid.points(), 1, False, 100, 1)
    assert csize == 6 and [(len(c), w) for _, c, w in chunks] == [(6, 6), (4, 4), (4, 4)]
    chunks, csize = sweep_mod._chunks(grid.points(), 1, False, 4, 1)  # a group larger than a chunk: cut, padded to 4
    assert [(len(c), w) for _, c, w in chunks] == [(4, 4), (2, 4), (4, 4), (4, 4)]
    chunks, _ = sweep_mod._chunks(grid.points(), 1, False, 100, 4)  # rounded up to the devices
    assert [w for *_, w in chunks] == [8, 4, 4]

    widths = []
    real = sweep_mod.build_hooks
    def recording(g, c, pts, pos):
        widths.append(len(pts))
        return real(g, c, pts, pos)

    monkeypatch.setattr(sweep_mod, "build_hooks", recording)
    rows = run_sweep(model, grid, DATA, progress=False)
    assert widths == [6, 4, 4]
    enc = encode_scoring(model, DATA)
    pos = positions_for("all", enc["valid"], enc["resp"])
    for p in grid.points():
        hook = jax.tree.map(lambda x: x[0], real(grid, model.cfg, [p], pos))
        got = [r["logprob"] for r in rows if (r["vector"], r["layer"], r["coeff"]) == (p["vector"], p["layer"], p["coeff"])]
        np.testing.assert_allclose(got, reference_logprob(model, enc, hook), atol=2e-4, rtol=1e-5)


def test_steering_changes_logprob_and_zero_is_identity(model, bank):
    grid = Grid("steer", bank[:1], ("a",), layers=(5, 15), coeffs=(0.0, 20.0))
    rows = run_sweep(model, grid, DATA, progress=False)
    base = reference_logprob(model, encode_scoring(model, DATA), None)
    for r in rows:
        if r["coeff"] == 0.0:
            assert r["logprob"] == pytest.approx(base[r["prompt"]], abs=2e-4)
        else:
            assert abs(r["logprob"] - base[r["prompt"]]) > 1e-2


def test_projections_match_capture(model, bank):
    unit = bank[0, 10] / np.linalg.norm(bank[0, 10])
    grid = Grid("steer", bank[:1], ("a",), layers=(12,), coeffs=(0.0, 8.0))
    rows = run_sweep(model, grid, DATA, project={"a": bank[0, 10]}, project_layers=(10, 20), progress=False)
    enc = encode_scoring(model, DATA)
    from jaxpersona.compute.batching import Batch
    from jaxpersona.model.transformer import Capture

    caps = model.run(Batch(enc["tokens"], enc["valid"]), capture=Capture((10, 20), "mean"),
                     capture_mask=enc["resp"], logits=False).captured
    want = np.asarray(caps) @ unit  # [2 layers, B]
    base = [r for r in rows if r["coeff"] == 0.0]
    np.testing.assert_allclose([r["proj/a@10"] for r in base], want[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose([r["proj/a@20"] for r in base], want[1], rtol=1e-4, atol=1e-3)
    steered = [r for r in rows if r["coeff"] == 8.0]
    # steering at 12 cannot change resid[10] (shared prefix) but does change resid[20]
    np.testing.assert_allclose([r["proj/a@10"] for r in steered], want[0], rtol=1e-4, atol=1e-3)
    assert not np.allclose([r["proj/a@20"] for r in steered], want[1], atol=1e-2)


def test_chunking_gives_same_rows(model, bank):
    grid = Grid("steer", bank, ("a", "b"), layers=(3, 9), coeffs=(-4.0, 4.0))
    big = run_sweep(model, grid, DATA, progress=False)
    small = run_sweep(model, grid, DATA, budget_bytes=1, progress=False)  # one point per chunk
    assert [r["logprob"] for r in big] == pytest.approx([r["logprob"] for r in small], abs=1e-5)
    with pytest.raises(errors.InputError, match="memory budget"):
        run_sweep(model, grid, DATA, budget_bytes=1, chunking=False, progress=False)


@pytest.mark.parametrize("positions,scorer", [("all", "score_prompts_chunk"), ("response", "score_chunk")])
def test_resume_skips_finished_chunks(model, bank, tmp_path, monkeypatch, positions, scorer):
    grid = Grid("steer", bank[:1], ("a",), layers=(3, 9, 15), coeffs=(1.0, 2.0), positions=positions)
    first = run_sweep(model, grid, DATA, out_dir=tmp_path, progress=False)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert len(progress) == 3
    # simulate a kill after two chunks: forget the last chunk
    last = list(progress)[-1]
    del progress[last]
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    calls = []
    real = getattr(sweep_mod, scorer)
    monkeypatch.setattr(sweep_mod, scorer, lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_sweep(model, grid, DATA, out_dir=tmp_path, progress=False)
    assert len(calls) == 1  # only the unfinished chunk is recomputed
    assert [r["logprob"] for r in again] == pytest.approx([r["logprob"] for r in first], abs=1e-6)
    assert len(json.loads((tmp_path / "progress.json").read_text())) == 3


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(vectors=np.zeros((1, 7), np.float32), names=("a",)), "shape"),
        (dict(layers=(31,)), "outside"),
        (dict(coeffs=(float("nan"),)), "finite"),
        (dict(kind="shift"), "kind"),
        (dict(positions="assistant-ish"), "positions"),
    ],
)
def test_bad_grid(model, bank, change, match):
    base = dict(kind="steer", vectors=bank[:1], names=("a",), layers=(3,), coeffs=(1.0,))
    with pytest.raises(errors.InputError, match=match):
        run_sweep(model, Grid(**{**base, **change}), DATA, progress=False)


def test_nan_vector_and_mismatched_data(model, bank):
    v = bank[:1].copy()
    v[0, 3, 5] = np.nan
    with pytest.raises(errors.InputError, match="NaN"):
        run_sweep(model, Grid("steer", v, ("a",), (3,), (1.0,)), DATA, progress=False)
    with pytest.raises(errors.InputError, match="one response per prompt"):
        run_sweep(model, Grid("steer", bank[:1], ("a",), (3,), (1.0,)), ScoringSet(("a", "b"), ("x",)), progress=False)
    for positions in ("all", "response", "prompt"):  # every layout: an empty target is an error, not a NaN row
        with pytest.raises(errors.InputError, match="empty target response for prompt 'b'"):
            run_sweep(model, Grid("steer", bank[:1], ("a",), (3,), (1.0,), positions=positions),
                      ScoringSet(("a", "b"), ("x", "")), progress=False)


def test_positions_selectors_in_scoring(model):
    enc = encode_scoring(model, DATA)
    valid, resp = enc["valid"], enc["resp"]
    ctx_slots = np.broadcast_to(np.arange(valid.shape[1]), valid.shape)
    from jaxpersona.model.transformer import HookContext

    ctx = HookContext(jnp.asarray(ctx_slots), jnp.asarray(ctx_slots), jnp.asarray(valid))
    allm = np.asarray(positions_for("all", valid, resp).at(ctx))
    prompt = np.asarray(positions_for("prompt", valid, resp).at(ctx))
    response = np.asarray(positions_for("response", valid, resp).at(ctx))
    np.testing.assert_array_equal(allm, valid)
    np.testing.assert_array_equal(prompt, valid & ~resp)
    assert (response.sum(1) == resp.sum(1) + 1).all()  # response tokens + the last prompt token
    assert not (prompt & resp).any()


@pytest.mark.parametrize("positions", ["response", "all", "prompt"])
def test_sweep_generation_matches_per_point_generate(model, bank, positions):
    """The sweep's greedy texts equal one full generate per point: with ``response`` positions the prompt's
    prefix is prefilled once for all points; otherwise the prompt's blocks below the batch's lowest steering
    layer are (here layers 3 and 6 generate in one batch, prefilled once below resid[3])."""
    grid = Grid("steer", bank[:1], ("a",), layers=(3, 6), coeffs=(0.0, 12.0), positions=positions)
    rows = run_sweep(model, grid, DATA, generate_tokens=8, progress=False)
    batch = model.encode(list(DATA.prompts), chat=True, system=DATA.system)
    pos = getattr(iv.Positions, positions)(batch.valid)
    for p in grid.points():
        hook = jax.tree.map(lambda x: x[0], sweep_mod.build_hooks(grid, model.cfg, [p], pos))
        want = model.decode(model.generate_tokens(batch, max_new_tokens=8, hook=hook))
        got = [r["text"] for r in rows if r["coeff"] == p["coeff"] and r["layer"] == p["layer"]]
        assert got == want, p
    for layer in (3, 6):
        assert ([r["text"] for r in rows if r["coeff"] == 0.0 and r["layer"] == layer]
                != [r["text"] for r in rows if r["coeff"] == 12.0 and r["layer"] == layer])


@pytest.mark.parametrize("kind,coeffs,window", [("steer", (0.0, 6.0), 1), ("cap", (-1.0, 4.0), 2)])
def test_all_positions_run_each_distinct_prompt_once_and_equal_points_one_by_one(model, bank, kind, coeffs, window):
    """With ``all`` positions a set whose rows share prompts (each question's positive and negative answer, as the
    persona pipeline scores them) runs each distinct prompt once per grid point, and its greedy generation
    continues from that prompt's keys/values: the rows equal a full forward / a full generate per point, and
    unpaired sets of several shapes (other sets padded to the widest) too."""
    from jaxpersona.compute.scoring import encode_shared

    qs = ("Name a fruit.", "What is two plus two?", "Say hi.")
    data = ScoringSet(qs + qs[:2], ("An apple, of course.", "Four.", "Hi there!", "A rock.", "Seven, maybe more."),
                      "You are a helpful assistant.")
    other = ScoringSet(("Describe your week in one line, please, in your own words.",) * 2,
                       ("It was fine.", "A long, busy and wonderful week of work and rest."))
    enc = encode_shared(model, data.conversations(), data.responses, rows=6, q_rows=4, p_width=48, s_width=16)
    assert enc["pick"].tolist() == [0, 1, 2, 0, 1, 1] and enc["prompt_tokens"].shape == (4, 48)
    assert enc["last_tokens"].tolist()[:3] == [ids[-1] for ids in model.chat_ids(data.conversations()[:3])]
    grid = Grid(kind, bank, ("a", "b"), layers=(4, 11), coeffs=coeffs, positions="all", window=window)
    rows = run_sweep(model, grid, [data, other], generate_tokens=6, progress=False)
    for k, d in enumerate((data, other)):
        flat = encode_scoring(model, d)
        batch = model.encode(list(d.prompts), chat=True, system=d.system)
        for p in (p for p in grid.points() if p["vector_index"] == k):
            one = lambda pos: jax.tree.map(lambda x: x[0], sweep_mod.build_hooks(grid, model.cfg, [p], pos))
            got = [r for r in rows if (r["vector"], r["layer"], r["coeff"]) == (p["vector"], p["layer"], p["coeff"])]
            want = reference_logprob(model, flat, one(positions_for("all", flat["valid"], flat["resp"])))
            np.testing.assert_allclose([r["logprob"] for r in got], want, atol=2e-4, rtol=1e-5)
            texts = model.decode(model.generate_tokens(batch, max_new_tokens=6, hook=one(iv.Positions.all(batch.valid))))
            assert [r["text"] for r in got] == texts, p


def test_all_positions_chunk_as_the_flat_layout_did(model, bank, monkeypatch):
    """The distinct-prompt layout keeps the flat layout's memory estimate per grid point, so a sweep under a
    tight budget is cut into the same chunks (the same chunk keys: a run directory of an earlier version resumes)."""
    from jaxpersona.compute.scoring import target_shape

    seen = []
    real = sweep_mod.chunk_size
    monkeypatch.setattr(sweep_mod, "chunk_size", lambda n, per, *a: seen.append(per) or real(n, per, *a))
    grid = Grid("steer", bank[:1], ("a",), layers=(3, 9), coeffs=(1.0, 2.0, 3.0), positions="all")
    per = sweep_mod.point_bytes(model.cfg, len(DATA.prompts), *target_shape(model, DATA.conversations(), DATA.responses))
    rows = run_sweep(model, grid, DATA, budget_bytes=2 * per, progress=False)
    assert seen == [per] and len(rows) == 6 * len(DATA.prompts)


def test_paired_sets_equal_each_set_alone_and_baseline_once(model, bank):
    """One set per vector (``--all-traits``): vector k scored on set k only, all sets padded to one
    shape, equals running each (vector, set) alone; ``baseline_once`` emits coefficient 0 once."""
    other = ScoringSet(("Name a fruit.", "What is two plus two?", "Say hi."), ("An apple.", "Four.", "Hi there!"))
    grid = Grid("steer", bank, ("a", "b"), layers=(5, 12), coeffs=(0.0, 3.0), positions="response", baseline_once=True)
    rows = run_sweep(model, grid, [DATA, other], progress=False, generate_tokens=4)
    assert [(p["vector"], p["layer"], p["coeff"]) for p in grid.points()] == [
        ("a", 5, 0.0), ("a", 5, 3.0), ("b", 5, 0.0), ("b", 5, 3.0), ("a", 12, 3.0), ("b", 12, 3.0)]
    for k, (name, data) in enumerate((("a", DATA), ("b", other))):
        alone = Grid("steer", bank[k : k + 1], (name,), layers=(5, 12), coeffs=(0.0, 3.0), positions="response",
                     baseline_once=True)
        want = run_sweep(model, alone, data, progress=False, generate_tokens=4)
        got = [r for r in rows if r["vector"] == name]
        assert len(got) == len(want) == 3 * len(data.prompts)
        for g, w in zip(got, want):
            assert (g["layer"], g["coeff"], g["prompt"], g["text"]) == (w["layer"], w["coeff"], w["prompt"], w["text"])
            assert g["logprob"] == pytest.approx(w["logprob"], abs=2e-5)
    with pytest.raises(errors.InputError, match="scoring sets"):
        run_sweep(model, grid, [DATA], progress=False)


def test_mean_logprobs_equals_full_forward(model):
    from jaxpersona.compute.scoring import mean_logprobs

    convs = DATA.conversations()
    # a repeated (prompt, response) pair is scored once and gets that score; a response's last token is no input
    got = mean_logprobs(model, convs + convs[:1] + convs[1:], list(DATA.responses) + ["", DATA.responses[1]],
                        batch_size=2)
    want = reference_logprob(model, encode_scoring(model, DATA), None)
    np.testing.assert_allclose(got[:2], want, atol=2e-5)
    assert np.isnan(got[2])  # an empty response has no score
    assert got[3] == got[1]
    short = ["Yes.", "It was a wonderful, joyful week in every way, with friends and long walks by the sea."]
    one = ScoringSet(DATA.prompts, tuple(short), DATA.system)
    np.testing.assert_allclose(mean_logprobs(model, convs, short, batch_size=1),
                               reference_logprob(model, encode_scoring(model, one), None), atol=2e-5)


def test_mixed_precision_sweep_and_scores_equal_with_the_weights_as_bits(model, bank, monkeypatch):
    """Mixed precision: the sweep and the scorer view the bfloat16 layer weights as their bits once (not in every
    jitted call); rows, greedy texts and mean log-probs are the numbers the bfloat16 weights give, bit for bit."""
    import dataclasses

    import jaxpersona.compute.scoring as scoring_mod
    from jaxpersona.model.params import with_matmul_dtype

    mixed = dataclasses.replace(model, params=with_matmul_dtype(model.params, "bfloat16"))
    grid = Grid("steer", bank[:1], ("a",), layers=(5, 12), coeffs=(0.0, 4.0), positions="all")
    convs = DATA.conversations()
    runs = []
    for as_bits in (True, False):
        if not as_bits:
            monkeypatch.setattr(sweep_mod, "layers_as_bits", lambda p: p)
            monkeypatch.setattr(scoring_mod, "layers_as_bits", lambda p: p)
        rows = run_sweep(mixed, grid, DATA, progress=False, generate_tokens=4)
        runs.append(([(r["layer"], r["coeff"], r["prompt"], r["text"], r["logprob"]) for r in rows],
                     scoring_mod.mean_logprobs(mixed, convs, list(DATA.responses)).tolist()))
    assert runs[0] == runs[1]


def test_generation_groups_with_a_shared_prefix_take_a_whole_set():
    """With ``response`` positions (a shared prompt prefix) one batched generation takes all of a set's points
    when they fit (the default grid's 21 points x 20 prompts: one call, no padding point); otherwise whole chunks
    up to GEN_ROWS rows, padded to a multiple of the devices; a small memory budget keeps the old size."""
    chunks = [(0, [{}] * 6, 6), (0, [{}] * 5, 5), (0, [{}] * 5, 5), (0, [{}] * 5, 5)]
    assert sweep_mod._generation_group(chunks, 6, 20, True, 1, 1, None) == 21
    assert sweep_mod._generation_group(chunks, 6, 20, False, 1, 1, None) == 6
    assert sweep_mod._generation_group(chunks, 6, 20, True, 4, 1, None) == 24
    assert sweep_mod._generation_group(chunks, 6, 20, True, 1, 10 ** 9, 10 ** 9) == 6
    assert sweep_mod._generation_group(chunks[:1], 6, 20, True, 1, 1, None) == 6
    # a budget that bounds the group below the set: still a multiple of the devices (2 and 4 data shards)
    tight = [(0, [{}] * 6, 6)] * 3 + [(0, [{}] * 3, 4)]
    assert sweep_mod._generation_group(tight, 6, 5, True, 2, 10 ** 6, 10 ** 7) % 2 == 0
    assert sweep_mod._generation_group(tight, 6, 5, True, 4, 10 ** 6, 10 ** 7) % 4 == 0
    paired = chunks + [(1, [{}] * 3, 3)]
    assert sweep_mod._generation_group(paired, 6, 20, True, 1, 1, None) == 21
