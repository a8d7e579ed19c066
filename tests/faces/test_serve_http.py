"""The server's HTTP side under bad input and faults: fuzzed bodies on every endpoint, bodies that never
finish, clients that leave, bursts past the queue bound, request timeouts, shutdown while streaming,
keep-alive, request ids, ``/metrics`` and the OpenAPI document. Real sockets on loopback, the embedded
SmolLM2-135M behind them. A 5xx anywhere counts as a failure; afterwards the server must still give the
exact tokens it gave before, and no row may leak (the engine's pending count returns to zero)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NAME = "smollm2-http"
ECFG = dict(batch=4, max_context=128, max_queue=12, prefill_rows=2)


@pytest.fixture(scope="module")
def server(smollm2):
    from jaxpersona.serve.app import PersonaServer, ServerOptions, build_resources
    from jaxpersona.serve.engine import EngineConfig

    res = build_resources(smollm2, [], [], NAME, 4, 4)
    srv = PersonaServer(smollm2, res, EngineConfig(**ECFG), options=ServerOptions(read_timeout=1.5)).start()
    srv.warmup()
    yield srv
    srv.close()


def hostport(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    return host, int(port)


def reference(client: httpx.Client, server) -> list:
    r = client.post(server.url + "/chat/completions", json={
        "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8, "temperature": 0,
        "logprobs": True})
    assert r.status_code == 200, r.text
    return [(t["token"], t["logprob"]) for t in r.json()["choices"][0]["logprobs"]["content"]]


def settle(server, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while server.engine.pending and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.pending == 0, server.engine.busy()
    assert server.engine.busy()["running"] == 0


# --- fuzz -----------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.just(0), st.just(-1),
                    st.just(10**30), st.just(1e-300), st.text(max_size=5), st.none(), st.booleans(), JSON)
MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "", 3]),
                                    "content": st.one_of(st.text(max_size=40), JSON)}), max_size=3),
    JSON)
SHAPED = st.fixed_dictionaries(
    {"messages": MESSAGES, "prompt": st.one_of(st.text(max_size=40), JSON),
     "max_tokens": st.one_of(st.integers(1, 3), NUMBERS)},
    optional={"temperature": NUMBERS, "top_p": NUMBERS, "n": st.one_of(st.integers(1, 3), NUMBERS),
              "seed": NUMBERS, "stream": st.one_of(st.booleans(), JSON), "logprobs": st.one_of(st.booleans(), NUMBERS),
              "top_logprobs": NUMBERS, "stop": JSON, "model": st.one_of(st.just(NAME), JSON),
              "interventions": JSON, "persona_readout": JSON, "mixture": JSON, "adapter": JSON,
              "stream_options": JSON, "ignore_eos": JSON, "an_unknown_field": JSON, "extra_body": JSON})
ENDPOINTS = ["/v1/chat/completions", "/v1/completions"]


def _bounded(body):
    """Keep valid requests cheap: an integer max_tokens above 3 is capped (n as well)."""
    if isinstance(body, dict):
        for key, most in (("max_tokens", 3), ("n", 3)):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > most:
                body[key] = most
    return body


SENT: list[int] = []


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(body=st.one_of(SHAPED, JSON), endpoint=st.sampled_from(ENDPOINTS))
def _fuzz_one(client, server, body, endpoint):
    raw = json.dumps(_bounded(body), allow_nan=True)
    r = client.post(server.url.removesuffix("/v1") + endpoint, content=raw,
                    headers={"Content-Type": "application/json"})
    SENT.append(r.status_code)
    assert r.status_code < 500, (r.status_code, r.text[:300], raw[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif '"stream": true' not in raw:
        r.json()


NASTY = [  # (endpoint, raw bytes, content type)
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, "application/json"),
    ("/v1/chat/completions", b'{"a":' * 5000 + b"1" + b"}" * 5000, "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
     "application/json"),
    ("/v1/completions", b'{"prompt": "ab\\udfffcd", "max_tokens": 2}', "application/json"),
    ("/v1/completions", b'{"prompt": ["ok", "\\ud800\\ud800"], "max_tokens": 2}', "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
     "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 400 + b"}",
     "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
     "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}",
     "application/json"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 3_000_000}]}).encode(),
     "application/json"),
    ("/v1/completions", json.dumps({"prompt": "word " * 200_000, "max_tokens": 2}).encode(), "application/json"),
    ("/v1/chat/completions", b"", "application/json"),
    ("/v1/chat/completions", b"messages=hi", "application/x-www-form-urlencoded"),
    ("/v1/chat/completions", b"\xff\xfe\x00garbage", "text/plain"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "multipart/form-data; boundary=x"),
    ("/v1/chat/completions", b"null", "application/json"),
    ("/v1/chat/completions", b'"\\ud800"', "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "interventions": [{"kind": "steer", '
                             b'"vector": [1e308, 1e308], "layers": 1, "coeff": 1e308}]}', "application/json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "interventions": [{"kind": "steer", '
                             b'"vector": "x", "layers": 1, "coeff": 1e300}]}', "application/json"),
]
FINE = (b'{"messages": [{"role": "user", "content": "hi"}], "unknown": {"deep": [1, 2]}, "max_tokens": 2}')


def test_fuzzed_bodies_all_get_answers_and_the_server_keeps_serving(server):
    """Generated bodies (wrong types, huge and tiny numbers, NaN/Infinity, unknown fields, nested junk) on
    both completion endpoints, then hand-made nasty ones (deep nesting, lone surrogates in chat messages and
    completion prompts, 1e400, 400-digit integers, giant strings, empty / non-JSON / wrong content type):
    every request gets an answer below 500, 4xx ones in OpenAI's error shape; the server then gives exactly
    the tokens it gave before, and nothing is left running."""
    with httpx.Client(timeout=120) as client:
        before = reference(client, server)
        SENT.clear()
        _fuzz_one(client, server)
        nasty = []
        for endpoint, raw, ctype in NASTY:
            r = client.post(server.url.removesuffix("/v1") + endpoint, content=raw, headers={"Content-Type": ctype})
            nasty.append(r.status_code)
            assert 400 <= r.status_code < 500, (endpoint, raw[:80], r.status_code, r.text[:300])
            assert r.json()["error"]["message"]
        assert client.post(server.url + "/chat/completions", content=FINE).status_code == 200  # unknown fields: ignored
        d = 576  # a d_model vector beyond float32's range is refused, not turned into infinities
        r = client.post(server.url + "/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "interventions": [{"kind": "steer", "vector": [1e300] * d, "layers": 1, "coeff": 1.0}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "non_finite"
        for path in ("/v1/models", "/health", "/metrics", "/openapi.json", "/nope", "/v1/chat/completions"):
            r = client.get(server.url.removesuffix("/v1") + path)
            assert r.status_code < 500 or path == "/health", (path, r.status_code)
        for method in ("PUT", "DELETE", "PATCH"):
            r = client.request(method, server.url + "/chat/completions", content=b"{}")
            assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        settle(server)
        assert reference(client, server) == before
    print(f"fuzz: {len(SENT)} generated requests ({sum(s == 200 for s in SENT)} answered 200, "
          f"{sum(400 <= s < 500 for s in SENT)} 4xx), {len(NASTY)} hand-made ones (all 4xx), 3 methods, 6 GETs")
    assert len(SENT) >= 100 and any(s == 200 for s in SENT) and any(s >= 400 for s in SENT)


# --- bodies that do not arrive, clients that leave --------------------------------------------------------
def test_a_body_shorter_than_its_content_length_gets_408(server):
    host, port = hostport(server)
    for partial in (b'{"messages": [', b""):
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 400\r\n\r\n" + partial)
            t = time.time()
            head = s.recv(4096)
            waited = time.time() - t
            while b"\r\n\r\n" not in head or len(head.partition(b"\r\n\r\n")[2]) < int(
                    head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
                more = s.recv(4096)  # the head and the body may come in separate packets
                if not more:
                    break
                head += more
        assert head.startswith(b"HTTP/1.1 408"), head[:200]
        assert b"request_timeout" in head and 1.0 < waited < 10, waited
    with httpx.Client(timeout=60) as client:  # a slow sender: a piece every 0.5 s, 4 s for the body in all
        def trickle():
            body = b'{"messages": [{"role": "user", "content": "hi"}]}'
            for i in range(0, len(body), 7):
                time.sleep(0.5)
                yield body[i:i + 7]
        r = client.post(server.url + "/chat/completions", content=trickle())
        assert r.status_code == 408
    settle(server)


def test_a_non_streamed_client_that_leaves_is_cancelled(server):
    host, port = hostport(server)
    tokens_before = server.engine.stats["tokens"]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 60, "ignore_eos": True}),
        {"Content-Type": "application/json"})
    deadline = time.time() + 60
    while not server.engine.busy()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.busy()["running"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    settle(server)
    assert server.engine.stats["tokens"] - tokens_before < 40  # stopped early, not after all 60 tokens


def test_a_burst_past_the_queue_answers_429_with_retry_after(server):
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "ignore_eos": True, "n": 2}
    with httpx.Client(timeout=120) as client:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda _: client.post(server.url + "/chat/completions", json=body), range(16)))
        codes = sorted(r.status_code for r in got)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        for r in got:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "queue_full"
                assert 1 <= int(r.headers["Retry-After"]) <= 60
            else:
                assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
        settle(server)
        assert client.post(server.url + "/chat/completions", json=body).status_code == 200


def test_keep_alive_request_ids_and_openapi(server):
    host, port = hostport(server)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    socks = []
    for rid in ("my-trace-123", None):
        headers = {"Content-Type": "application/json", **({"x-request-id": rid} if rid else {})}
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}), headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and r.version == 11
        got = r.getheader("x-request-id")
        assert got == rid if rid else len(got) == 32
        socks.append(conn.sock)
    assert socks[0] is socks[1] and socks[0] is not None  # one TCP connection for both (HTTP/1.1 keep-alive)
    conn.close()
    with httpx.Client(timeout=30) as client:
        spec = client.get(server.url.removesuffix("/v1") + "/openapi.json").json()
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics"} <= set(spec["paths"])
        assert client.get(server.url + "/models", headers={"x-request-id": "bad id with spaces"}
                          ).headers["x-request-id"] != "bad id with spaces"


def test_metrics_count_what_was_served(server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(client) -> dict:
        text = client.get(server.url.removesuffix("/v1") + "/metrics").text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
        return out

    d = 576  # SmolLM2-135M's d_model
    with httpx.Client(timeout=120) as client:
        a = scrape(client)
        usage = []
        for i in range(3):
            body = {"messages": [{"role": "user", "content": f"Count to {i + 2}."}], "max_tokens": 3 + i,
                    "ignore_eos": True, "stop": ["#" * 64],  # holds the text back to the end: gaps count tokens
                    "interventions": [{"kind": "steer", "vector": [0.0] * d, "layers": 3, "coeff": 1.0}],
                    "persona_readout": [{"name": "x", "vector": [1.0] * d, "layer": 3}]}
            r = client.post(server.url + "/chat/completions", json=body)
            assert r.status_code == 200
            usage.append(r.json()["usage"])
        b = scrape(client)

    def diff(name, labels=()):
        return b.get((name, labels), 0) - a.get((name, labels), 0)

    assert diff("jaxpersona:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert diff("jaxpersona:generation_tokens_total") == sum(u["completion_tokens"] for u in usage) == 12
    assert diff("jaxpersona:time_to_first_token_seconds_count") == 3
    assert diff("jaxpersona:e2e_request_latency_seconds_count") == 3
    assert diff("jaxpersona:inter_token_latency_seconds_count") == 12 - 3
    assert diff("jaxpersona:interventions_total", (("kind", "steer"),)) == 3
    assert diff("jaxpersona:interventions_total", (("kind", "readout"),)) == 3
    assert diff("jaxpersona:adapter_requests_total", (("adapter", "none"),)) == 3
    assert diff("jaxpersona:request_success_total", (("finished_reason", "length"),)) == 3
    for gauge in ("jaxpersona:num_requests_running", "jaxpersona:num_requests_waiting",
                  "jaxpersona:kv_cache_usage_perc", "jaxpersona:prefix_cache_queries_total",
                  "jaxpersona:prefix_cache_hits_total"):
        assert (gauge, ()) in b, gauge
    assert b[("jaxpersona:num_requests_running", ())] == 0


# --- timeouts and shutdown (a second server on the same compiled programs) --------------------------------
def test_request_timeout_and_a_graceful_shutdown_while_streaming(smollm2, server):
    from jaxpersona.serve.app import PersonaServer, ServerOptions, build_resources
    from jaxpersona.serve.engine import EngineConfig

    res = build_resources(smollm2, [], [], NAME, 4, 4)
    srv = PersonaServer(smollm2, res, EngineConfig(**ECFG),
                        options=ServerOptions(request_timeout=0.5, graceful_seconds=20)).start()
    long = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 60, "ignore_eos": True}
    try:
        with httpx.Client(timeout=60) as client:
            t = time.time()
            r = client.post(srv.url + "/chat/completions", json=long)
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
            assert time.time() - t < 30
            with client.stream("POST", srv.url + "/chat/completions", json={**long, "stream": True}) as s:
                lines = [ln for ln in s.iter_lines() if ln]
            assert lines[-1] == "data: [DONE]" and "request_timeout" in lines[-2]
        settle(srv)
    finally:
        srv.options.request_timeout = None
    # shutdown while two streams run: both finish (in-flight requests complete), nothing hangs
    short = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12, "ignore_eos": True,
             "stream": True}

    def stream_all() -> list[str]:
        with httpx.Client(timeout=120) as c, c.stream("POST", srv.url + "/chat/completions", json=short) as s:
            return [ln for ln in s.iter_lines() if ln]

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream_all) for _ in range(2)]
        deadline = time.time() + 60
        while srv.engine.busy()["running"] < 2 and time.time() < deadline:
            time.sleep(0.02)
        t = time.time()
        srv.close()
        closed_in = time.time() - t
        outs = [f.result(timeout=120) for f in futures]
    for lines in outs:
        assert lines[-1] == "data: [DONE]"
        assert any('"finish_reason": "length"' in ln for ln in lines), lines[-3:]
    assert srv.engine.pending == 0 and closed_in < 30
    with pytest.raises(httpx.ConnectError):
        httpx.post(srv.url + "/chat/completions", json=short, timeout=5)


def test_a_too_long_request_names_the_field_at_fault(server):
    with httpx.Client(timeout=60) as client:
        cases = [("/chat/completions", {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 2},
                  "messages"),
                 ("/completions", {"prompt": "word " * 300, "max_tokens": 2}, "prompt"),
                 ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 500},
                  "max_tokens")]
        for path, body, param in cases:
            r = client.post(server.url + path, json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param, err


def test_bad_server_options_are_refused():
    from jaxpersona import errors
    from jaxpersona.serve.app import ServerOptions

    for bad in (dict(request_timeout=0), dict(request_timeout=-1.0), dict(read_timeout=0),
                dict(max_connections=0), dict(graceful_seconds=float("nan"))):
        with pytest.raises(errors.InputError, match="serve: "):
            ServerOptions(**bad)
    assert ServerOptions(request_timeout=None).request_timeout is None
