"""The playground page (``GET /`` of ``jaxpersona serve``) in a real browser against a real server.

Debian's ``chromium`` driven by Playwright (the PyPI package; its own browser downloads are never used),
headless and offline: the page talks only to the server under test (embedded SmolLM2-135M, a small bank
with "evil" and "other", a cap preset "calm"). One pass through what a user does: pick a vector, move its
slider (the API panel's body follows at once), send two turns under panes A (steered) and B (plain) as two
concurrent streams, see per-token colours and the drift plot, then replay the API panel's body with the
official ``openai`` client (and run its Python snippet) and get pane A's text back.

Screenshots go to the test's ``tmp_path`` and, when ``JAXPERSONA_SCREENSHOTS`` names a directory, there too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from serve_bank import calm_preset, contrast_bank

NAME = "smollm2-test"
LAYER = 16
CAP_LAYER = 10
CHROMIUM = "/usr/bin/chromium"
EXTENSIONS = ("interventions", "persona_readout", "mixture")
FIRST, SECOND = "Tell me about your day.", "What will you do tomorrow?"


@pytest.fixture(scope="module")
def bank_dir(smollm2, tmp_path_factory):
    """The contrast vector of test_serve.py ("evil", with residual norms and a chosen layer) plus "other"."""
    return contrast_bank(smollm2, tmp_path_factory.mktemp("bank") / "vectors", NAME, layer=LAYER)


@pytest.fixture(scope="module")
def server(smollm2, bank_dir, tmp_path_factory):
    from jaxpersona.serve.app import PersonaServer, build_resources
    from jaxpersona.serve.engine import EngineConfig

    cap_path = calm_preset(smollm2, bank_dir, tmp_path_factory.mktemp("presets") / "capping.json", NAME, CAP_LAYER)
    res = build_resources(smollm2, [str(bank_dir)], [f"calm={cap_path}"], NAME, 4, 4)
    srv = PersonaServer(smollm2, res, EngineConfig(batch=4, max_context=256, max_queue=64, prefill_rows=2)).start()
    srv.warmup()
    yield srv
    srv.close()


@pytest.fixture
def browser():
    """Headless Debian chromium through Playwright; fails (never skips) when either is missing."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is not installed, and the playground test needs a real browser: install Debian's "
                    "package with `apt-get install chromium` (CI: .ci/run does this)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    out = os.environ.get("JAXPERSONA_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / name)


# page-side record of every token span added while its reply streams: (pane, time)
WATCH = """() => {
  window.__arrivals = [];
  for (const P of ["A", "B"]) {
    new MutationObserver(records => {
      for (const r of records) for (const n of r.addedNodes) {
        if (n.nodeType === 1 && n.classList.contains("tok") && n.closest(".streaming")) {
          window.__arrivals.push([P, performance.now()]);
        }
      }
    }).observe(document.getElementById("transcript-" + P), {childList: true, subtree: true});
  }
}"""
IDLE = ("n => document.querySelectorAll('#transcript-A .msg.assistant').length === n && "
        "document.querySelectorAll('.msg.assistant.streaming').length === 0 && !document.getElementById('send').disabled")


def api_body(page) -> dict:
    return json.loads(page.inner_text("#api-body"))


def replies(page, pane: str) -> list[str]:
    return page.eval_on_selector_all(f"#transcript-{pane} .msg.assistant .text", "ns => ns.map(n => n.textContent)")


