"""``jaxpersona serve``: per-request LoRA adapters, persona mixtures and the per-token persona readout, over
real HTTP against the embedded SmolLM2-135M (fp32, CPU), checked against the library: ``generate`` with the
same adapter / hook, and ``forward`` with a capture for the readout."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from serve_bank import contrast_bank

from jaxpersona import errors
from jaxpersona.compute.generate import generate
from jaxpersona.model.transformer import Capture, forward

NAME = "smollm2-test"
LAYER = 16
LAYER2 = 12
PROMPT = "Tell me about your day."


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(server, content: str = PROMPT, **kw) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 10,
            "logprobs": True, "return_tokens_as_token_ids": True, **kw}
    status, out = post(server.url + "/chat/completions", body)
    assert status == 200, out
    return out


def served(out: dict, i: int = 0) -> tuple[list[int], list[float]]:
    """(token ids, log-probs) of a choice."""
    content = out["choices"][i]["logprobs"]["content"]
    return [int(t["token"].removeprefix("token_id:")) for t in content], [t["logprob"] for t in content]


def prompt_ids(model, content: str = PROMPT) -> list[int]:
    ids, _ = model.tokens_and_role([{"role": "user", "content": content}], "assistant")
    return list(ids)


def library(model, n: int, *, adapter=None, hook=None, content: str = PROMPT) -> tuple[list[int], list[float]]:
    """Greedy decoding by the library (``generate``), same adapter and hook: (tokens, log-probs) up to EOS."""
    ids = prompt_ids(model, content)
    out = generate(model.params, model.cfg, [ids], max_new_tokens=n, hook=hook, adapter=adapter,
                   eos_ids=tuple(model.eos_ids))
    k = int(out.lengths[0])
    return np.asarray(out.tokens[0, :k]).tolist(), np.asarray(out.logprobs[0, :k]).tolist()


# --- fixtures -----------------------------------------------------------------------------------------------
def make_adapter(cfg, seed: int):
    from jaxpersona.model.lora import Adapter, LoraConfig, init_adapter

    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    ad = init_adapter(cfg, lcfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 100), len(ad.b))
    b = {t: jax.random.normal(k, x.shape) * 0.1 for (t, x), k in zip(ad.b.items(), keys)}
    return Adapter(ad.a, b, ad.scale), lcfg


@pytest.fixture(scope="module")
def adapter_dirs(smollm2, tmp_path_factory):
    """Adapter "a" written as a peft directory, "b" as jaxpersona's Orbax checkpoint; both as loaded back."""
    from jaxpersona.artifacts.adapters import save_adapter
    from jaxpersona.artifacts.peft import load_any_adapter, save_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    a, lcfg_a = make_adapter(smollm2.cfg, 1)
    b, lcfg_b = make_adapter(smollm2.cfg, 2)
    dir_a = save_peft_adapter(root / "peft_a", a, smollm2.cfg, lcfg_a)
    dir_b = save_adapter(root / "orbax_b", b, smollm2.cfg, lcfg_b)
    loaded = {name: load_any_adapter(d, smollm2.cfg)[0] for name, d in (("a", dir_a), ("b", dir_b))}
    return {"a": dir_a, "b": dir_b}, loaded


@pytest.fixture(scope="module")
def bank_dir(smollm2, tmp_path_factory):
    """A real contrast vector ("evil") and a second direction ("other"), both with residual norms."""
    return contrast_bank(smollm2, tmp_path_factory.mktemp("bank") / "vectors", NAME, layer=LAYER, roll=7,
                         other_norms=True)

@pytest.fixture(scope="module")
def server(smollm2, bank_dir, adapter_dirs):
    from jaxpersona.serve.app import PersonaServer
    from jaxpersona.serve.engine import EngineConfig
    from jaxpersona.serve.resources import build_resources

    dirs, _ = adapter_dirs
    res = build_resources(smollm2, [str(bank_dir)], [], NAME, 4, 4, adapters=[f"a={dirs['a']}", f"b={dirs['b']}"])
    srv = PersonaServer(smollm2, res, EngineConfig(batch=4, max_context=128, max_queue=64, prefill_rows=2)).start()
    yield srv
    srv.close()


STEER = {"kind": "steer", "vector": "evil", "layers": LAYER, "coeff": 4.0}
MIX = {"vectors": ["evil", "other"], "layers": [LAYER2, LAYER], "alpha": 6.0, "tau": 2.0}
MIX_FIXED = {"vectors": ["evil", "other"], "layers": LAYER, "alpha": 0.5, "weights": [0.8, 0.2], "units": "relative",
             "positions": "response"}


