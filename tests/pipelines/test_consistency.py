"""Run-to-run consistency and persona mixtures: the variance components against a plain ANOVA,
seeds vmapped over PRNG keys against one generation per key, the mixture intervention against
explicit sums, NNLS attribution on known mixes, and the run end to end on the tiny llama (resume,
bad input)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.edit import interventions as iv
from jaxpersona.pipelines.consistency import ConsistencyConfig, ratio_with_interval, run_consistency, sample_seeds, variance_components
from jaxpersona.compute.generate import generate
from jaxpersona.measure.mixture import attribute
from jaxpersona.model.transformer import HookContext
from test_pipeline import CountingModel, full_word_tokenizer, read_jsonl


def test_variance_components_match_a_plain_anova() -> None:
    rng = np.random.default_rng(0)
    K, P, Q = 5, 4, 6
    persona = rng.normal(scale=2.0, size=(1, P, Q))
    x = persona + rng.normal(scale=0.5, size=(K, P, Q))
    comp = variance_components(x)
    for q in range(Q):
        g = x[:, :, q]  # [K, P]: groups are personas
        msw = sum(((g[:, p] - g[:, p].mean()) ** 2).sum() for p in range(P)) / (P * (K - 1))
        msb = K * ((g.mean(0) - g.mean()) ** 2).sum() / (P - 1)
        assert np.isclose(comp["within"][q], msw) and np.isclose(comp["between"][q] * K, msb)
        assert np.isclose(comp["icc"][q], (msb - msw) / (msb + (K - 1) * msw))
    r = ratio_with_interval(comp, n_boot=500)
    assert r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"] and r["ratio"] < 0.5  # personas dominate here
    same = variance_components(rng.normal(size=(K, P, Q)))  # no persona effect: within ~ K * between
    assert ratio_with_interval(same, n_boot=200)["ratio"] > 1.5
    vec = variance_components(np.stack([x, 2 * x], -1))  # vector measure: sums over D
    np.testing.assert_allclose(vec["within"], 5 * comp["within"])
    with pytest.raises(errors.InputError, match=">= 2 seeds"):
        variance_components(x[:1])


def test_seeds_vmapped_equal_one_generation_per_key(tiny_llama) -> None:
    cfg, params = tiny_llama.cfg, tiny_llama.params
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, size=(3, 7)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    keys = jax.random.split(jax.random.key(5), 4)
    res = sample_seeds(params, cfg, jnp.asarray(tokens), jnp.asarray(valid), keys, jnp.float32(1.0), jnp.float32(0.9),
                       max_new_tokens=6, eos_ids=(), pad_id=0)
    for k in range(4):
        one = generate(params, cfg, tokens, valid, max_new_tokens=6, key=keys[k], temperature=1.0, top_p=0.9,
                       eos_ids=(), pad_id=0)
        np.testing.assert_array_equal(np.asarray(res.tokens[k]), np.asarray(one.tokens))
    assert len({np.asarray(res.tokens[k]).tobytes() for k in range(4)}) > 1  # the seeds differ


def _ctx(b: int, t: int) -> HookContext:
    return HookContext(jnp.zeros((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), bool))


def test_mixture_fixed_and_conditional() -> None:
    rng = np.random.default_rng(2)
    d, n_resid = 8, 3
    v = rng.normal(size=(3, d)).astype(np.float32)
    h = rng.normal(size=(2, 4, d)).astype(np.float32)
    pos = iv.Positions.all(np.ones((2, 4), bool))
    fixed = iv.mixture(n_resid, v, [1], pos, alpha=2.0, weights=[0.5, 0.0, 0.5])
    out = np.asarray(fixed(jnp.int32(1), jnp.asarray(h), _ctx(2, 4)))
    np.testing.assert_allclose(out, h + 2.0 * (0.5 * v[0] + 0.5 * v[2]), atol=1e-5)
    assert np.array_equal(np.asarray(fixed(jnp.int32(0), jnp.asarray(h), _ctx(2, 4))), h)  # other layers untouched
    cond = iv.mixture(n_resid, v, [1], pos, alpha=1.5, tau=0.7)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = h @ u.T / 0.7
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.asarray(cond(jnp.int32(1), jnp.asarray(h), _ctx(2, 4)))
    np.testing.assert_allclose(out, h + 1.5 * w @ v, atol=1e-4)
    # vmap over tau and alpha: a batch of differently-mixed forwards; and it composes in a Chain
    batched = jax.tree.map(lambda *xs: jnp.stack(xs), cond, iv.mixture(n_resid, v, [1], pos, alpha=0.0, tau=3.0))
    outs = jax.vmap(lambda m: m(jnp.int32(1), jnp.asarray(h), _ctx(2, 4)))(batched)
    np.testing.assert_allclose(np.asarray(outs[0]), out, atol=1e-5)
    assert np.array_equal(np.asarray(outs[1]), h)
    chain = iv.Chain((cond, iv.steer(n_resid, v[0], 0.0, [1], pos)))
    np.testing.assert_allclose(np.asarray(chain(jnp.int32(1), jnp.asarray(h), _ctx(2, 4))), out, atol=1e-6)
    iv.check_for_model(chain, d, n_resid)
    with pytest.raises(errors.InputError, match="d_model"):
        iv.check_for_model(chain, d + 1, n_resid)
    with pytest.raises(errors.InputError, match=">= 2 vectors"):
        iv.mixture(n_resid, v[:1], [1], pos, alpha=1.0)
    for tau in (0.0, -1.0):
        with pytest.raises(errors.InputError, match="tau must be > 0"):
            iv.mixture(n_resid, v, [1], pos, alpha=1.0, tau=tau)


def test_attribution_recovers_a_known_mix() -> None:
    rng = np.random.default_rng(3)
    v = rng.normal(size=(4, 32))
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    base = rng.normal(size=32)
    acts = np.stack([base + 2.0 * u[0] + 0.5 * u[2], base + 1.0 * u[3]])
    res = attribute(acts, v, ["a", "b", "c", "d"], baseline=base, ridge=0.0)
    np.testing.assert_allclose(res["coeffs"], [[2.0, 0, 0.5, 0], [0, 0, 0, 1.0]], atol=1e-8)
    assert res["dominant"] == ["a", "d"] and np.all(res["unexplained"] < 1e-12)
    shrunk = attribute(acts, v, ["a", "b", "c", "d"], baseline=base)  # the default small ridge
    np.testing.assert_allclose(shrunk["coeffs"], res["coeffs"], atol=1e-2)
    off = attribute(np.stack([base + rng.normal(size=32)]), v, baseline=base)
    assert 0 < off["unexplained"][0] <= 1
    with pytest.raises(errors.ModelMismatchError):
        attribute(acts, rng.normal(size=(4, 16)))


CFG = dict(n_personas=3, n_questions=2, seeds=3, temperatures=(1.0,), max_new_tokens=5, batch_size=4, n_boot=200)


@pytest.fixture(scope="module")
def model(tiny_llama) -> CountingModel:
    return CountingModel(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


def test_consistency_run_resumes_and_reports(model, tmp_path, monkeypatch) -> None:
    from jaxpersona.pipelines import consistency
    from jaxpersona.artifacts.bank import VectorBank

    cfg = model.cfg
    bank = VectorBank(np.random.default_rng(4).normal(size=(2, cfg.n_resid, cfg.d_model)), ("x", "y"), "tiny")
    config = ConsistencyConfig().replace(**CFG)
    s = run_consistency(model, config, tmp_path, bank=bank, progress=False, log=lambda _: None)
    from test_report import check_report  # its HTML report, opened in headless chromium

    from jaxpersona.report import write_report

    page = write_report(tmp_path, tmp_path.parent / f"{tmp_path.name}_report" / "consistency.html")
    check_report(page, tmp_path, "consistency", set())
    assert '<span class="kind">consistency</span>' in page.read_text()
    res = s["results"]["1"]["measures"]
    assert set(res) == {"activation", "proj:x", "proj:y", "score:evil"}
    for m in res.values():
        assert m["ratio"] > 0 and m["ratio_lo"] <= m["ratio"] <= m["ratio_hi"] and m["questions"] <= 2
    answers = read_jsonl(tmp_path / "answers.jsonl")
    assert len(answers) == 3 * 3 * 2 and len({a["seed"] for a in answers}) == 3
    monkeypatch.setattr(consistency, "sample_seeds", lambda *a, **k: (_ for _ in ()).throw(AssertionError("resampled")))
    again = run_consistency(model, config, tmp_path, bank=bank, progress=False, log=lambda _: None)
    assert again["results"] == s["results"]
    other = VectorBank(np.zeros((1, cfg.n_resid + 1, cfg.d_model)) + 1, ("z",), "big")
    with pytest.raises(errors.ModelMismatchError):
        run_consistency(model, config, tmp_path / "o", bank=other, progress=False, log=lambda _: None)
    for bad, needle in (({"seeds": 1}, ">= 2 seeds"), ({"n_personas": 1}, ">= 2 personas"),
                        ({"temperatures": (0.0,)}, "> 0")):
        with pytest.raises(errors.InputError, match=needle):
            run_consistency(model, config.replace(**bad), tmp_path / "b", progress=False, log=lambda _: None)


def test_sentence_projections_match_the_assistant_token_mean(model) -> None:
    from jaxpersona.pipelines.consistency import sentence_projections
    from jaxpersona.model.transformer import Capture

    rng = np.random.default_rng(6)
    u = rng.normal(size=model.cfg.d_model).astype(np.float32)
    u /= np.linalg.norm(u)
    conv = [{"role": "system", "content": "you are a cat ."}, {"role": "user", "content": "hello world ?"},
            {"role": "assistant", "content": "the cat sat on the mat"}, {"role": "user", "content": "what is paris ?"},
            {"role": "assistant", "content": "paris is the capital of france . hello dog !"}]
    got = sentence_projections(model, conv, u, 2)
    batch, amask = model.role_mask([conv], "assistant", add_generation_prompt=False)
    h = np.asarray(model.run(batch, capture=Capture((2,), "tokens"), logits=False).captured[0, 0]) @ u
    sel = np.flatnonzero(amask[0])
    first = sel[:6]  # "the cat sat on the mat": 6 word tokens
    assert len(got) == 2 and len(got[0]) == 1 and len(got[1]) == 2
    np.testing.assert_allclose(got[0][0], h[first].mean(), atol=1e-5)
    second = sel[6:]
    np.testing.assert_allclose(got[1][0], h[second[:7]].mean(), atol=1e-5)  # "paris is the capital of france ."
    np.testing.assert_allclose(got[1][1], h[second[7:]].mean(), atol=1e-5)  # "hello dog !"


def test_consistency_over_turns_with_space_interventions(model, tmp_path) -> None:
    from jaxpersona.edit.capping import CapConfig
    from jaxpersona.edit.directions import unit
    from jaxpersona.artifacts.bank import VectorBank

    cfg = model.cfg
    rng = np.random.default_rng(7)
    axis = rng.normal(size=(cfg.n_resid, cfg.d_model)).astype(np.float32)
    space = tmp_path / "space"
    VectorBank(axis[None], ("assistant_axis",), "tiny", ({"resid_norm": [1.0] * cfg.n_resid},)).save(space / "vectors")
    CapConfig("tiny", cfg.n_resid, cfg.d_model, (2,), unit(axis)[[2]], np.array([0.0], np.float32),
              np.array([np.inf], np.float32)).save(space / "capping.json")
    config = ConsistencyConfig().replace(**CFG, turn_scripts=1, turn_tokens=4, edit_coeff=5.0)
    from jaxpersona.data.roles import Script

    scripts = [Script("s", ("hello cat", "what is the mat ?", "is paris a world ?"), "x")]
    s = run_consistency(model, config, tmp_path / "run", space_dir=space, scripts=scripts, progress=False,
                        log=lambda _: None)
    t = s["turns"]
    assert t["rows"] == 3 and set(t["variants"]) == {"unsteered", "capped", "capped_assistant", "kv_edit"}
    for ms in t["variants"].values():
        for name in ("p2l", "l2l", "repeat_proj", "repeat_lp"):
            assert np.isfinite(ms[name]["mean"]) and ms[name]["lo"] <= ms[name]["mean"] <= ms[name]["hi"], name
    assert "over turns" in (tmp_path / "run" / "summary.txt").read_text()
    assert (tmp_path / "run" / "ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    long = [Script("l", tuple(["what is the capital of france ? " * 6] * 12), "x")]
    with pytest.raises(errors.ContextLengthError, match="context"):
        run_consistency(model, config, tmp_path / "run2", space_dir=space, scripts=long, progress=False,
                        log=lambda _: None)
    rec = read_jsonl(tmp_path / "run" / "turns.jsonl")[0]["records"]
    # 3 personas x 1 script x (3 turns + the first question again) x 4 variants
    assert len(rec) == 3 * 4 * 4 and all(r["user"] == r0["user"] for r in rec if r["probe"]
                                         for r0 in rec if r0["turn"] == 0 and r0["script"] == r["script"])


def test_mixture_comparison_in_the_run(model, tmp_path) -> None:
    config = ConsistencyConfig().replace(**CFG, mix_questions=2, mix_alpha=2.0)
    s = run_consistency(model, config, tmp_path, progress=False, log=lambda _: None)
    m = s["mixtures"]
    assert set(m["conditions"]) == {"none", "single", "fixed_mix", "conditional_mix"} and m["questions"] == 3 * 2
    for r in m["conditions"].values():
        assert r["trait_score"][1] <= r["trait_score"][0] <= r["trait_score"][2]
        assert 0 <= r["attribution_agrees"] <= 1
    answers = read_jsonl(tmp_path / "mixtures.jsonl")[0]["answers"]
    assert answers["single"] != answers["none"]  # alpha 2 x the residual norm changes greedy text
    assert "persona mixtures" in (tmp_path / "summary.txt").read_text() and m["examples"]


def test_per_row_mixture_weights() -> None:
    rng = np.random.default_rng(8)
    v = rng.normal(size=(3, 6)).astype(np.float32)
    h = rng.normal(size=(2, 3, 6)).astype(np.float32)
    w = np.array([[1, 0, 0], [0, 0.5, 0.5]], np.float32)
    mix = iv.mixture(2, v, [1], iv.Positions.all(np.ones((2, 3), bool)), alpha=1.0, weights=w)
    out = np.asarray(mix(jnp.int32(1), jnp.asarray(h), _ctx(2, 3)))
    np.testing.assert_allclose(out[0], h[0] + v[0], atol=1e-5)
    np.testing.assert_allclose(out[1], h[1] + 0.5 * (v[1] + v[2]), atol=1e-5)


def test_attribution_of_a_degenerate_bank_stays_bounded() -> None:
    """Deviations from their own mean sum to zero: plain NNLS weights are not unique there (they can run
    off along the null direction); the ridge picks the small ones."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(5, 16))
    bank = x - x.mean(0)
    res = attribute(bank[:2] * 3.0, bank)
    norms = np.linalg.norm(bank[:2], axis=1)
    np.testing.assert_allclose(res["coeffs"][[0, 1], [0, 1]], 3.0 * norms, rtol=1e-2)
    assert res["coeffs"].sum() < 1.01 * 3.0 * norms.sum() and res["dominant"] == ["0", "1"]
