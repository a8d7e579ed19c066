"""Capping configs as the reference (assistant-axis ``build_capping_steerer``) applies them.

The reference keeps, per layer, the caps of the chosen experiment in config order and runs them in sequence in
one forward hook on ``model.model.layers[i]``: ``v̂ = v / (|v| + 1e-8)``, ``h <- h - max(h.v̂ - tau, 0) v̂``; it
skips interventions without ``"cap"`` and takes the first experiment with the id. Here that hook loop is written
again in NumPy and hooked into the HF torch model of a tiny Llama; jaxpersona's import of the same
``capping_config.pt`` (two non-orthogonal caps on one layer, a cap on another, a non-cap entry, a duplicated id)
must give the same residuals and logits. Both sides compute in fp32 (measured max |diff| ~1e-5 on logits of
magnitude ~5); 1e-4 catches a wrong order (the swapped order moves logits by > 1e-2, asserted).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpersona import errors
from jaxpersona.edit import interventions as iv
from jaxpersona.edit.capping import (
    CapConfig,
    describe_capping,
    import_capping_file,
    import_reference_capping,
)
from jaxpersona.edit.directions import cosine
from jaxpersona.model.transformer import Capture, forward

ATOL = 1e-4
LAYER_A = 1  # their block-output index: both caps here (our resid[2])
LAYER_B = 2  # one more cap (our resid[3])
fwd = jax.jit(forward, static_argnames=("cfg", "capture", "logits"))


def _vectors(d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=d).astype(np.float32)
    b = (0.8 * a / np.linalg.norm(a) * 3.0 + 0.6 * rng.normal(size=d) / np.sqrt(d) * 3.0).astype(np.float32)
    c = rng.normal(size=d).astype(np.float32) * 2.0
    assert 0.5 < abs(float(cosine(a, b))) < 0.95  # non-orthogonal: the order of the two caps matters
    return {"a": a, "b": b, "c": c}


def _taus(tiny, vecs, tokens) -> dict[str, float]:
    """Thresholds that bind on about half the tokens (from the uncapped residuals)."""
    with torch.no_grad():
        hs = tiny.hf(input_ids=torch.tensor(tokens), output_hidden_states=True).hidden_states
    out = {}
    for name, layer in (("a", LAYER_A), ("b", LAYER_A), ("c", LAYER_B)):
        h = hs[layer + 1].numpy()
        v = vecs[name] / (np.linalg.norm(vecs[name]) + 1e-8)
        out[name] = float(np.percentile(h @ v, 50 if name != "b" else 35))
    return out


def write_reference_config(path, vecs, taus, order=("a", "b")) -> None:
    """A capping_config.pt as the reference writes it, with a non-cap entry and a duplicated experiment id."""
    t = {k: torch.tensor(v) for k, v in vecs.items()}
    exp = {"id": "e1", "interventions": [{"vector": n, "cap": taus[n]} for n in order]
           + [{"vector": "a", "coeff": 4.0}, {"vector": "c", "cap": taus["c"]}]}
    data = {"vectors": {"a": {"layer": LAYER_A, "vector": t["a"]}, "b": {"layer": LAYER_A, "vector": t["b"]},
                        "c": {"layer": LAYER_B, "vector": t["c"]}},
            "experiments": [exp, {"id": "other", "interventions": [{"vector": "c", "cap": 0.0}]},
                            {"id": "e1", "interventions": [{"vector": "b", "cap": -100.0}]}]}  # duplicate: ignored
    torch.save(data, path)


def reference_forward(tiny, path, experiment, tokens):
    """The reference's hook loop, transcribed in NumPy, on the HF torch model: logits and each hooked output."""
    cfg = torch.load(path, weights_only=False)
    exp = next(e for e in cfg["experiments"] if e["id"] == experiment)  # the first with the id
    by_layer: dict[int, list] = {}
    for it in exp["interventions"]:
        if "cap" not in it:
            continue
        spec = cfg["vectors"][it["vector"]]
        by_layer.setdefault(int(spec["layer"]), []).append((spec["vector"].float().numpy(), float(it["cap"])))
    seen, bound = {}, []

    def hook_for(layer):
        def hook(module, args, out):
            h0 = out[0] if isinstance(out, tuple) else out
            h = h0.detach().numpy().astype(np.float32)
            for v, tau in by_layer[layer]:
                vh = v / (np.linalg.norm(v) + 1e-8)
                excess = np.maximum(h @ vh - tau, 0.0)
                bound.append(int((excess > 0).sum()))
                h = h - excess[..., None] * vh
            seen[layer] = h
            new = torch.from_numpy(h)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    handles = [tiny.hf.model.layers[l].register_forward_hook(hook_for(l)) for l in by_layer]
    try:
        with torch.no_grad():
            logits = tiny.hf(input_ids=torch.tensor(tokens)).logits.numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, seen, bound


