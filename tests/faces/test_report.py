"""``jaxpersona report``: the static HTML page of real run directories, loaded in headless Chromium.

The runs are made here, the cheap way, by the real pipelines on the tiny random llama (conftest's
``tiny_llama``) with the tiny sizes of test_pipeline / test_space: ``run_extract`` (scripted judge),
``run_space`` and ``jaxpersona sweep --config`` (the CLI, with the model loader pointed at the tiny
model). Each report is opened in Debian's ``chromium`` (headless through Playwright, file://, no network): the page must
log nothing to the console, its figures must be in the DOM after the scripts ran (``<img>`` with
``data:image/png`` and their alt texts), every treescope view must have rendered into its shadow DOM,
and a screenshot is kept as a test artifact under ``$JAXPERSONA_TEST_ARTIFACTS`` (default
``test-artifacts/`` at the repository root).

Chromium is required, not optional: without it the tests fail and say how to install it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import test_pipeline as tp
import test_space as ts
from jaxpersona.cli import main
from jaxpersona.report import write_report

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("JAXPERSONA_TEST_ARTIFACTS") or REPO / "test-artifacts")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WINDOW = (1280, 4000)
SWEEP = """\
model = "tiny-llama"

[vector]
name = "cat"
positive = ["you are a cat .", "the cat sat on the mat ."]
negative = ["you are a dog .", "the dog sat on the mat ."]

[grid]
kind = "steer"
layers = [1, 2]
coeffs = [-1.0, 0.0, 1.0]

[data]
system = "you are a helpful assistant ."
prompts = ["what is a cat ?", "hello world ?"]
responses = ["the cat sat on the mat .", "hello cat !"]

[project]
layers = [3]
"""


# --------------------------------------------------------------------------------------------------
# headless chromium
# --------------------------------------------------------------------------------------------------
def chromium() -> str:
    """Path of the chromium binary; fails the test (never skips) when it is not installed."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed, and the report tests need a real browser: install Debian's "
                    "package with `apt-get install chromium` (CI: .ci/run does this)", pytrace=False)
    return exe


# The report's status script sets this on <html> once every treescope view has settled (rendered or failed).
SETTLED = "() => document.documentElement.dataset.tsStatus === 'done' || !document.querySelector('.ts-view')"


@dataclasses.dataclass
class Page:
    dom: str  # the DOM after the page's scripts ran
    console: list[str]  # every console message and uncaught error ("Uncaught Error: ...")
    screenshot: Path | None


def load_page(html_file: Path, screenshot: Path | None = None) -> Page:
    """Open ``html_file`` in headless chromium (through Playwright), offline; scroll to each treescope view (they
    render lazily, when near the window) and wait in real time (60 s at most) until all have settled; the DOM,
    console messages and a screenshot of the window, scrolled back to the top.

    Real time, not ``--virtual-time-budget``: treescope renders a view from a compressed payload through an
    asynchronous stream, and chromium's virtual clock ran past its whole budget while a busy machine was still
    decompressing (a view left empty, a flaky failure)."""
    from playwright.sync_api import sync_playwright

    exe = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": WINDOW[0], "height": WINDOW[1]})
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.on("pageerror", lambda e: console.append(f"Uncaught {e.name}: {e.message}"))
            page.goto(html_file.resolve().as_uri(), wait_until="load")
            views = page.locator(".ts-view")
            for i in range(views.count()):  # as a reader scrolls: treescope renders a view once it is near
                views.nth(i).scroll_into_view_if_needed()
            page.wait_for_function(SETTLED, timeout=60_000)
            page.evaluate("window.scrollTo(0, 0)")
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.unlink(missing_ok=True)
                page.screenshot(path=str(screenshot))
            return Page(page.content(), console, screenshot)
        finally:
            browser.close()


class DomIndex(HTMLParser):
    """The parts of a dumped DOM the tests look at: images, treescope views, section ids."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.views: list[dict[str, str]] = []
        self.sections: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        elif tag == "div" and "ts-view" in a.get("class", "").split():
            self.views.append(a)
        elif tag == "section":
            self.sections.append(a.get("id", ""))


def check_screenshot(path: Path) -> None:
    """A real screenshot: a PNG of the window's size with plenty of non-white, varied pixels."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 30_000, f"{path}: {len(data)} bytes"
    with Image.open(path) as im:
        assert im.size == WINDOW
        px = np.asarray(im.convert("RGB"))
    ink = (px.min(axis=-1) < 200).mean()
    colours = len(np.unique(px.reshape(-1, 3)[::7], axis=0))
    assert ink > 0.005 and colours > 50, f"{path} looks blank: {ink:.1%} ink, {colours} colours"


