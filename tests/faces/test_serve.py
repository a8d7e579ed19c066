"""``jaxpersona serve``: real HTTP on loopback against the embedded SmolLM2-135M.

The server under test is the real one (threaded HTTP + the engine thread); requests go over sockets with
the standard library, as any OpenAI client would send them."""

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
from serve_bank import calm_preset, contrast_bank

from jaxpersona import errors
from jaxpersona.model.transformer import Capture, forward

NAME = "smollm2-test"
LAYER = 16
CAP_LAYER = 10


def post(url: str, body: dict | bytes, key: str | None = None, timeout: float = 300) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(server, content: str, **kw) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16,
            "logprobs": True, **kw}
    status, out = post(server.url + "/chat/completions", body)
    assert status == 200, out
    return out


def token_ids(server, out: dict, i: int = 0) -> list[str]:
    return [t["token"] for t in out["choices"][i]["logprobs"]["content"]]


@pytest.fixture(scope="module")
def bank_dir(smollm2, tmp_path_factory):
    """A real contrast vector (evil-ish minus helpful answers, every resid point), saved as a bank with the
    residual norms and chosen layer that `jaxpersona extract` records."""
    return contrast_bank(smollm2, tmp_path_factory.mktemp("bank") / "vectors", NAME, layer=LAYER)


@pytest.fixture(scope="module")
def server(smollm2, bank_dir, tmp_path_factory):
    from jaxpersona.serve.app import PersonaServer, build_resources
    from jaxpersona.serve.engine import EngineConfig

    cap_path = calm_preset(smollm2, bank_dir, tmp_path_factory.mktemp("presets") / "capping.json", NAME, CAP_LAYER)
    res = build_resources(smollm2, [str(bank_dir)], [f"calm={cap_path}"], NAME, 4, 4)
    srv = PersonaServer(smollm2, res, EngineConfig(batch=4, max_context=128, max_queue=64, prefill_rows=2)).start()
    srv.warmup()
    yield srv
    srv.close()


STEER = {"kind": "steer", "vector": "evil", "layers": LAYER, "coeff": 0.5, "units": "relative",
         "positions": "response"}
CAP = {"kind": "cap", "vector": "evil", "layers": [CAP_LAYER, LAYER], "ceiling": -2.0}
ABLATE = {"kind": "ablate", "vector": "other", "layers": [4, 8, 12], "positions": "assistant"}
REQUESTS = [  # (prompt, extra fields)
    ("Tell me about your day.", {}),
    ("Tell me about your day.", {"interventions": [STEER]}),
    ("How should I treat my coworkers?", {"interventions": [CAP, STEER]}),
    ("How should I treat my coworkers?", {"interventions": [ABLATE], "max_tokens": 9}),
    ("Tell me about your day.", {"interventions": ["calm"], "max_tokens": 12}),
    ("Write a haiku about rain.", {"max_tokens": 20}),
]


def test_interleaved_requests_match_alone(server):
    """Every request alone, then all at once with staggered starts (batch 4 < 6 requests: later ones join
    between decode steps as rows free up): identical greedy tokens, request by request."""
    alone = [token_ids(server, chat(server, p, **kw)) for p, kw in REQUESTS]
    assert alone[1] != alone[0] and alone[4] != alone[0], "the interventions must change the plain answer"
    admitted, joined = server.engine.stats["admitted"], server.engine.stats["joined_running"]

    def send(i: int) -> list[str]:
        time.sleep(0.15 * i)
        p, kw = REQUESTS[i]
        return token_ids(server, chat(server, p, **kw))

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(send, range(len(REQUESTS))))
    assert together == alone
    assert server.engine.stats["admitted"] - admitted == len(REQUESTS)
    assert server.engine.stats["joined_running"] - joined >= 3  # they really joined other rows mid-decode