def ours(tiny, cap: CapConfig, tokens):
    hook = cap.hook(iv.Positions.all(np.ones(tokens.shape, bool)))
    out = fwd(tiny.params, tiny.cfg, jnp.asarray(tokens), hook=hook, capture=Capture((LAYER_A + 1, LAYER_B + 1)))
    return np.asarray(out.logits), np.asarray(out.captured)


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    tokens = np.random.default_rng(1).integers(3, 256, (2, 11)).astype(np.int32)
    vecs = _vectors(tiny_llama.cfg.d_model)
    taus = _taus(tiny_llama, vecs, tokens)
    root = tmp_path_factory.mktemp("capcfg")
    write_reference_config(root / "capping_config.pt", vecs, taus)
    write_reference_config(root / "swapped.pt", vecs, taus, order=("b", "a"))
    return tokens, vecs, taus, root


def test_caps_of_one_layer_apply_in_config_order_as_the_reference(tiny_llama, setup) -> None:
    tokens, _, _, root = setup
    t = tiny_llama
    with pytest.warns(UserWarning) as rec:
        cap = import_reference_capping(root / "capping_config.pt", model="tiny", n_resid=t.cfg.n_resid,
                                       experiment="e1")
    msgs = [str(w.message) for w in rec]
    assert sum("1 intervention(s) without 'cap' skipped" in m for m in msgs) == 1
    assert sum("experiment id(s) occur more than once (e1)" in m for m in msgs) == 1
    assert cap.layers == (LAYER_A + 1, LAYER_A + 1, LAYER_B + 1) and cap.slots == 2
    assert cap.info["vectors"] == ["a", "b", "c"] and cap.info["skipped_non_caps"] == 1
    hook = cap.hook(iv.Positions.all(np.ones((1, 1), bool)))
    assert isinstance(hook, iv.Chain) and len(hook.items) == 2

    ref_logits, ref_h, bound = reference_forward(t, root / "capping_config.pt", "e1", tokens)
    assert min(bound) >= 4, f"every cap must bind on some tokens, got {bound}"
    got_logits, got_h = ours(t, cap, tokens)
    d_logits = np.abs(got_logits - ref_logits).max()
    d_a = np.abs(got_h[0] - ref_h[LAYER_A]).max()
    d_b = np.abs(got_h[1] - ref_h[LAYER_B]).max()
    print(f"\nmax |ours - reference|: logits {d_logits:.2e} (scale {np.abs(ref_logits).max():.1f}), "
          f"resid[{LAYER_A + 1}] {d_a:.2e}, resid[{LAYER_B + 1}] {d_b:.2e}; tokens clamped per cap {bound}")
    assert d_logits < ATOL and d_a < ATOL and d_b < ATOL

    # the check can fail: the swapped order, and the old "last cap of a layer wins", give other logits
    with pytest.warns(UserWarning):
        swapped = import_reference_capping(root / "swapped.pt", model="tiny", n_resid=t.cfg.n_resid, experiment="e1")
    assert swapped.info["vectors"] == ["b", "a", "c"]
    sw_logits, _ = ours(t, swapped, tokens)
    sw_ref, _, _ = reference_forward(t, root / "swapped.pt", "e1", tokens)
    assert np.abs(sw_logits - sw_ref).max() < ATOL
    assert np.abs(sw_logits - ref_logits).max() > 1e-2
    last_wins = CapConfig("tiny", t.cfg.n_resid, t.cfg.d_model, cap.layers[1:], cap.directions[1:], cap.floors[1:],
                          cap.ceilings[1:])
    assert np.abs(ours(t, last_wins, tokens)[0] - ref_logits).max() > 1e-2