def check_report(html_file: Path, run: Path, name: str, views: set[str]) -> DomIndex:
    """Everything a report page must satisfy; returns the parsed DOM for the caller's own checks."""
    src = html_file.read_text()
    # self-contained: nothing fetched from anywhere (images are data: URIs, no external scripts/styles/fonts)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[a-z]+:""", src, re.I)
    assert not re.search(r"""url\(\s*["']?(?!data:)[a-z]+:|@import""", src, re.I)
    page = load_page(html_file, ARTIFACTS / f"report_{name}.png")
    shutil.copyfile(html_file, ARTIFACTS / f"report_{name}.html")
    assert page.console == [], f"console messages while loading the report: {page.console}"
    dom = DomIndex(page.dom)
    pngs = sorted(p.relative_to(run) for p in run.rglob("*.png"))
    assert len(dom.images) == len(pngs)
    for img in dom.images:
        assert img.get("src", "").startswith("data:image/png;base64,") and len(img["src"]) > 1000, img.get("alt")
    assert sorted(img["alt"].split(":")[0] for img in dom.images) == sorted(map(str, pngs))
    got = {v["data-view"] for v in dom.views}
    assert views <= got, f"treescope views {sorted(views - got)} missing (have {sorted(got)})"
    for v in dom.views:  # treescope's JS filled each view's shadow DOM
        assert int(v.get("data-rendered", "0")) > 0, f"treescope view {v['data-view']} did not render"
    assert {"overview", "config", "files"} <= set(dom.sections)
    check_screenshot(page.screenshot)
    return dom


# --------------------------------------------------------------------------------------------------
# real runs on the tiny llama
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def extract_run(tiny_llama, root: Path) -> Path:
    from jaxpersona.pipelines.persona import run_extract

    model = tp.CountingModel(tiny_llama.cfg, tiny_llama.params, tp.full_word_tokenizer(), "tiny-llama")
    run_extract(model, tp.TRAIT, tp.ScriptedJudge(), tp.CONFIG, root / "extract", judge_id="scripted",
                progress=False, log=tp._quiet)
    return root / "extract"


@pytest.fixture(scope="module")
def space_run(tiny_llama, root: Path) -> Path:
    from jaxpersona.data.roles import load_roles
    from jaxpersona.pipelines.space import SpaceConfig, run_space

    model = tp.CountingModel(tiny_llama.cfg, tiny_llama.params, tp.full_word_tokenizer(ts.TEMPLATE), "tiny-llama")
    (root / "roles_src").mkdir()
    roles = load_roles(ts.make_role_dir(root / "roles_src"))
    run_space(model, roles, ts.SCRIPTS, None, SpaceConfig().replace(**ts.SPACE), root / "space", progress=False,
              log=lambda _: None)
    return root / "space"


@pytest.fixture(scope="module")
def sweep_run(tiny_llama, root: Path) -> Path:
    """``jaxpersona sweep --config`` through the CLI, the model loader returning the tiny llama."""
    import jaxpersona.compute.handle as jm
    import jaxpersona.pipelines.sweep as sweep_pipeline

    model = jm.Model(tiny_llama.cfg, tiny_llama.params, tp.full_word_tokenizer(), "tiny-llama")
    (root / "sweep.toml").write_text(SWEEP)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_pipeline, "load", lambda *a, **k: model)  # the loader the sweep pipeline calls
        assert main(["sweep", "--config", str(root / "sweep.toml"), "--out", str(root / "sweep"), "--quiet"]) == 0
    return root / "sweep"


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
def test_console_checker_catches_a_throwing_page(tmp_path: Path) -> None:
    """The console check is not vacuous: a deliberate throw and console.error are caught, a clean page is clean."""
    bad, good = tmp_path / "bad.html", tmp_path / "good.html"
    bad.write_text('<html><body><p>x</p><script>console.error("explicit error"); '
                   'throw new Error("deliberate boom");</script></body></html>')
    good.write_text("<html><body><p>fine</p><script>document.body.dataset.ok = 1;</script></body></html>")
    msgs = load_page(bad).console
    assert any("Uncaught Error: deliberate boom" in m for m in msgs), msgs
    assert any("explicit error" in m for m in msgs), msgs
    page = load_page(good)
    assert page.console == [] and 'data-ok="1"' in page.dom


