"""Compile once: the persistent compile cache (a second process loads what the first compiled), its off switch
and unwritable directories, the compile clock, and the runner's per-stage ``compile_s``; mean log-probs scored
after shared prompt caches equal the full-sequence forward, row by row."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpersona.compute.handle as jm
from jaxpersona import errors
from jaxpersona.compute import compiling, scoring
from jaxpersona.data.chat import conversation
from jaxpersona.model.transformer import final_hidden
from jaxpersona.runner.run import open_run

PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from jaxpersona.compute.compiling import COMPILE_CLOCK, enable_compile_cache
print(json.dumps({"dir": str(enable_compile_cache(sys.argv[1]))}))
before = COMPILE_CLOCK.now()
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)(jnp.arange(64.0).reshape(8, 8))
t = COMPILE_CLOCK.now() - before
print(json.dumps({"hits": t.hits, "misses": t.misses, "seconds": t.seconds, "y": float(y)}))
"""


def run_program(cache: Path, *python_flags: str) -> dict:
    got = subprocess.run([sys.executable, *python_flags, "-c", PROGRAM, str(cache)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAXPERSONA_COMPILE_CACHE": ""})
    assert got.returncode == 0, got.stderr[-2000:]
    lines = [json.loads(x) for x in got.stdout.splitlines() if x.startswith("{")]
    return {**lines[0], **lines[1]}


def test_second_process_loads_what_the_first_compiled(tmp_path: Path) -> None:
    cache = tmp_path / "xla"
    first, second = run_program(cache), run_program(cache)
    assert first["dir"] == str(cache) and any(cache.iterdir())
    assert first["misses"] >= 1 and first["hits"] == 0 and first["seconds"] > 0
    assert second["hits"] >= 1 and second["misses"] == 0
    assert first["y"] == second["y"]  # the cached executable computes the same number
    # bounded, so JAX locks the directory around reads and writes: processes may share it
    assert (cache / ".lockfile").exists()


UNBOUNDED = """
import sys, jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.jit(lambda x: x * 5.0 - 2.0)(jnp.ones(4)).block_until_ready()
"""


def test_a_directory_an_unbounded_cache_wrote_keeps_caching(tmp_path: Path) -> None:
    """Entries an unbounded cache wrote (jaxpersona <= 0.7.7) have no last-use file; the bounded cache must still
    write new programs there (JAX's eviction otherwise fails on every write, with a warning, and caches nothing)."""
    cache = tmp_path / "xla"
    old = subprocess.run([sys.executable, "-c", UNBOUNDED, str(cache)], capture_output=True, text=True, timeout=300)
    assert old.returncode == 0, old.stderr[-2000:]
    before = {p.name for p in cache.iterdir() if p.name.endswith(compiling.ENTRY_SUFFIX)}
    assert before and not any(p.name.endswith(compiling.LAST_USE_SUFFIX) for p in cache.iterdir())
    run_program(cache, "-W", "error::UserWarning")  # JAX's "Error writing persistent compilation cache entry" fails it
    after = {p.name for p in cache.iterdir() if p.name.endswith(compiling.ENTRY_SUFFIX)}
    assert after > before  # the new program was written
    for name in after:  # and every entry, old and new, has its last-use time
        assert (cache / (name[: -len(compiling.ENTRY_SUFFIX)] + compiling.LAST_USE_SUFFIX)).exists()


def test_off_switch_and_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXPERSONA_COMPILE_CACHE", "off")
    assert compiling.enable_compile_cache(tmp_path / "x") is None and not (tmp_path / "x").exists()
    monkeypatch.setenv("JAXPERSONA_COMPILE_CACHE", str(tmp_path / "env-dir"))
    assert compiling.default_cache_dir() == tmp_path / "env-dir"
    monkeypatch.delenv("JAXPERSONA_COMPILE_CACHE")
    monkeypatch.setenv("JAXPERSONA_CACHE", str(tmp_path / "root"))
    assert compiling.default_cache_dir() == tmp_path / "root" / "xla"
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(errors.CacheWarning, match="not writable"):
        assert compiling.enable_compile_cache(blocker / "xla") is None
    assert jax.config.jax_compilation_cache_dir == before


def test_runner_records_compile_time_per_stage(tmp_path: Path) -> None:
    with open_run(tmp_path / "run", "test", {"a": 1}, log=lambda _: None) as run:
        with run.stage("fresh"):
            jax.jit(lambda x: jnp.sin(x) * 7.25 + 1.5)(jnp.ones(3)).block_until_ready()  # a new program
        with run.stage("idle"):
            pass
    man = json.loads((tmp_path / "run" / "run.json").read_text())
    stages = {s["name"]: s for s in man["stages"]}
    assert stages["fresh"]["compile_s"] > 0 and stages["idle"]["compile_s"] == 0
    assert stages["fresh"]["compile_s"] <= stages["fresh"]["wall_s"]
    assert man["compile_s"] >= stages["fresh"]["compile_s"] and "hits" in man["compile_cache"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_llama, word_tokenizer) -> jm.Model:
    d = tmp_path_factory.mktemp("tiny_model") / "m"
    shutil.copytree(tiny_llama.path, d)
    word_tokenizer("{% for m in messages %}< {{ m['role'] }} > {{ m['content'] }} {% endfor %}"
                   "{% if add_generation_prompt %}< assistant >{% endif %}").save_pretrained(d)
    return jm.load(d)


def test_shared_prompt_scoring_equals_the_full_forward(tiny_model: jm.Model) -> None:
    qs = ["what is the capital of france", "hello world", "the cat sat on the mat"]
    convs = [conversation(qs[i % 3], system="you are helpful" if i % 2 else None) for i in range(9)]
    resps = [" ".join(["paris is the capital"] * (1 + i % 4)) if i != 4 else "" for i in range(9)]
    got = scoring.mean_logprobs(tiny_model, convs, resps, batch_size=4)
    want = []
    for c, r in zip(convs, resps):
        if not r:
            want.append(np.nan)
            continue
        enc = scoring.encode_targets(tiny_model, [c], [r])
        data = {k: jnp.asarray(v) for k, v in enc.items()}
        h = final_hidden(tiny_model.params, tiny_model.cfg, data["tokens"], data["valid"])
        want.append(float(scoring.target_logprob(tiny_model.params, tiny_model.cfg, h, data)[0]))
    assert np.isnan(got[4]) and np.isnan(want[4])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert len({round(x, 3) for x in got if not np.isnan(x)}) > 3  # different rows, not one number repeated


def test_cli_compile_cache_options(tmp_path: Path, tiny_llama, word_tokenizer) -> None:
    from jaxpersona import cli

    d = tmp_path / "m"
    shutil.copytree(tiny_llama.path, d)
    word_tokenizer().save_pretrained(d)
    args = ["resid", "the cat sat", "--layers", "0,1", "--model", str(d), "--out", str(tmp_path / "r.npy")]
    before = compiling.cache_dir_in_use()
    try:
        assert cli.main(["--no-compile-cache", "--compile-cache", str(tmp_path / "off"), *args]) == 0
        assert not (tmp_path / "off").exists()  # --no-compile-cache wins: nothing set up, nothing written
        jax.clear_caches()  # the same programs again, compiled afresh: now stored
        assert cli.main(["--compile-cache", str(tmp_path / "on"), *args]) == 0
        assert (tmp_path / "on").is_dir() and any((tmp_path / "on").iterdir())  # the command's programs were stored
        assert compiling.cache_dir_in_use() == before  # and main() left the process's setting as it was
        assert np.load(tmp_path / "r.npy").shape[0] == 2
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