def test_multi_cap_config_round_trips_jits_and_vmaps(tiny_llama, setup, tmp_path) -> None:
    root = setup[3]
    t = tiny_llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap, out = import_capping_file(root / "capping_config.pt", tmp_path / "caps.json", model_id="tiny",
                                       n_resid=t.cfg.n_resid, experiment="e1")
    back = CapConfig.load(out, t.cfg)
    assert back.layers == cap.layers and np.allclose(back.directions, cap.directions, atol=1e-6)
    assert np.allclose(back.floors, cap.floors)
    with pytest.raises(errors.InputError, match="stacked"):
        back.arrays()
    # a batch of differently capped forwards: vmap over the thresholds of the same structure
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 256, (1, 9)), jnp.int32)
    pos = iv.Positions.all(np.ones((1, 9), bool))
    lower = CapConfig(cap.model, cap.n_resid, cap.d_model, cap.layers, cap.directions, cap.floors + 0.5, cap.ceilings)
    hooks = [c.hook(pos) for c in (cap, lower)]
    both = jax.tree.map(lambda *x: jnp.stack(x), *hooks)
    run = jax.jit(lambda h: forward(t.params, t.cfg, tokens, hook=h).logits)
    batched = jax.vmap(run)(both)
    for k, h in enumerate(hooks):
        np.testing.assert_allclose(np.asarray(batched[k]), np.asarray(run(h)), atol=1e-5)
    assert np.abs(np.asarray(batched[0] - batched[1])).max() > 1e-3


def test_single_cap_config_is_the_same_cap_as_before(tiny_llama) -> None:
    t = tiny_llama
    cfg = t.cfg
    rng = np.random.default_rng(3)
    d = rng.normal(size=(2, cfg.d_model)).astype(np.float32)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    cap = CapConfig("tiny", cfg.n_resid, cfg.d_model, (1, 3), d, np.array([-0.5, 0.2], np.float32),
                    np.array([np.inf, 1.0], np.float32))
    assert cap.slots == 1
    vec, lo, hi, w = cap.arrays()
    ref_vec = np.zeros((cfg.n_resid, cfg.d_model), np.float32)
    ref_vec[[1, 3]] = d
    np.testing.assert_array_equal(vec, ref_vec)
    np.testing.assert_array_equal(w, np.isin(np.arange(cfg.n_resid), [1, 3]).astype(np.float32))
    pos = iv.Positions.all(np.ones((2, 7), bool))
    hook = cap.hook(pos)
    assert isinstance(hook, iv.Cap)
    tokens = jnp.asarray(rng.integers(3, 256, (2, 7)), jnp.int32)
    manual = iv.Cap(jnp.asarray(vec), jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(w), pos)
    a = np.asarray(fwd(t.params, cfg, tokens, hook=hook).logits)
    b = np.asarray(fwd(t.params, cfg, tokens, hook=manual).logits)
    assert np.array_equal(a, b)