def test_extract_report_in_chromium(extract_run: Path, root: Path) -> None:
    out = write_report(extract_run)
    assert out == extract_run / "report.html"
    dom = check_report(out, extract_run, "extract", {"bank:vectors", "norms:vectors", "steer"})
    src = out.read_text()
    assert '<span class="kind">extract</span>' in src
    alts = {img["alt"].split(":")[0]: img["alt"] for img in dom.images}
    assert "coherence cliff" in alts["steering.png"]
    # config, summaries and tables are there, from the run's own files
    cfg = json.loads((extract_run / "config.json").read_text())
    assert "<th>steer_coeffs</th>" in src and "<th>trait_threshold</th>" in src and cfg["trait"] == "cat"
    first = (extract_run / "summary.txt").read_text().splitlines()[0]
    assert first.replace("'", "&#x27;") in src
    assert "<code>pairs.jsonl</code>" in src and "<code>summary.json</code>" in src
    assert "Steer(" in src and "VectorBank(" in src  # treescope's text forms
    # the report does not list itself when rendered again
    write_report(extract_run)
    assert "report.html" not in out.read_text().split('id="files"')[1]


def test_space_report_has_the_capping_intervention(space_run: Path, root: Path) -> None:
    out = write_report(space_run, root / "space_report" / "page.html")
    assert not (space_run / "report.html").exists()
    dom = check_report(out, space_run, "space", {"bank:vectors", "steer", "cap:capping.json"})
    figures = {i["alt"].split(":")[0] for i in dom.images}
    assert figures == {"pca_map.png", "variance.png", "cos_axis_pc1.png", "drift.png"}
    src = out.read_text()
    assert '<span class="kind">space</span>' in src and "Cap(" in src and "assistant_axis" in src