def test_playground_in_chromium(server, browser, tmp_path):
    import openai

    root = server.url.removesuffix("/v1") + "/"
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    auth: list[str | None] = []
    page.on("request", lambda r: auth.append(r.headers.get("authorization")) if "/v1/chat" in r.url else None)
    page.goto(root)

    # the bank's vectors, from /v1/models, in pane A's searchable picker
    page.wait_for_selector("#settings-A .vector-list li[data-vector=evil]")
    page.fill("#api-key", "sk-only-in-memory")
    served = [m.id for m in openai.OpenAI(base_url=server.url, api_key="x").models.list().data]
    assert page.eval_on_selector_all("#settings-A .model option", "ns => ns.map(n => n.value)") == served  # + adapters
    page.fill("#settings-A .filter", "evi")
    assert page.eval_on_selector_all("#settings-A .vector-list li", "ns => ns.map(n => n.dataset.vector)") == ["evil"]
    page.click("#settings-A .vector-list li[data-vector=evil]")
    card = page.locator("#settings-A .card[data-vector=evil]")
    assert api_body(page)["interventions"][0]["coeff"] == 0

    # moving the slider changes the API panel's body at once
    slider = card.locator("input.coeff")
    slider.focus()
    for _ in range(3):
        slider.press("ArrowRight")
    value = float(slider.input_value())
    assert value == pytest.approx(0.15)
    steer = api_body(page)["interventions"][0]
    assert steer == {"kind": "steer", "vector": "evil", "layers": steer["layers"], "coeff": value, "units": "relative",
                     "positions": "response"}
    card.locator("select.layer").select_option(str(LAYER))
    assert api_body(page)["interventions"][0]["layers"] == LAYER

    page.fill("#seed", "7")
    page.fill("#temperature", "0.5")
    page.fill("#max-tokens", "12")
    page.select_option("#readout-vector", "evil")
    page.select_option("#readout-layer", str(LAYER))
    body = api_body(page)
    assert (body["seed"], body["temperature"], body["max_tokens"]) == (7, 0.5, 12)
    assert body["persona_readout"] == [{"name": "evil", "vector": "evil", "layer": LAYER}]
    # pane B (the comparison) starts with no interventions; its capping toggle adds the server's preset by name
    page.select_option("#api-pane", "B")
    assert "interventions" not in api_body(page) and api_body(page)["seed"] == 7
    assert page.eval_on_selector_all("#settings-B .cap-preset option", "ns => ns.map(n => n.value)") == ["calm"]
    page.check("#settings-B .cap-on")
    assert api_body(page)["interventions"] == ["calm"]
    page.uncheck("#settings-B .cap-on")
    assert "interventions" not in api_body(page)
    page.select_option("#api-pane", "A")

    # turn 1: both panes stream at the same time
    page.evaluate(WATCH)
    page.fill("#message", FIRST)
    page.click("#send")
    page.wait_for_function(IDLE, arg=1, timeout=60_000)
    arrivals = page.evaluate("() => window.__arrivals")
    times = {P: [t for q, t in arrivals if q == P] for P in "AB"}
    assert all(len(set(times[P])) >= 2 for P in "AB"), f"tokens did not stream into both panes: {arrivals}"
    assert max(min(times["A"]), min(times["B"])) < min(max(times["A"]), max(times["B"])), \
        f"the panes did not stream together: {times}"
    assert auth and all(a == "Bearer sk-only-in-memory" for a in auth)

    # turn 2 (Enter sends)
    page.fill("#message", SECOND)
    page.press("#message", "Enter")
    page.wait_for_function(IDLE, arg=2, timeout=60_000)
    a, b = replies(page, "A"), replies(page, "B")
    assert len(a) == len(b) == 2 and all(a) and all(b), page.inner_text("#panes")
    assert a != b, "the steer must change pane A's answers"
    assert not page.locator(".msg .error").count(), page.inner_text("#chat")

    # per-token colouring (persona_projection per chunk) and the drift plot (mean_projection per turn)
    for P in "AB":
        spans = page.locator(f"#transcript-{P} .tok[data-proj]")
        assert spans.count() >= 2, f"pane {P} has no coloured token spans"
        assert page.locator(f"#drift-plot g.line-{P} circle.pt-{P}").count() == 2
        assert page.locator(f"#drift-plot g.line-{P} polyline").count() == 1
    assert page.locator("#transcript-A .tok[style*=background]").count() >= 1
    assert page.inner_text("#legend-lo") != "–" and page.inner_text("#legend-hi") != "–"
    shoot(page, tmp_path, "playground.png")

    # the API panel's last request for pane A, replayed with the official client, gives pane A's turn-2 text
    page.select_option("#api-which", "last")
    body = api_body(page)
    assert body["messages"][-1] == {"role": "user", "content": SECOND}
    assert body["messages"][1] == {"role": "assistant", "content": a[0]}
    assert body["interventions"][0]["coeff"] == value and body["stream"] is True
    extra = {k: body.pop(k) for k in EXTENSIONS if k in body}
    client = openai.OpenAI(base_url=server.url, api_key="x")
    stream = client.chat.completions.create(**body, extra_body=extra)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == a[1]

    # ... and so does the Python snippet next to it, run as it stands
    snippet = page.inner_text("#api-python")
    assert "extra_body=" in snippet and f'"coeff": {value}' in snippet
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "playground-snippet", "exec"), {})  # noqa: S102 - the page's own snippet
    assert out.getvalue() == a[1] + "\n"

    # the API key never left memory; no console errors or uncaught exceptions so far
    assert page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    assert not problems, problems

    # a request the server refuses: its OpenAI error shows in the pane (and nothing else breaks)
    page.fill("#max-tokens", "100000")
    page.fill("#message", "One more?")
    page.click("#send")
    page.wait_for_function(IDLE, arg=3, timeout=60_000)
    err = page.inner_text("#transcript-A .msg.assistant[data-turn='2'] .error")
    assert err.startswith("HTTP 400") and "max_tokens" in err, err
    assert all("Failed to load resource" in p and "400" in p for p in problems), problems
    shoot(page, tmp_path, "playground-error.png")
    page.close()