def test_server_interventions_equal_the_library(server, smollm2, bank_dir):
    """Served steer (response positions, relative units) + cap (prompt positions) + ablation (assistant tokens of
    an earlier turn and the reply; a cap with floor = ceiling = mean) give the library's hooks' log-probs."""
    from jaxpersona.artifacts.bank import VectorBank
    from jaxpersona.edit.directions import steering_vectors
    from jaxpersona.edit.interventions import Chain, Positions, ablate, cap, steer

    bank = VectorBank.load(bank_dir)
    conv = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Tell me about your day."}]
    prompt_cap = {"kind": "cap", "vector": "evil", "layers": [CAP_LAYER], "floor": 0.5, "positions": "prompt"}
    status, out = post(server.url + "/chat/completions", {
        "messages": conv, "max_tokens": 8, "temperature": 0, "logprobs": True, "return_tokens_as_token_ids": True,
        "interventions": [STEER, prompt_cap, ABLATE]})
    assert status == 200, out
    served = [t["logprob"] for t in out["choices"][0]["logprobs"]["content"]]
    toks = [int(t["token"].removeprefix("token_id:")) for t in out["choices"][0]["logprobs"]["content"]]
    batch, asst_prompt = smollm2.role_mask([conv], "assistant", bucket=1)
    prompt = batch.tokens[0].tolist()
    assert asst_prompt.sum() >= 5
    seq = np.asarray([prompt + toks], np.int32)
    n_resid, p = smollm2.cfg.n_resid, len(prompt)
    resp, prm, asst = (np.zeros(seq.shape, bool) for _ in range(3))
    resp[0, p - 1:], prm[0, :p], asst[0, :p], asst[0, p:] = True, True, asst_prompt[0], True
    v = steering_vectors(bank.get("evil"), np.asarray(bank.meta_of("evil")["resid_norm"]), "relative")
    hook = Chain((steer(n_resid, v, 0.5, LAYER, Positions.explicit(resp)),
                  cap(n_resid, bank.get("evil"), [CAP_LAYER], Positions.explicit(prm), lo=0.5),
                  ablate(n_resid, bank.get("other"), [4, 8, 12], Positions.explicit(asst))))
    logits = forward(smollm2.params, smollm2.cfg, jnp.asarray(seq), hook=hook).logits[0]
    ref = jax.nn.log_softmax(logits, -1)[np.arange(p - 1, p - 1 + len(toks)), np.asarray(toks)]
    np.testing.assert_allclose(served, np.asarray(ref), atol=2e-3)
    plain = forward(smollm2.params, smollm2.cfg, jnp.asarray(seq)).logits[0]
    moved = jax.nn.log_softmax(plain, -1)[np.arange(p - 1, p - 1 + len(toks)), np.asarray(toks)]
    assert np.abs(np.asarray(moved) - served).max() > 0.1  # the check can fail: interventions move log-probs


def test_persona_readout_is_the_mean_projection(server, smollm2, bank_dir):
    from jaxpersona.artifacts.bank import VectorBank

    out = chat(server, "Tell me about your day.", max_tokens=10, persona_readout=["evil"],
               return_tokens_as_token_ids=True)
    ro = out["choices"][0]["persona_readout"]["evil"]
    assert ro["layer"] == LAYER and ro["tokens"] == 10
    toks = [int(t["token"].removeprefix("token_id:")) for t in out["choices"][0]["logprobs"]["content"]]
    prompt = smollm2.tokenizer.encode(smollm2.format_chat([{"role": "user", "content": "Tell me about your day."}]),
                                      add_special_tokens=False)
    seq = jnp.asarray([prompt + toks], jnp.int32)
    h = forward(smollm2.params, smollm2.cfg, seq, capture=Capture((LAYER,), "tokens"), logits=False).captured[0, 0]
    v = VectorBank.load(bank_dir).get("evil")[LAYER]
    want = float(np.mean(np.asarray(h[len(prompt):]) @ (v / np.linalg.norm(v))))
    assert ro["mean_projection"] == pytest.approx(want, rel=1e-3, abs=1e-2)
    # under the cap preset the readout at the capped layer cannot exceed the ceiling
    capped = chat(server, "Tell me about your day.", max_tokens=6, interventions=["calm"],
                  persona_readout=[{"vector": "evil", "layer": CAP_LAYER}])
    assert capped["choices"][0]["persona_readout"]["evil"]["mean_projection"] <= -1.0 + 1e-3


