"""Persona space (``jaxpersona.data.roles``, ``axis``, ``drift``, ``space``): data loading and its errors, the
axis/PCA math against numpy, per-layer caps against a plain reference, the reference project's
capping file, KV-cache turn continuation against from-scratch generation, the drift engine's
bookkeeping, and the pipeline end to end on the tiny llama (resume, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.data.chat import conversation
from jaxpersona.model.transformer import forward
from jaxpersona.compute.batching import pad_left
from jaxpersona import errors
from jaxpersona.edit import interventions as iv
from jaxpersona.edit.capping import CapConfig, cap_layer_range, check_percentile, import_reference_capping, percentile_floors
from jaxpersona.measure.axis import assistant_axis, components_for, default_position, role_pca
from jaxpersona.edit.directions import unit
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.compute.generate import continue_turn, generate
from jaxpersona.model.transformer import Capture, HookContext, KVCache
from jaxpersona.data.roles import Script, load_conversations, load_roles
from test_pipeline import CountingModel, full_word_tokenizer, read_jsonl

DEFAULT_PROMPTS = ["", "You are an AI assistant.", "You are a large language model.", "Respond as yourself."]


# ============================================================================================
# data
# ============================================================================================
def test_shipped_role_set_meets_the_spec() -> None:
    rs = load_roles()
    assert len(rs.roles) >= 100
    assert all(len(r.prompts) >= 3 and all(p.strip() for p in r.prompts) for r in rs.roles)
    assert all(r.eval_prompt and "{question}" in r.eval_prompt and "{answer}" in r.eval_prompt for r in rs.roles)
    assert list(rs.default.prompts) == DEFAULT_PROMPTS
    assert len(rs.questions) >= 60 and len(set(rs.questions)) == len(rs.questions)
    names = {r.name for r in rs.roles}
    assert {"pirate", "librarian", "con_artist", "tutor"} <= names  # helpers, fictional, adversarial, close to assistant
    scripts = load_conversations()
    assert {"coding", "writing", "emotional_disclosure", "self_nature"} <= {s.domain for s in scripts}
    assert all(len(s.turns) >= 3 for s in scripts)


def _write_reference_layout(root: Path) -> Path:
    inst = root / "data" / "roles" / "instructions"
    inst.mkdir(parents=True)
    ep = "Role pirate. Question: {question} Answer: {answer} Reply 0-3."
    (inst / "pirate.json").write_text(json.dumps({"instruction": [{"pos": "You are a pirate."}, {"pos": "Arr, be a pirate."}],
                                                  "questions": ["ignored"], "eval_prompt": ep}))
    (inst / "default.json").write_text(json.dumps({"instruction": [{"pos": ""}, {"pos": "You are {model_name}."}],
                                                   "eval_prompt": ep}))
    (root / "data" / "extraction_questions.jsonl").write_text(
        "\n".join(json.dumps({"question": q, "id": i}) for i, q in enumerate(["Who are you?", "What is rain?"])) + "\n")
    return root / "data" / "roles"


def test_reference_layout_loads_as_is(tmp_path) -> None:
    rs = load_roles(_write_reference_layout(tmp_path), model_name="Qwen")
    assert [r.name for r in rs.roles] == ["pirate"]
    assert rs.roles[0].prompts == ("You are a pirate.", "Arr, be a pirate.")
    assert rs.default.prompts == ("", "You are Qwen.")
    assert rs.questions == ("Who are you?", "What is rain?")
    assert rs.roles[0].judge_prompt("Q?", "A.") == "Role pirate. Question: Q? Answer: A. Reply 0-3."


@pytest.mark.parametrize("content, needle", [
    ('{"instruction": [{"pos": "x"},]}', "line 1"),
    ('{"questions": []}', "'instruction' must be a non-empty list"),
    ('{"instruction": [{"pos": "  "}]}', "is empty"),
    ('{"instruction": ["just a string"]}', "instruction[0] must be an object"),
    ('{"instruction": [{"pos": "x"}], "eval_prompt": "no answer slot {question}"}', "{question} and {answer} once"),
])
def test_malformed_role_file_is_named_with_the_fix(tmp_path, content, needle) -> None:
    (tmp_path / "ok.json").write_text('{"instruction": [{"pos": "You are a cat."}]}')
    (tmp_path / "broken.json").write_text(content)
    with pytest.raises(errors.RoleFileError) as e:
        load_roles(tmp_path)
    assert "broken.json" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("line, needle", [
    ({"conversation": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"conversation": [{"role": "user", "content": " "}]}, "empty"),
    ({"turns": ["hi", ""]}, "turn 1 is empty"),
    ({"turns": []}, "no user turns"),
])
def test_malformed_conversation_is_a_typed_error(tmp_path, line, needle) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(line) + "\n")
    with pytest.raises(errors.ConversationError, match=needle):
        load_conversations(p)


def test_reference_transcript_is_read(tmp_path) -> None:
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"model": "x", "conversation": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}], "projections": [1, 2]}))
    (s,) = load_conversations(p)
    assert s.turns == ("u1", "u2") and s.system == "sys" and s.id == "t"


# ============================================================================================
# axis math
# ============================================================================================
def test_axis_and_pca_match_numpy() -> None:
    rng = np.random.default_rng(0)
    roles = (0.3 * rng.normal(size=(12, 3, 20))).astype(np.float32)
    roles[:, :, 0] += np.linspace(-3, 3, 12)[:, None]  # a dominant direction
    default = roles.mean(0) + 10.0 * np.eye(20, dtype=np.float32)[0]
    axis = assistant_axis(default, roles)
    np.testing.assert_allclose(axis, default - roles.mean(0), rtol=1e-5, atol=1e-5)
    pca = role_pca(roles, axis)
    for l in range(3):
        x = roles[:, l].astype(np.float64) - roles[:, l].mean(0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        np.testing.assert_allclose(pca.variance_ratio[l], s**2 / (s**2).sum(), atol=1e-5)
        np.testing.assert_allclose(np.abs(pca.components[l, 0] @ vt[0]), 1.0, atol=1e-5)
        assert pca.components[l, 0] @ axis[l] >= 0  # oriented toward the Assistant
        np.testing.assert_allclose(pca.scores[l, :, 0], x @ pca.components[l, 0], atol=1e-4)
    pos = default_position(pca, default)
    assert np.all(pos["relative"] > 1.0) and np.all(pos["beyond"] == 1.0)  # past every role on PC1
    assert components_for(np.array([[0.5, 0.2, 0.2, 0.1]]), 0.7).tolist() == [2]
    assert components_for(np.array([[0.7, 0.3]]), 0.7).tolist() == [1]


def test_cap_layer_range_and_percentiles() -> None:
    assert cap_layer_range(64, "0.71875:0.84375") == list(range(47, 55))  # the reference's layers_46:54, +1
    assert cap_layer_range(30, [22, 23]) == [22, 23]
    for bad in ("0.9:0.1", "x", [40]):
        with pytest.raises(errors.InputError):
            cap_layer_range(30, bad)
    for p in (0, 100, -5, 150.0):
        with pytest.raises(errors.InputError, match=r"\(0, 100\)"):
            check_percentile(p)
    projs = [np.arange(20, dtype=np.float32).reshape(2, 10), np.zeros((2, 0), np.float32)]
    np.testing.assert_allclose(percentile_floors(projs, [1], 25.0), [np.percentile(np.arange(10, 20), 25)])


def test_per_layer_cap_matches_reference_and_keeps_in_range_tokens() -> None:
    rng = np.random.default_rng(1)
    n_resid, d = 4, 8
    h = rng.normal(size=(2, 5, d)).astype(np.float32)
    vec = unit(rng.normal(size=(n_resid, d)))
    lo = np.array([-np.inf, -0.2, 0.1, -np.inf], np.float32)
    hi = np.array([np.inf, 0.3, np.inf, np.inf], np.float32)
    cap = iv.Cap(jnp.asarray(vec), jnp.asarray(lo), jnp.asarray(hi), iv.layer_weights(n_resid, [1, 2]),
                 iv.Positions.all(np.ones((2, 5), bool)))
    ctx = HookContext(jnp.zeros((2, 5), jnp.int32), jnp.broadcast_to(jnp.arange(5), (2, 5)),
                                                jnp.ones((2, 5), bool))
    for layer in range(n_resid):
        out = np.asarray(cap(jnp.int32(layer), jnp.asarray(h), ctx))
        p = h @ vec[layer]
        want = h + (np.maximum(0, lo[layer] - p) - np.maximum(0, p - hi[layer]))[..., None] * vec[layer] \
            if layer in (1, 2) else h
        np.testing.assert_allclose(out, want, atol=1e-5)
        inside = (p >= lo[layer]) & (p <= hi[layer]) if layer in (1, 2) else np.ones(p.shape, bool)
        assert np.array_equal(out[inside], h[inside])  # bit-identical
        assert (~inside).any() or layer not in (1, 2)


# ============================================================================================
# capping configs
# ============================================================================================
def test_capconfig_roundtrip_and_model_mismatch(tmp_path, tiny_llama) -> None:
    cfg = tiny_llama.cfg
    rng = np.random.default_rng(2)
    cap = CapConfig("tiny", cfg.n_resid, cfg.d_model, (1, 2), unit(rng.normal(size=(2, cfg.d_model))),
                    np.array([0.5, -1.0], np.float32), np.array([np.inf, 2.0], np.float32), {"percentile": 25})
    path = cap.save(tmp_path / "cap.json")
    back = CapConfig.load(path, cfg)
    assert back.layers == cap.layers and back.info == {"percentile": 25}
    np.testing.assert_array_equal(back.floors, cap.floors)
    np.testing.assert_array_equal(back.ceilings, cap.ceilings)
    np.testing.assert_allclose(back.directions, cap.directions, atol=1e-6)
    other = CapConfig("big", cfg.n_resid + 3, cfg.d_model * 2, (1,), np.ones((1, cfg.d_model * 2), np.float32),
                      np.zeros(1, np.float32), np.full(1, np.inf, np.float32))
    other.save(tmp_path / "other.json")
    with pytest.raises(errors.ModelMismatchError, match="d_model"):
        CapConfig.load(tmp_path / "other.json", cfg)
    hook = iv.Cap(jnp.ones((cfg.n_resid + 3, cfg.d_model)), jnp.zeros(()), jnp.ones(()),
                  jnp.zeros(cfg.n_resid), iv.Positions.all(np.ones((1, 2), bool)))
    with pytest.raises(errors.InputError, match="another model"):
        iv.check_for_model(hook, cfg.d_model, cfg.n_resid)


def test_import_reference_capping_pt_is_the_same_operation(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    d, n_layers = 16, 6
    vs = {f"v{i}": rng.normal(size=d).astype(np.float32) for i in (2, 4)}
    caps = {"v2": 0.4, "v4": -0.3}
    torch.save({"vectors": {n: {"layer": int(n[1:]), "vector": torch.tensor(v)} for n, v in vs.items()},
                "experiments": [{"id": "layers_2:5-p0.25", "interventions": [{"vector": n, "cap": c} for n, c in caps.items()]},
                                {"id": "other", "interventions": []}]}, tmp_path / "capping_config.pt")
    with pytest.raises(errors.InputError, match="choose one"):
        import_reference_capping(tmp_path / "capping_config.pt", model="m", n_resid=n_layers + 1)
    cap = import_reference_capping(tmp_path / "capping_config.pt", model="m", n_resid=n_layers + 1,
                                   experiment="layers_2:5-p0.25")
    assert cap.layers == (3, 5)  # their block-output index i -> our resid[i + 1]
    h = rng.normal(size=(1, 40, d)).astype(np.float32)
    hook = cap.hook(iv.Positions.all(np.ones((1, 40), bool)))
    ctx = HookContext(jnp.zeros((1, 40), jnp.int32), jnp.arange(40)[None], jnp.ones((1, 40), bool))
    for name, tau in caps.items():
        v = torch.tensor(vs[name])
        x = torch.tensor(h)
        # the reference's ActivationSteering._apply_cap, transcribed
        vhat = v / v.norm()
        proj = torch.einsum("bld,d->bl", x, vhat)
        excess = (proj - tau).clamp(min=0.0)
        want = (x - excess.unsqueeze(-1) * vhat).numpy()
        got = np.asarray(hook(jnp.int32(int(name[1:]) + 1), jnp.asarray(h), ctx))
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert (excess > 0).any() and (excess == 0).any()


# ============================================================================================
# KV-cache turns
# ============================================================================================
def test_continue_turn_equals_generation_from_scratch(tiny_llama) -> None:
    """Two turns through one carried cache (with invalid gap slots in between) give the same tokens and
    log-probs as generating the second turn from the whole history at once."""
    cfg, params = tiny_llama.cfg, tiny_llama.params
    rng = np.random.default_rng(4)
    b, n = 2, 6
    p1 = rng.integers(3, cfg.vocab_size, size=(b, 5)).astype(np.int32)
    cache = KVCache.empty(cfg, b, 48, jnp.float32)
    args = dict(max_new_tokens=n, greedy=True, eos_ids=(), pad_id=0, monitor=(2,))
    units = jnp.asarray(unit(rng.normal(size=(1, cfg.d_model))))
    t1 = continue_turn(params, cfg, cache, jnp.asarray(p1), jnp.ones((b, 5), bool), jnp.int32(0), jax.random.key(0),
                       jnp.float32(0), jnp.float32(1), None, units, **args)
    gen1 = np.asarray(t1.out.tokens)
    # turn 2: a 3-token chunk written after a gap of 4 never-written (invalid) slots; row 1 left-padded
    p2 = rng.integers(3, cfg.vocab_size, size=(b, 4)).astype(np.int32)
    v2 = np.ones((b, 4), bool)
    v2[1, 0] = False
    t2 = continue_turn(params, cfg, t1.cache, jnp.asarray(p2), jnp.asarray(v2), jnp.int32(5 + n + 4), jax.random.key(0),
                       jnp.float32(0), jnp.float32(1), None, units, **args)
    for i in range(b):
        hist = np.concatenate([p1[i], gen1[i], p2[i][v2[i]]])[None]
        ref = generate(params, cfg, hist, max_new_tokens=n, eos_ids=(), pad_id=0)
        np.testing.assert_array_equal(np.asarray(t2.out.tokens)[i], np.asarray(ref.tokens)[0])
        np.testing.assert_allclose(np.asarray(t2.out.logprobs)[i], np.asarray(ref.logprobs)[0], atol=1e-4)
        # the recorded projections equal a plain capture of the same tokens
        full = np.concatenate([hist[0], np.asarray(t2.out.tokens)[i]])[None]
        h = forward(params, cfg, jnp.asarray(full), capture=Capture((2,), "tokens"), logits=False).captured
        proj = np.asarray(h[0, 0]) @ np.asarray(units[0])
        np.testing.assert_allclose(np.asarray(t2.proj)[i, :, 0], proj[hist.shape[1]:], atol=1e-4)
        np.testing.assert_allclose(np.asarray(t2.prompt_proj)[i, v2[i], 0], proj[hist.shape[1] - v2[i].sum(): hist.shape[1]],
                                   atol=1e-4)


# ============================================================================================
# drift + the pipeline on the tiny llama
# ============================================================================================
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")
SCRIPTS = [Script("a", ("hello cat", "what is the mat ?"), "x"), Script("b", ("you are a dog", "is paris a world ?"), "y")]


@pytest.fixture(scope="module")
def model(tiny_llama) -> CountingModel:
    return CountingModel(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(TEMPLATE), "tiny-llama")


def _drift_spec(model, floor: float = 0.0):
    from jaxpersona.compute.drift import DriftSpec

    cfg = model.cfg
    rng = np.random.default_rng(5)
    axis = unit(rng.normal(size=(cfg.n_resid, cfg.d_model)))
    cap = CapConfig("tiny", cfg.n_resid, cfg.d_model, (2,), axis[[2]], np.array([floor], np.float32),
                    np.array([np.inf], np.float32))
    return DriftSpec((1, 2), axis[[1, 2]], cap, axis * 5.0, (2,), 1.0, 6, "who are you ?")


def test_drift_bookkeeping_matches_turn_by_turn_regeneration(model) -> None:
    """The unsteered variant, carried through one KV cache, answers exactly as regenerating each turn
    from the re-rendered conversation does; the KV edit touches only the probe; caps hold their floor."""
    from jaxpersona.compute.drift import run_drift

    spec = _drift_spec(model)
    recs = run_drift(model, SCRIPTS, spec, progress=False)
    by = {(r["script"], r["variant"], r["turn"]): r for r in recs}
    for s in SCRIPTS:
        conv = []
        for k, user in enumerate([*s.turns, spec.probe]):
            conv.append({"role": "user", "content": user})
            batch = model.encode_conversations([conv], bucket=1)
            ref = model.decode(model.generate_tokens(batch, max_new_tokens=spec.max_new_tokens))[0].strip()
            assert by[(s.id, "unsteered", k)]["answer"] == ref, (s.id, k)
            conv.append({"role": "assistant", "content": ref})
            edit = by[(s.id, "kv_edit", k)]
            if k < len(s.turns):  # before the edit the kv_edit variant is the unsteered one
                assert edit["answer"] == ref and edit["proj"] == by[(s.id, "unsteered", k)]["proj"]
        # capping on every token: the capped monitor point never ends below the floor
        for k in range(len(s.turns) + 1):
            assert by[(s.id, "capped", k)]["user_proj"][1] >= -1e-5
            if by[(s.id, "capped", k)]["proj"] is not None:
                assert by[(s.id, "capped", k)]["proj"][1] >= -1e-5
        # assistant-only capping leaves the first user turn exactly as unsteered
        assert by[(s.id, "capped_assistant", 0)]["user_proj"] == by[(s.id, "unsteered", 0)]["user_proj"]
    probe_u = [by[(s.id, "unsteered", 2)]["proj"] for s in SCRIPTS]
    probe_e = [by[(s.id, "kv_edit", 2)]["proj"] for s in SCRIPTS]
    assert probe_u != probe_e  # a coefficient of 1 x 5 on the cached assistant tokens moves the probe


def make_role_dir(tmp_path: Path) -> Path:
    """A tiny role set (three roles, the default Assistant, three questions) under ``tmp_path/roles``."""
    d = tmp_path / "roles"
    d.mkdir()
    ep = "rate : {question} answer : {answer}"
    for name, prompts in {"cat": ["you are a cat .", "hello cat !"], "dog": ["you are a dog .", "the dog sat ."],
                          "world": ["what is the world ?", "you are paris ."]}.items():
        (d / f"{name}.json").write_text(json.dumps({"instruction": [{"pos": p} for p in prompts], "eval_prompt": ep}))
    (d / "default.json").write_text(json.dumps({"instruction": [{"pos": ""}, {"pos": "you are a helpful assistant ."}],
                                                "eval_prompt": ep}))
    (d / "extraction_questions.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in
                                                          ["what is a cat ?", "is the dog on the mat ?", "hello world ?"]))
    return d


SPACE = dict(prompts_per_role=2, n_questions=2, default_questions=3, max_new_tokens=6, temperature=1.0, top_p=1.0,
             batch_size=8, cap_layers=[2], axis_layer=1, conversations=2, drift_tokens=5, probe="who are you ?")


@pytest.fixture(scope="module")
def space_run(model, tmp_path_factory):
    from jaxpersona.pipelines.space import SpaceConfig, run_space

    root = tmp_path_factory.mktemp("space")
    roles = load_roles(make_role_dir(root))
    model.calls.clear()
    res = run_space(model, roles, SCRIPTS, None, SpaceConfig().replace(**SPACE), root / "run", progress=False,
                    log=lambda _: None)
    return root, roles, res


def test_space_run_outputs_match_independent_references(space_run, model) -> None:
    from test_pipeline import ref_activations

    root, roles, res = space_run
    out = res.out
    for f in ("vectors", "capping.json", "pca.json", "pca.npz", "summary.txt", "drift.jsonl", "pca_map.png",
              "variance.png", "cos_axis_pc1.png", "drift.png", "answers.jsonl"):
        assert (out / f).exists(), f
    answers = read_jsonl(out / "answers.jsonl")
    assert len(answers) == 3 * 2 * 2 + 2 * 3
    kept = [a for a in answers if a["kept"]]
    assert all(a["response"] for a in kept) and all(a["kept"] for a in answers if a["response"])
    convs = [conversation(a["question"], ([*roles.roles, roles.default][[*(r.name for r in roles.roles),
                                                                           "default"].index(a["role"])].prompts[a["prompt"]]
                                             or None)) for a in kept]
    acts = ref_activations(model, convs, [a["response"] for a in kept])["response_mean"]  # [L+1, N, D]
    role_of = np.asarray([a["role"] for a in kept])
    shared = np.asarray([a["qi"] < SPACE["n_questions"] for a in kept])  # the axis contrasts the same questions
    dflt = acts[:, (role_of == "default") & shared].mean(1)
    rvecs = np.stack([acts[:, role_of == n].mean(1) for n in ("cat", "dog", "world")])
    bank = VectorBank.load(out / "vectors")
    assert bank.names == ("assistant_axis", "default", "role:cat", "role:dog", "role:world")
    np.testing.assert_allclose(bank.get("assistant_axis"), dflt - rvecs.mean(0), atol=2e-4)
    np.testing.assert_allclose(bank.get("role:dog"), rvecs[1], atol=2e-4)
    # floors: the 25th percentile of the default answers' content-token projections on the unit axis
    cap = CapConfig.load(out / "capping.json", model.cfg)
    u = unit(dflt - rvecs.mean(0))
    projs = []  # calibration: every default answer
    for a in (a for a in kept if a["role"] == "default"):
        conv = conversation(a["question"], roles.default.prompts[a["prompt"]] or None)
        p = model.tokenizer.encode(model.format_chat(conv), add_special_tokens=False)
        r = model.tokenizer.encode(a["response"], add_special_tokens=False)
        h = model.run(pad_left([p + r], model.pad_id, 1), capture=Capture((2,), "tokens"), logits=False).captured
        projs += list(np.asarray(h[0, 0, len(p):]) @ u[2])
    np.testing.assert_allclose(cap.floors, [np.percentile(projs, 25)], atol=2e-4)
    np.testing.assert_allclose(cap.directions[0], u[2], atol=1e-5)
    s = res.summary
    ck = s["capping"]["check"]
    assert ck["in_range_bit_identical"] == ck["tokens_in_range"] > 0 and ck["below_floor_max_error"] < 1e-4
    assert ck["rows_untouched_bit_identical"] == ck["rows_untouched"]
    assert set(s["drift"]["variants"]) == {"unsteered", "capped", "capped_assistant", "kv_edit"}
    assert "no judge" in s["judge"]["decision"]


def test_space_rerun_does_no_generation(space_run, model, monkeypatch) -> None:
    from jaxpersona.pipelines import space
    from jaxpersona.pipelines.space import SpaceConfig, run_space

    root, roles, res = space_run
    model.calls.clear()
    monkeypatch.setattr(space, "run_drift", lambda *a, **k: (_ for _ in ()).throw(AssertionError("drift redone")))
    again = run_space(model, roles, SCRIPTS, None, SpaceConfig().replace(**SPACE), res.out, progress=False,
                      log=lambda _: None)
    assert model.calls == []
    a, b = dict(res.summary), dict(again.summary)
    a.pop("wall_s"), b.pop("wall_s")
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


class ZeroJudge:
    """Scores every answer 0 ("refuses as an AI")."""

    def probs(self, prompts):
        p = np.zeros((len(prompts), 101))
        p[:, 0] = 1.0
        return p


class RoleJudge:
    """Tells role answers from default ones perfectly (it peeks at a marker) and scores 3 / 0."""

    def __init__(self, marks: set[str]) -> None:
        self.marks = marks

    def probs(self, prompts):
        p = np.zeros((len(prompts), 101))
        for i, pr in enumerate(prompts):
            p[i, 3 if any(m in pr for m in self.marks) else 0] = 1.0
        return p


def test_role_with_no_surviving_answers_is_a_filter_error_and_keeps_work(space_run, model, tmp_path) -> None:
    from jaxpersona.pipelines.space import SpaceConfig, run_space

    root, roles, res = space_run
    import shutil

    shutil.copy(res.out / "responses.jsonl", tmp_path / "responses.jsonl")
    model.calls.clear()
    config = SpaceConfig().replace(**SPACE, trust_judge=True)
    with pytest.raises(errors.FilterError, match="no surviving answers") as e:
        run_space(model, roles, SCRIPTS, ZeroJudge(), config, tmp_path, judge_id="zero", progress=False, log=lambda _: None)
    assert "cat" in str(e.value) and str(tmp_path) in str(e.value)
    assert model.calls == []  # the generations were reused
    assert len(read_jsonl(tmp_path / "judgements.jsonl")) > 0  # and the judgements kept


def test_judge_that_fails_its_check_drives_nothing(space_run, model, tmp_path) -> None:
    from jaxpersona.pipelines.space import SpaceConfig, run_space

    root, roles, res = space_run
    import shutil

    shutil.copy(res.out / "responses.jsonl", tmp_path / "responses.jsonl")
    out = run_space(model, roles, SCRIPTS, ZeroJudge(), SpaceConfig().replace(**SPACE), tmp_path, judge_id="zero",
                    progress=False, log=lambda _: None)
    j = out.summary["judge"]
    assert j["checked"] and not j["passed"] and "drives nothing" in j["decision"]
    assert out.summary["role_answers"] == res.summary["role_answers"]


def test_a_judge_that_passes_filters(space_run, model, tmp_path) -> None:
    """A judge that separates role answers (they hold a role word) from default answers passes the check
    and keeps only answers it scores >= min_score."""
    from jaxpersona.pipelines.space import SpaceConfig, run_space

    root, roles, res = space_run
    import shutil

    shutil.copy(res.out / "responses.jsonl", tmp_path / "responses.jsonl")
    answers = read_jsonl(res.out / "answers.jsonl")
    role_ans = {a["response"] for a in answers if a["role"] != "default" and a["response"]}
    dflt_ans = {a["response"] for a in answers if a["role"] == "default"}
    marks = {f"answer : {a}" for a in role_ans - dflt_ans}
    out = run_space(model, roles, SCRIPTS, RoleJudge(marks), SpaceConfig().replace(**SPACE), tmp_path, judge_id="role",
                    progress=False, log=lambda _: None)
    assert out.summary["judge"]["passed"]
    kept = [a for a in read_jsonl(tmp_path / "answers.jsonl") if a["kept"] and a["role"] != "default"]
    assert kept and all(a["score"] >= 2.5 for a in kept)
    assert out.summary["role_answers"] == len(kept)