@pytest.mark.filterwarnings("ignore:.*occur more than once")
def test_import_bad_input_and_bank_cosines(tiny_llama, setup, tmp_path) -> None:
    _, vecs, _, root = setup
    n_resid, d = tiny_llama.cfg.n_resid, tiny_llama.cfg.d_model
    t = {k: torch.tensor(v) for k, v in vecs.items()}
    base = {"a": {"layer": LAYER_A, "vector": t["a"]}, "b": {"layer": LAYER_A, "vector": t["b"]},
            "c": {"layer": -1, "vector": t["c"]}}  # a negative layer counts from the end, as python indexing does

    def save(exps, vectors=base):
        p = tmp_path / f"c{len(list(tmp_path.iterdir()))}.pt"
        torch.save({"vectors": vectors, "experiments": exps}, p)
        return p

    with pytest.raises(errors.InputError, match="no 'vector'"):
        import_reference_capping(save([{"id": "x", "interventions": [{"cap": 1.0}]}]), model="m", n_resid=n_resid)
    with pytest.raises(errors.InputError, match="'zz' is not an entry"):
        import_reference_capping(save([{"id": "x", "interventions": [{"vector": "zz", "cap": 1.0}]}]), model="m",
                                 n_resid=n_resid)
    with pytest.warns(UserWarning, match="2 intervention"), pytest.raises(errors.InputError, match="no capping"):
        import_reference_capping(save([{"id": "x", "interventions": [{"vector": "a"}, {"vector": "b", "coeff": 1}]}]),
                                 model="m", n_resid=n_resid)
    with pytest.raises(errors.InputError, match="choose one"):
        import_reference_capping(root / "capping_config.pt", model="m", n_resid=n_resid)
    with pytest.raises(errors.InputError, match="no experiment 'nope'"):
        import_reference_capping(root / "capping_config.pt", model="m", n_resid=n_resid, experiment="nope")
    with pytest.raises(errors.ModelMismatchError, match="outside"):
        import_reference_capping(save([{"id": "x", "interventions": [{"vector": "a", "cap": 1.0}]}],
                                      {"a": {"layer": 9, "vector": t["a"]}}), model="m", n_resid=n_resid)
    # index picks like the reference's int experiment id; the negative layer lands on the last block
    exps = [{"id": "x", "interventions": [{"vector": "c", "cap": 1.0}, {"vector": "b", "cap": 2.0},
                                           {"vector": "a", "cap": 3.0}]}]
    axis = np.random.default_rng(5).normal(size=(n_resid, d)).astype(np.float32)
    cap = import_reference_capping(save(exps), model="m", n_resid=n_resid, experiment="0", axis=axis)
    assert cap.layers == (LAYER_A + 1, LAYER_A + 1, n_resid - 1)
    assert cap.info["vectors"] == ["b", "a", "c"]  # sorted by layer, config order kept within the layer
    assert np.allclose(cap.floors, [-2.0, -3.0, -1.0])
    # the cosines are reordered with their layers (they used to keep the config order)
    for name, layer, c in zip(cap.info["vectors"], cap.layers, cap.info["cos_with_axis"]):
        assert c == pytest.approx(float(cosine(-vecs[name], axis[layer])), abs=1e-6)
    text = describe_capping(cap)
    print("\n" + text)
    assert ("resid[2]: clamp <h, -unit(b)> >= -2, cap 1 of 2 (in this order) (output of block 1; reference: "
            "<h, unit(b)> <= 2 at their layer 1), cos with axis") in text
    assert "resid[2]: clamp <h, -unit(a)> >= -3, cap 2 of 2 (in this order) (output of block 1; reference:" in text
    assert f"resid[{n_resid - 1}]: clamp <h, -unit(c)> >= -1 (output of block {n_resid - 2}; reference:" in text
    assert "cos with axis" in text and "direction [" in text