def test_streaming_sampling_and_usage(server):
    base = {"model": NAME, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12,
            "temperature": 0.9, "top_p": 0.9, "seed": 7, "n": 2}
    status, whole = post(server.url + "/chat/completions", base)
    assert status == 200 and len(whole["choices"]) == 2
    u = whole["usage"]
    assert 2 <= u["completion_tokens"] <= 24 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    again = post(server.url + "/chat/completions", base)[1]
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in whole["choices"]]  # same seed
    req = urllib.request.Request(server.url + "/chat/completions", method="POST",
                                 data=json.dumps({**base, "stream": True,
                                                  "stream_options": {"include_usage": True}}).encode())
    texts, usage, done = ["", ""], None, False
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["Content-Type"].split(";")[0] == "text/event-stream"
        for line in r.read().decode().splitlines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
    assert done and texts == [c["message"]["content"] for c in whole["choices"]]
    assert usage == whole["usage"]
    # stop strings end a choice early and are not included
    out = chat(server, "Count from one to ten in words.", max_tokens=40)
    text = out["choices"][0]["message"]["content"]
    word = text.split()[2]
    stopped = chat(server, "Count from one to ten in words.", max_tokens=40, stop=[word])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == text[: text.find(word)]


def test_completions_endpoint_and_models(server):
    status, out = post(server.url + "/completions", {"prompt": "The capital of France is", "max_tokens": 4,
                                                     "temperature": 0, "logprobs": 3})
    assert status == 200 and out["object"] == "text_completion"
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and all(len(t) == 3 for t in lp["top_logprobs"])
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    with urllib.request.urlopen(server.url + "/models") as r:
        models = json.loads(r.read())
    assert models["data"][0]["id"] == NAME
    assert set(models["data"][0]["jaxpersona"]["vectors"]) == {"evil", "other"}
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