def test_sweep_report_via_cli(sweep_run: Path, root: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["report", str(sweep_run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {sweep_run / 'report.html'}"
    out = sweep_run / "report.html"
    dom = check_report(out, sweep_run, "sweep", {"steer"})
    assert dom.images == []  # a sweep writes no plots
    src = out.read_text()
    assert '<span class="kind">sweep</span>' in src
    assert "config.toml as written" in src and "<th>coeffs</th>" in src  # the TOML config, parsed and raw
    assert "<code>results.csv</code>" in src and "vectors.npy" in src


def test_report_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')  # a model directory, not a run
    for target, needle in ((tmp_path / "missing", "does not exist"), (tmp_path / "file.txt", "is a file"),
                           (tmp_path / "empty", "not a run directory"), (hf, "not a run directory")):
        assert main(["report", str(target)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not list(tmp_path.rglob("report.html"))


def test_report_of_a_run_with_a_corrupt_bank_says_so(tmp_path: Path) -> None:
    """A damaged bank does not stop the report: the page names the problem where the bank would be."""
    run = tmp_path / "run"
    bank = run / "vectors"
    for item in ("bank", "vectors"):
        (bank / item).mkdir(parents=True)
    (bank / "_CHECKPOINT_METADATA").write_text("{}")
    (run / "summary.txt").write_text("a run\n")
    src = write_report(run).read_text()
    assert "run (unrecognised kind)" in src and "could not read the bank" in src and "<pre>a run\n</pre>" in src


# --------------------------------------------------------------------------------------------------
# the kind comes from run.json; a directory from before run.json is recognised once (runner.legacy)
# --------------------------------------------------------------------------------------------------
DISPLAY = {"extract": "extract", "extract-all": "extract (all traits)", "sweep": "sweep", "space": "space",
           "regimes": "regimes", "consistency": "consistency", "finetune": "finetune", "screen": "screen",
           "trait-data": "trait data", "bank": "vector bank", "some-future-kind": "some-future-kind"}


def _no_file_rules(mp: pytest.MonkeyPatch) -> None:
    """Make any use of the old file rules fail the test."""
    from jaxpersona.runner import legacy

    def looked(*a, **k):
        raise AssertionError("the report guessed the kind from the directory's files")

    mp.setattr(legacy, "recognise", looked)
    mp.setattr(legacy, "adopt", looked)


@pytest.mark.parametrize("kind", sorted(DISPLAY))
def test_report_takes_the_kind_from_run_json(kind: str, tmp_path: Path, monkeypatch) -> None:
    """The manifest's kind is shown whatever the files look like (decoys of another kind are there), with its
    status, stage table, package version / git SHA and model digest; the old file rules are never consulted."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ("pca.json" if kind == "regimes" else "regimes.json")).write_text("{}")  # another kind's file
    (run / "summary.txt").write_text("a run\n")
    manifest = {"schema_version": 1, "kind": kind, "status": "complete", "attempt": 2,
                "started": "2025-01-02T03:04:05+00:00", "ended": "2025-01-02T03:05:06+00:00", "wall_s": 61.5,
                "stages": [{"name": "generate", "status": "complete", "wall_s": 12.25, "cache_hits": 7},
                           {"name": "judge", "status": "complete", "wall_s": 3.5, "cache_hits": 0}],
                "package": {"name": "jaxpersona", "version": "9.8.7", "git_sha": "0123456789abcdef0123",
                            "dirty": False},
                "model": {"name": "tiny-llama", "digest": "feedface1234"}}
    (run / "run.json").write_text(json.dumps(manifest))
    with monkeypatch.context() as mp:
        _no_file_rules(mp)
        src = write_report(run, tmp_path / "page.html").read_text()
    assert f'<span class="kind">{DISPLAY[kind]}</span>' in src
    overview = src.split('id="overview"')[1].split("</section>")[0]
    for needle in ("<th>status</th><td>complete</td>", "<td>generate</td>", "<td>judge</td>", ">12.25<", ">7<",
                   "<th>cache hits</th>", "jaxpersona 9.8.7, git 0123456789ab", "feedface1234", "tiny-llama"):
        assert needle in overview, needle
    assert json.loads((run / "run.json").read_text()) == manifest  # read, never rewritten


@pytest.mark.parametrize("fixture", ["extract_run", "space_run", "sweep_run"])
def test_old_directory_is_recognised_once(fixture: str, request, tmp_path: Path, monkeypatch) -> None:
    """A run directory from before run.json (a fixture run without its run.json) is recognised by the old
    file rules, gets its run.json, and renders the same kind; the next report reads only the run.json."""
    src_run = request.getfixturevalue(fixture)
    expected = fixture.removesuffix("_run")
    new = json.loads((src_run / "run.json").read_text()) if (src_run / "run.json").is_file() else None
    assert new is None or new["kind"] == expected  # a ported pipeline records the kind the old rules give
    run = tmp_path / expected
    shutil.copytree(src_run, run)
    (run / "run.json").unlink(missing_ok=True)
    for f in run.glob("*.html"):
        f.unlink()
    page = write_report(run, tmp_path / "first.html").read_text()
    assert f'<span class="kind">{expected}</span>' in page and "written before run.json existed" in page
    adopted = json.loads((run / "run.json").read_text())
    assert adopted["kind"] == expected and adopted["legacy"] and adopted["status"] == "unknown"
    with monkeypatch.context() as mp:
        _no_file_rules(mp)
        again = write_report(run, tmp_path / "second.html").read_text()
    assert f'<span class="kind">{expected}</span>' in again
    assert json.loads((run / "run.json").read_text()) == adopted


def test_old_read_only_directory_is_recognised_without_writing(tmp_path: Path, monkeypatch) -> None:
    """When run.json cannot be written, the old directory is still recognised for the page."""
    from jaxpersona.runner import legacy

    run = tmp_path / "data"
    run.mkdir()
    for name in ("trait.jsonl", "neutral.jsonl"):
        (run / name).write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')

    def refuse(path, write):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(legacy, "atomic_write", refuse)
    src = write_report(run, tmp_path / "page.html").read_text()
    assert '<span class="kind">trait data</span>' in src and not (run / "run.json").exists()


def test_bare_vector_bank_report(tmp_path: Path) -> None:
    """A bank directory on its own is shown as a bank, and nothing is written into it."""
    from jaxpersona.artifacts.bank import VectorBank

    bank_dir = VectorBank(np.random.default_rng(0).normal(size=(2, 3, 4)), ("a", "b"), "tiny").save(tmp_path / "b")
    before = sorted(p.relative_to(bank_dir) for p in bank_dir.rglob("*"))
    src = write_report(bank_dir, tmp_path / "page.html").read_text()
    assert '<span class="kind">vector bank</span>' in src and 'data-view="bank:."' in src
    assert sorted(p.relative_to(bank_dir) for p in bank_dir.rglob("*")) == before
    assert VectorBank.load(bank_dir).names == ("a", "b")