# --- adapters -------------------------------------------------------------------------------------------------
def test_adapter_requests_equal_the_library(server, smollm2, adapter_dirs, bank_dir):
    """``"model": "a"`` (peft), ``"adapter": "b"`` (Orbax, in extra_body) and a + steer give the greedy tokens and
    log-probs of the library's ``generate`` with that adapter (and hook); base stays the base."""
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.edit.interventions import Positions, steer

    _, ads = adapter_dirs
    n = 10
    base = served(chat(server, model=NAME))
    out_a = chat(server, model="a")
    assert out_a["model"] == "a"
    got_a = served(out_a)
    got_b = served(chat(server, extra_body={"adapter": "b"}))
    got_as = served(chat(server, model="a", interventions=[STEER]))
    assert len({tuple(base[0]), tuple(got_a[0]), tuple(got_b[0]), tuple(got_as[0])}) == 4  # each one changes tokens
    p = len(prompt_ids(smollm2))
    hook = steer(smollm2.cfg.n_resid, VectorBank.load(bank_dir).get("evil"), 4.0, LAYER,
                 Positions.all(np.ones((1, p), bool)))
    for got, ref in ((base, library(smollm2, n)), (got_a, library(smollm2, n, adapter=ads["a"])),
                     (got_b, library(smollm2, n, adapter=ads["b"])),
                     (got_as, library(smollm2, n, adapter=ads["a"], hook=hook))):
        assert got[0] == ref[0]
        np.testing.assert_allclose(got[1], ref[1], atol=1e-4)


def test_adapters_in_one_batch_give_what_each_gives_alone(server):
    """Base, a, b, a + steer and b + mixture at once (5 requests on 4 rows, joining mid-decode): the tokens of
    each alone, and its log-probs within 1e-4 — the bound of prompts prefilled side by side (``prefill_rows`` 2:
    whether two arrivals share a prefill call depends on timing; the decode batch itself is bit for bit)."""
    bodies = [{}, {"model": "a"}, {"adapter": "b"}, {"model": "a", "interventions": [STEER]},
              {"model": "b", "mixture": MIX, "max_tokens": 8}]
    alone = [served(chat(server, **kw)) for kw in bodies]
    joined = server.engine.stats["joined_running"]

    def send(i: int) -> tuple[list[int], list[float]]:
        time.sleep(0.1 * i)
        return served(chat(server, **bodies[i]))

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(send, range(len(bodies))))
    for (tok, lp), (tok1, lp1) in zip(together, alone, strict=True):
        assert tok == tok1
        np.testing.assert_allclose(lp, lp1, rtol=0, atol=1e-4)
    assert server.engine.stats["joined_running"] > joined


def test_models_lists_the_adapters(server, adapter_dirs):
    res = server.res
    assert res.describe()["adapters"] == ["a", "b"]
    assert res.adapter_index == {"a": 1, "b": 2} and len(res.adapter_stack) == 3
    assert res.adapters["a"]["kind"] == "peft" and res.adapters["b"]["kind"] == "orbax"
    assert res.adapters["a"]["rank"] == 4 and res.adapters["a"]["targets"] == ["q", "v", "down"]
    assert res.adapters["a"]["sha256"]
    with urllib.request.urlopen(server.url + "/models") as r:
        models = json.loads(r.read())
    ids = [m["id"] for m in models["data"]]
    assert ids[0] == NAME and {"a", "b"} <= set(ids)
    assert models["data"][0]["jaxpersona"]["adapters"] == ["a", "b"]


def test_adapter_start_up_errors(smollm2, adapter_dirs, tmp_path):
    from jaxpersona.artifacts.adapters import save_adapter
    from jaxpersona.model.config import from_hf_config
    from jaxpersona.serve.resources import build_resources

    dirs, _ = adapter_dirs
    with pytest.raises(errors.InputError, match="NAME=DIR"):
        build_resources(smollm2, [], [], NAME, 4, 4, adapters=[str(dirs["a"])])
    with pytest.raises(errors.InputError, match="twice"):
        build_resources(smollm2, [], [], NAME, 4, 4, adapters=[f"a={dirs['a']}", f"a={dirs['b']}"])
    with pytest.raises(errors.InputError, match="served model"):
        build_resources(smollm2, [], [], NAME, 4, 4, adapters=[f"{NAME}={dirs['a']}"])
    with pytest.raises(errors.ModelNotFoundError):
        build_resources(smollm2, [], [], NAME, 4, 4, adapters=[f"x={tmp_path / 'missing'}"])
    tiny = from_hf_config({"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                           "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
                           "rope_theta": 10000.0, "tie_word_embeddings": True})
    other, lcfg = make_adapter(tiny, 3)
    save_adapter(tmp_path / "other", other, tiny, lcfg)
    with pytest.raises(errors.AdapterMismatchError):
        build_resources(smollm2, [], [], NAME, 4, 4, adapters=[f"x={tmp_path / 'other'}"])