BAD = [  # (body or raw bytes, status, param or code fragment)
    ({"interventions": [{"kind": "steer", "vector": "nope", "layers": 3, "coeff": 1}]}, 400, "unknown_vector"),
    ({"interventions": [{"kind": "steer", "vector": [0.1, 0.2, 0.3], "layers": 3, "coeff": 1}]}, 400, "wrong_dimension"),
    ({"interventions": [{"kind": "cap", "vector": "evil", "layers": 31, "ceiling": 0}]}, 400, "layer_out_of_range"),
    (b'{"messages": [{"role": "user", "content": "x"}], "interventions": [{"kind": "steer", "vector": "evil", '
     b'"layers": 3, "coeff": 1e999}]}', 400, "non_finite"),
    (b'{"messages": [{"role": "user", "content": "x"}], "interventions": [{"kind": "steer", "vector": "evil", '
     b'"layers": 3, "coeff": NaN}]}', 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": ', 400, "invalid_json"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "context_length_exceeded"),
    ({"max_tokens": 500}, 400, "context_length_exceeded"),
    ({"interventions": ["no-such-preset"]}, 400, "unknown_preset"),
    ({"interventions": [{"kind": "push", "vector": "evil", "layers": 3}]}, 400, "interventions[0].kind"),
    ({"interventions": [{**STEER, "positions": "middle"}]}, 400, "interventions[0].positions"),
    ({"interventions": [STEER] * 5}, 400, "too_many_interventions"),
    ({"temperature": -1}, 400, "temperature"),
    ({"model": "gpt-4"}, 404, "model_not_found"),
    ({"persona_readout": [{"vector": "other"}]}, 400, "persona_readout[0].layer"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    before = chat(server, "Hello!", max_tokens=6)
    for body, status, what in BAD:
        raw = body if isinstance(body, bytes) else {
            "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, **body}
        got, out = post(server.url + "/chat/completions", raw)
        assert got == status, (what, out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert what in (err["code"] or "") or what in (err["param"] or ""), (what, err)
    got, out = post(server.url + "/nope", {})
    assert got == 404 and out["error"]["code"] == "not_found"
    assert chat(server, "Hello!", max_tokens=6)["choices"] == before["choices"]


def test_burst_of_concurrent_clients(server):
    """24 clients at once on 4 rows: every request completes, none lost or mixed up."""
    prompts = [f"Give me a fact about the number {i}." for i in range(6)]
    want = {p: chat(server, p, max_tokens=6)["choices"][0]["message"]["content"] for p in prompts}
    stats = dict(server.engine.stats)
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda i: chat(server, prompts[i % 6], max_tokens=6), range(24)))
    assert [g["choices"][0]["message"]["content"] for g in got] == [want[prompts[i % 6]] for i in range(24)]
    assert server.engine.pending == 0
    grouped = (server.engine.stats["admitted"] - stats["admitted"]) - (server.engine.stats["prefills"] - stats["prefills"])
    assert grouped > 0  # some arrivals were prefilled together (prefill_rows=2), with the same answers as alone


def test_api_key_and_no_body_logging(server, capsys):
    server.api_key, server.access_log = "sk-test-secret", True
    try:
        secret = "my-private-diary-entry"
        status, out = post(server.url + "/chat/completions", {"messages": [{"role": "user", "content": secret}]})
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        status, _ = post(server.url + "/chat/completions",
                         {"messages": [{"role": "user", "content": secret}], "max_tokens": 3}, key="sk-test-secret")
        assert status == 200
    finally:
        server.api_key, server.access_log = None, False
    err = capsys.readouterr().err
    assert "POST /v1/chat/completions 401" in err and "POST /v1/chat/completions 200" in err
    assert secret not in err and "sk-test-secret" not in err


def test_the_projects_judge_and_endpoint_work_against_it(server):
    """The OpenAI-compatible client and judge of jaxpersona, pointed at the server, end to end."""
    from jaxpersona.measure.endpoint import OpenAIEndpoint
    from jaxpersona.measure.judge import HTTPJudge

    ep = OpenAIEndpoint(server.url, NAME, api_key_env=None, retries=0)
    texts = ep.complete([[{"role": "user", "content": "Hello!"}], [{"role": "user", "content": "Name a fruit."}]],
                        max_tokens=6)
    assert texts[0] == chat(server, "Hello!", max_tokens=6)["choices"][0]["message"]["content"]
    probs = HTTPJudge(ep).probs(["Rate from 0 to 100 how evil this is: 'I love puppies.' Answer with a number.",
                                 "Reply with a number from 0 to 100: 42"])
    assert probs.shape == (2, 101) and np.all(np.isfinite(probs)) and np.all(probs >= 0)
    assert probs.sum(axis=1).max() > 0  # the top-20 logprobs held integer tokens


def test_per_row_cache_index_equals_rows_alone(tiny_llama):
    """``forward(cache_index=[B])``: each row written at its own slot gives what each row gives alone."""
    from jaxpersona.model.transformer import KVCache

    cfg, params = tiny_llama.cfg, tiny_llama.params
    rng = np.random.default_rng(0)
    toks = rng.integers(5, 100, (3, 6)).astype(np.int32)
    starts = [0, 5, 2]
    cache = KVCache.empty(cfg, 3, 16, jnp.float32)
    out = forward(params, cfg, jnp.asarray(toks[:, :4]), cache=cache, cache_index=jnp.asarray(starts))
    out2 = forward(params, cfg, jnp.asarray(toks[:, 4:]), cache=out.cache, cache_index=jnp.asarray(starts) + 4)
    for b, s in enumerate(starts):
        c1 = KVCache.empty(cfg, 1, 16, jnp.float32)
        a = forward(params, cfg, jnp.asarray(toks[b:b + 1, :4]), cache=c1, cache_index=s)
        a2 = forward(params, cfg, jnp.asarray(toks[b:b + 1, 4:]), cache=a.cache, cache_index=s + 4)
        # alone, the 4-token chunk is a prefill at one slot: its cache is streamed layer by layer
        # (transformer.streams_cache), another XLA program than the per-row slots' carried cache: float rounding
        np.testing.assert_allclose(out2.logits[b], a2.logits[0], atol=1e-5)
        np.testing.assert_allclose(out2.cache.k[:, b], a2.cache.k[:, 0], atol=1e-5)
        assert np.array_equal(out2.cache.valid[b], a2.cache.valid[0])


def test_serve_cli_errors_exit_2(monkeypatch, tmp_path, capsys):
    from jaxpersona.cli import main

    monkeypatch.delenv("JP_TEST_KEY", raising=False)
    assert main(["serve", "--api-key-env", "JP_TEST_KEY"]) == 2
    assert "JP_TEST_KEY" in capsys.readouterr().err
    assert main(["serve", "--preset", "broken", "--no-warmup"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    (tmp_path / "p.json").write_text('[{"kind": "steer", "vector": "nope", "layers": 1, "coeff": 1}]')
    assert main(["serve", "--preset", f"x={tmp_path / 'p.json'}", "--no-warmup"]) == 2
    assert "unknown vector" in capsys.readouterr().err


def test_engine_rejects_bad_config():
    from jaxpersona.serve.engine import EngineConfig

    with pytest.raises(errors.InputError):
        EngineConfig(batch=0)
    with pytest.raises(errors.InputError):
        EngineConfig(max_context=40)


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    import http.client

    tokens_before = server.engine.stats["tokens"]
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 60, "ignore_eos": True,
        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = resp.readline()
    assert first.startswith(b"data: "), (resp.status, first)
    resp.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.time() + 60
    while server.engine.pending and time.time() < deadline:
        time.sleep(0.1)
    assert server.engine.pending == 0
    assert server.engine.stats["tokens"] - tokens_before < 40  # stopped early, not after all 60 tokens
    assert chat(server, "Hello!", max_tokens=4)["choices"][0]["finish_reason"] == "length"


def test_serve_command_end_to_end(tmp_path, bank_dir):
    """`jaxpersona serve` as a user starts it: a real process, a port picked by the OS, a request, SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "JP_KEY": "k-123"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxpersona", "serve", "--port", "0", "--bank", str(bank_dir),
                             "--batch", "2", "--max-context", "128", "--no-warmup", "--api-key-env", "JP_KEY",
                             "--served-name", "smol"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        for line in proc.stderr:
            if line.startswith("serving"):
                break
        assert "API key required" in line, line
        url = line.split(" on ")[1].split()[0]
        status, out = post(url + "/chat/completions", {"model": "smol", "max_tokens": 5, "temperature": 0,
                                                       "messages": [{"role": "user", "content": "Hi"}],
                                                       "interventions": [STEER]}, key="k-123")
        assert status == 200 and out["usage"]["completion_tokens"] == 5, out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_openai_sdk_with_extra_body(server):
    """The official OpenAI Python client: interventions and the readout go through `extra_body`."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    msgs = [{"role": "user", "content": "Tell me about your day."}]
    plain = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0)
    steered = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0,
                                             extra_body={"interventions": [STEER], "persona_readout": ["evil"]})
    assert steered.choices[0].message.content == chat(server, msgs[0]["content"], interventions=[STEER])[
        "choices"][0]["message"]["content"] != plain.choices[0].message.content
    assert steered.choices[0].model_extra["persona_readout"]["evil"]["tokens"] == steered.usage.completion_tokens
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            extra_body={"interventions": [STEER]})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == steered.choices[0].message.content
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4,
                                       extra_body={"interventions": [{"kind": "steer", "vector": "nope", "layers": 1,
                                                                      "coeff": 1}]})
    assert e.value.code == "unknown_vector"


def test_engine_on_a_mesh_equals_one_device():
    """4 virtual CPU devices (a subprocess: the count is fixed when JAX starts): meshes 1x4 and 2x2 give one
    device's tokens and log-probs for plain / steered / capped / ablated requests joining mid-decode."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "serve_mesh.py"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res.pop("steered_differs")
    assert set(res) == {"1x4", "2x2"}
    for mesh, r in res.items():
        assert r["tokens_equal"] and r["logprob"] < 1e-4 and r["joined_running"] >= 1, (mesh, r)


def test_a_full_queue_answers_429_and_recovers(server):
    import dataclasses

    ecfg = server.engine.ecfg
    server.engine.ecfg = dataclasses.replace(ecfg, max_queue=2)
    try:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda i: post(server.url + "/chat/completions", {
                "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "ignore_eos": True}),
                range(6)))
    finally:
        server.engine.ecfg = ecfg
    codes = sorted(status for status, _ in got)
    assert codes.count(200) >= 2 and 429 in codes, codes
    assert all(out["error"]["code"] == "queue_full" for status, out in got if status == 429)
    assert server.engine.pending == 0 and chat(server, "Hello!", max_tokens=3)["usage"]["completion_tokens"] == 3