@pytest.mark.filterwarnings("ignore:.*occur more than once", "ignore:.*without 'cap' skipped")
def test_capping_show_and_import_on_the_cli(tiny_llama, setup, tmp_path, capsys) -> None:
    from jaxpersona.cli import main

    _, _, _, root = setup
    n_layers = tiny_llama.cfg.n_layers
    out = tmp_path / "caps.json"
    assert main(["capping", "import", str(root / "capping_config.pt"), "--model-id", "tiny", "--n-layers",
                 str(n_layers), "--experiment", "e1", "--out", str(out)]) == 0
    err = capsys.readouterr()
    assert "up to 2 per resid point, applied in config order" in err.out
    assert main(["capping", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "<h, -unit(a)> >=" in shown and "<h, -unit(b)> >=" in shown and "-unit(c)" in shown
    assert shown.index("-unit(a)") < shown.index("-unit(b)") and "cap 2 of 2 (in this order)" in shown
    bad = tmp_path / "bad.pt"
    torch.save({"vectors": {}, "experiments": [{"id": "x", "interventions": [{"cap": 1.0}]}]}, bad)
    assert main(["capping", "import", str(bad), "--model-id", "tiny", "--n-layers", str(n_layers)]) == 2
    assert json.loads(out.read_text())["caps"][0]["layer"] == LAYER_A + 1


def test_served_multi_cap_preset_gives_the_library_logits(tiny_llama, setup, tmp_path) -> None:
    """A capping preset with two caps on one resid point, served over HTTP: the chosen tokens' log-probs equal
    the library's forward under ``CapConfig.hook`` (every position)."""
    import urllib.request

    from test_pipeline import full_word_tokenizer

    from jaxpersona.compute.handle import Model
    from jaxpersona.serve.app import PersonaServer, build_resources
    from jaxpersona.serve.engine import EngineConfig

    _, _, _, root = setup
    t = tiny_llama
    model = Model(t.cfg, t.params, full_word_tokenizer(), "tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap, path = import_capping_file(root / "capping_config.pt", tmp_path / "caps.json", model_id="tiny",
                                        n_resid=t.cfg.n_resid, experiment="e1")
    with pytest.raises(errors.InputError, match="max-interventions >= 2"):
        build_resources(model, [], [f"caps={path}"], "tiny", 1, 1)
    res = build_resources(model, [], [f"caps={path}"], "tiny", 2, 1)
    assert len(res.presets["caps"]) == 2
    srv = PersonaServer(model, res, EngineConfig(batch=2, max_context=64, prefill_rows=1, prefill_chunk=16)).start()
    try:
        conv = [{"role": "user", "content": "hello world what is the cat"}]
        body = {"messages": conv, "max_tokens": 6, "temperature": 0, "logprobs": True,
                "return_tokens_as_token_ids": True, "interventions": ["caps"]}
        req = urllib.request.Request(srv.url + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=300) as r:
            got = json.loads(r.read())
    finally:
        srv.close()
    content = got["choices"][0]["logprobs"]["content"]
    served = [c["logprob"] for c in content]
    toks = [int(c["token"].removeprefix("token_id:")) for c in content]
    prompt = model.tokenizer.encode(model.format_chat(conv), add_special_tokens=False)
    seq = np.asarray([prompt + toks], np.int32)
    p = len(prompt)
    hook = cap.hook(iv.Positions.all(np.ones(seq.shape, bool)))
    logits = forward(t.params, t.cfg, jnp.asarray(seq), hook=hook).logits[0]
    ref = np.asarray(jax.nn.log_softmax(logits, -1)[np.arange(p - 1, p - 1 + len(toks)), np.asarray(toks)])
    print(f"\nserved multi-cap preset vs library: max |log-prob diff| {np.abs(np.asarray(served) - ref).max():.2e}")
    np.testing.assert_allclose(served, ref, atol=2e-4)
    one = CapConfig(cap.model, cap.n_resid, cap.d_model, cap.layers[1:], cap.directions[1:], cap.floors[1:],
                    cap.ceilings[1:])  # the old behaviour: one cap per resid point
    old = forward(t.params, t.cfg, jnp.asarray(seq), hook=one.hook(iv.Positions.all(np.ones(seq.shape, bool)))).logits[0]
    moved = np.asarray(jax.nn.log_softmax(old, -1)[np.arange(p - 1, p - 1 + len(toks)), np.asarray(toks)])
    assert np.abs(moved - ref).max() > 1e-3


def test_drift_applies_the_caps_of_one_layer_in_order(tiny_llama) -> None:
    """Two caps on one direction at one resid point, the higher floor first: in sequence that is the higher
    floor (the second cap has nothing left to lift), so the drift run equals the one with that cap alone; the
    old "last cap wins" would have been the lower floor."""
    from test_pipeline import full_word_tokenizer

    from jaxpersona.compute.drift import DriftSpec, run_drift
    from jaxpersona.compute.handle import Model
    from jaxpersona.data.roles import Script

    t = tiny_llama
    cfg = t.cfg
    model = Model(cfg, t.params, full_word_tokenizer(), "tiny-llama")
    rng = np.random.default_rng(5)
    axis = rng.normal(size=(cfg.n_resid, cfg.d_model)).astype(np.float32)
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    scripts = [Script("a", ("hello cat", "what is the mat ?"), "x")]

    def run(layers, floors):
        cap = CapConfig("tiny", cfg.n_resid, cfg.d_model, layers, axis[list(layers)], np.asarray(floors, np.float32),
                        np.full(len(layers), np.inf, np.float32))
        spec = DriftSpec((2,), axis[[2]], cap, axis * 5.0, (2,), 1.0, 5, None)
        return [(r["variant"], r["turn"], r["answer"], r["proj"], r["user_proj"]) for r in
                run_drift(model, scripts, spec, progress=False)]

    two = run((2, 2), [0.5, -0.5])
    assert two == run((2,), [0.5])
    assert two != run((2,), [-0.5])