# --- mixtures -------------------------------------------------------------------------------------------------
def test_mixtures_equal_the_library(server, smollm2, bank_dir):
    """A context-conditional mixture on two layers (each with its own layer's directions) and a fixed mix in
    relative units at response positions give ``generate`` under the library's ``mixture(...)`` hooks."""
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.edit.interventions import Chain, Positions, mixture

    bank = VectorBank.load(bank_dir)
    vecs = np.stack([bank.get("evil"), bank.get("other")])  # [2, N, D]
    n_resid, n = smollm2.cfg.n_resid, 10
    p = len(prompt_ids(smollm2))
    valid = np.ones((1, p), bool)
    plain = served(chat(server))
    got = served(chat(server, mixture=MIX))
    assert got[0] != plain[0]  # the mixture changes the answer
    hook = Chain(tuple(mixture(n_resid, vecs[:, l], [l], Positions.all(valid), alpha=6.0, tau=2.0)
                       for l in (LAYER2, LAYER)))
    ref = library(smollm2, n, hook=hook)
    assert got[0] == ref[0]
    np.testing.assert_allclose(got[1], ref[1], atol=1e-4)

    got = served(chat(server, extra_body={"mixture": MIX_FIXED}))
    assert got[0] != plain[0]
    norms = np.asarray(bank.meta_of("evil")["resid_norm"], np.float32)
    rel = vecs / np.linalg.norm(vecs, axis=-1, keepdims=True) * norms[None, :, None]
    hook = mixture(n_resid, rel[:, LAYER], [LAYER], Positions.response(valid), alpha=0.5, weights=[0.8, 0.2])
    ref = library(smollm2, n, hook=hook)
    assert got[0] == ref[0]
    np.testing.assert_allclose(got[1], ref[1], atol=1e-4)


# --- the per-token readout ------------------------------------------------------------------------------------
def stream(server, body: dict) -> list[dict]:
    req = urllib.request.Request(server.url + "/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({**body, "stream": True}).encode())
    chunks = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_per_token_readout_equals_the_captured_residuals(server, smollm2, bank_dir, adapter_dirs):
    """Under adapter "a": ``per_token`` = the library's captured resid[LAYER] of each generated token projected on
    the unit direction; its mean is ``mean_projection``; streamed, the chunks' ``persona_projection`` lists put
    together are ``per_token``, each chunk carrying the tokens whose text it carries."""
    from jaxpersona.artifacts.bank import VectorBank

    _, ads = adapter_dirs
    out = chat(server, model="a", max_tokens=12, persona_readout=["evil", {"vector": "other", "layer": LAYER2}])
    ro = out["choices"][0]["persona_readout"]
    toks, _ = served(out)
    per = ro["evil"]["per_token"]
    assert ro["evil"]["layer"] == LAYER and ro["evil"]["tokens"] == len(per) == len(toks) == 12
    assert len(ro["other"]["per_token"]) == 12
    assert sum(per) / len(per) == pytest.approx(ro["evil"]["mean_projection"], rel=1e-12, abs=1e-12)
    ids = prompt_ids(smollm2)
    seq = jnp.asarray([ids + toks], jnp.int32)
    h = forward(smollm2.params, smollm2.cfg, seq, capture=Capture((LAYER2, LAYER), "tokens"), logits=False,
                adapter=ads["a"]).captured[:, 0, len(ids):]
    bank = VectorBank.load(bank_dir)
    for name, layer, hl in (("evil", LAYER, h[1]), ("other", LAYER2, h[0])):
        v = bank.get(name)[layer]
        want = np.asarray(hl) @ (v / np.linalg.norm(v))
        np.testing.assert_allclose(ro[name]["per_token"], want, rtol=1e-3, atol=1e-2)
    plain = chat(server, max_tokens=12, persona_readout=["evil"])["choices"][0]["persona_readout"]["evil"]
    assert np.abs(np.subtract(plain["per_token"], per)).max() > 0.05  # the adapter moves the readout

    # streamed, with a stop string (text held back, then cut) and logprobs (a chunk per token)
    text = out["choices"][0]["message"]["content"]
    word = text.split()[3]
    body = {"model": "a", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 12,
            "persona_readout": ["evil", {"vector": "other", "layer": LAYER2}], "stop": [word], "logprobs": True}
    whole = post(server.url + "/chat/completions", body)[1]["choices"][0]
    chunks = stream(server, body)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert all(set(c["persona_projection"]) == {"evil", "other"} for c in choices[1:])
    got = [x for c in choices[1:] for x in c["persona_projection"]["evil"]]
    assert got == whole["persona_readout"]["evil"]["per_token"]
    assert len(got) == whole["persona_readout"]["evil"]["tokens"] < 12  # the stop string ended it early
    assert got == per[: len(got)]
    deltas = [c for c in choices[1:] if c["finish_reason"] is None]
    for c in deltas:  # a chunk carries projections exactly when it carries text
        assert bool(c["delta"]["content"]) == bool(c["persona_projection"]["evil"])
    last = choices[-1]
    assert last["finish_reason"] == "stop" and "per_token" not in last["persona_readout"]["evil"]
    assert last["persona_readout"]["evil"]["mean_projection"] == whole["persona_readout"]["evil"]["mean_projection"]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["message"]["content"]
    # no readout asked: no field
    assert all("persona_projection" not in c["choices"][0] for c in stream(server, {**body, "persona_readout": None})
               if c["choices"])


# --- bad requests ----------------------------------------------------------------------------------------------
BAD = [  # (extra fields, status, param, code or None)
    ({"model": "nope"}, 404, "model", "model_not_found"),
    ({"adapter": "nope"}, 404, "adapter", "model_not_found"),
    ({"extra_body": {"adapter": "zzz"}}, 404, "adapter", "model_not_found"),
    ({"model": "a", "adapter": "b"}, 400, "adapter", None),
    ({"model": "a", "adapter": NAME}, 400, "adapter", None),
    ({"adapter": 3}, 400, "adapter", None),
    ({"mixture": ["evil", "other"]}, 400, "mixture", None),
    ({"mixture": {**MIX, "vectors": ["evil"]}}, 400, "mixture.vectors", None),
    ({"mixture": {**MIX, "vectors": ["evil"] * 9}}, 400, "mixture.vectors", "too_many_vectors"),
    ({"mixture": {**MIX, "vectors": ["evil", "nope"]}}, 400, "mixture.vectors[1]", "unknown_vector"),
    ({"mixture": {**MIX, "vectors": ["evil", [0.1, 0.2]]}}, 400, "mixture.vectors[1]", "wrong_dimension"),
    ({"mixture": {**MIX, "vectors": ["evil", [0.0] * 576]}}, 400, "mixture.vectors[1]", None),
    ({"mixture": {**MIX, "tau": 0}}, 400, "mixture.tau", None),
    ({"mixture": {**MIX, "tau": "hot"}}, 400, "mixture.tau", None),
    ({"mixture": {k: v for k, v in MIX.items() if k != "alpha"}}, 400, "mixture.alpha", None),
    ({"mixture": {**MIX, "layers": 99}}, 400, "mixture.layers", "layer_out_of_range"),
    ({"mixture": {**MIX, "weights": [1.0]}}, 400, "mixture.weights", None),
    ({"mixture": {**MIX, "weights": [1.0, -0.5]}}, 400, "mixture.weights[1]", None),
    ({"mixture": {**MIX, "positions": "middle"}}, 400, "mixture.positions", None),
    ({"mixture": {**MIX, "units": "relative", "vectors": ["evil", [0.1] * 576]}}, 400, "mixture.units", None),
    ({"mixture": {**MIX, "units": "percent"}}, 400, "mixture.units", None),
    ({"mixture": {**MIX, "alhpa": 1.0}}, 400, "mixture.alhpa", None),
]


def test_bad_adapter_and_mixture_requests(server):
    for extra, status, param, code in BAD:
        got, out = post(server.url + "/chat/completions",
                        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra})
        assert got == status, (extra, out)
        err = out["error"]
        assert err["param"] == param, (extra, err)
        if code:
            assert err["code"] == code, (extra, err)
        if status == 404:
            assert "'a'" in err["message"] and "'b'" in err["message"] and NAME in err["message"]
    assert chat(server, model="b", max_tokens=2)["usage"]["completion_tokens"] == 2  # still serving
