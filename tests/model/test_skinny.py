"""The CPU kernel for float32 matmuls against a stacked weight (jaxpersona.model.skinny): built where a C++ compiler and AVX-512F exist (as on the CI machine), exact to fp32 rounding against a float64
reference, row-independent bit for bit (few rows, many rows, vmapped), differentiable, and used by the serving
engine's and the library's decode steps with the same tokens as XLA's dots."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlo_checks import cache_copies

from jaxpersona.model import cache_attention, skinny


def machine_can_build() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return (platform.machine().lower() in ("x86_64", "amd64") and " avx512f" in flags
            and (shutil.which("g++") or shutil.which("c++")) is not None and os.environ.get(skinny.ENV) != "0")


def test_the_kernel_is_built_where_the_machine_can_build_it():
    """Not a skip: on a machine with g++ and AVX-512F (the CI machine) the kernel must build and load; elsewhere
    it must say why not, and callers keep XLA's dot."""
    if machine_can_build():
        assert skinny.available(), skinny.unavailable_reason()
        assert skinny.library_path().exists()
    else:
        assert not skinny.available() and skinny.unavailable_reason()


@pytest.mark.parametrize("m,k,n", [(16, 576, 1536), (16, 1536, 576), (1, 576, 192), (13, 300, 100), (6, 64, 37),
                                   (7, 250, 16), (40, 896, 128), (2, 17, 5)])
def test_matches_a_float64_reference_for_every_layer(m, k, n):
    """Shapes cover K split in parts (K >= 256) and not, widths that are not multiples of 64 or 16 (masked
    tails), row counts that are not multiples of the 6-row tile."""
    rng = np.random.default_rng(m * 1000 + k + n)
    stack = rng.standard_normal((3, k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    f = jax.jit(skinny.matmul)
    for layer in range(3):
        got = np.asarray(f(jnp.asarray(x), jnp.asarray(stack), layer))
        ref = x.astype(np.float64) @ stack[layer].astype(np.float64)
        scale = np.abs(x).astype(np.float64) @ np.abs(stack[layer]).astype(np.float64)  # the sum's magnitude
        assert got.shape == (m, n)
        assert np.all(np.abs(got - ref) <= 1e-6 * scale + 1e-30), np.max(np.abs(got - ref) / scale)


def test_a_row_gets_the_same_bits_alone_or_in_any_batch():
    """The server's invariant: a row's result does not depend on the rows beside it (nor on leading dims)."""
    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.standard_normal((2, 576, 1536)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((16, 576)).astype(np.float32))
    f = jax.jit(skinny.matmul)
    full = np.asarray(f(x, stack, 1))
    for rows in ([3], [0, 15], list(range(5)), list(range(7, 16))):
        np.testing.assert_array_equal(np.asarray(f(x[jnp.asarray(rows)], stack, 1)), full[rows])
    np.testing.assert_array_equal(np.asarray(f(x.reshape(4, 4, 576), stack, 1)).reshape(16, -1), full)


@pytest.mark.parametrize("k,n", [(576, 1536), (1536, 576), (300, 130), (100, 70)])
def test_many_rows_give_the_few_row_bits(k, n):
    """From 32 rows on the kernel takes its many-row path (packed panels, each part's sum in registers): every
    row equals the few-row path's bits (the row alone, or 5 at a time), K split in parts or not, masked tails."""
    if not skinny.available():
        assert not machine_can_build()
        return
    rng = np.random.default_rng(k + n)
    stack = jnp.asarray(rng.standard_normal((2, k, n)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((203, k)).astype(np.float32))
    f = jax.jit(skinny.matmul)
    many = np.asarray(f(x, stack, 1))
    np.testing.assert_array_equal(np.concatenate([np.asarray(f(x[i:i + 5], stack, 1)) for i in range(0, 203, 5)]),
                                  many)
    np.testing.assert_array_equal(np.asarray(f(x[7:8], stack, 1)), many[7:8])
    ref = np.asarray(x).astype(np.float64) @ np.asarray(stack[1]).astype(np.float64)
    np.testing.assert_allclose(many, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_vmap_makes_the_batch_rows_of_one_call():
    """Under vmap (a sweep's grid points, a consistency run's seeds) the batch becomes more rows of one call, not
    a loop of calls, with each element's bits; a batched layer index or weight falls back to one call per element."""
    if not skinny.available():
        assert not machine_can_build()
        return
    rng = np.random.default_rng(3)
    stack = jnp.asarray(rng.standard_normal((3, 576, 192)).astype(np.float32))
    xs = jnp.asarray(rng.standard_normal((7, 9, 576)).astype(np.float32))
    f = jax.jit(jax.vmap(lambda a: skinny.matmul(a, stack, 2)))
    hlo = f.lower(xs).compile().as_text()
    assert hlo.count(f'custom_call_target="{skinny.TARGET}"') == 1 and "while" not in hlo
    each = np.stack([np.asarray(skinny.matmul(xs[i], stack, 2)) for i in range(7)])
    np.testing.assert_array_equal(np.asarray(f(xs)), each)
    by_layer = jax.vmap(lambda a, l: skinny.matmul(a, stack, l))(xs[:3], jnp.arange(3))
    np.testing.assert_array_equal(np.asarray(by_layer),
                                  np.stack([np.asarray(skinny.matmul(xs[i], stack, i)) for i in range(3)]))
    stacks = jnp.stack([stack, 2 * stack])  # a batched weight, x read as it is
    by_weight = jax.vmap(lambda s: skinny.matmul(xs[0], s, 1))(stacks)
    np.testing.assert_array_equal(np.asarray(by_weight),
                                  np.stack([np.asarray(skinny.matmul(xs[0], s, 1)) for s in stacks]))


def test_shapes_that_do_not_fit_are_a_typed_error():
    from jaxpersona import errors

    stack = jnp.zeros((2, 8, 4), jnp.float32)
    for x, s in ((jnp.zeros((3, 7), jnp.float32), stack), (jnp.zeros((3, 8), jnp.float32), stack[0])):
        with pytest.raises(errors.ShapeMismatchError, match="needs x"):
            skinny.matmul(x, s, 0)


def test_gradients_and_vmap_follow_xla():
    rng = np.random.default_rng(1)
    stack = jnp.asarray(rng.standard_normal((3, 40, 24)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((5, 40)).astype(np.float32))

    def loss(fn):
        return lambda x, s: jnp.sum(jnp.tanh(fn(x, s)))

    got = jax.grad(loss(lambda x, s: skinny.matmul(x, s, 2)), argnums=(0, 1))(x, stack)
    want = jax.grad(loss(lambda x, s: x @ s[2]), argnums=(0, 1))(x, stack)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    batched = jax.vmap(lambda xi: skinny.matmul(xi, stack, 1))(x[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(batched), np.asarray(x @ stack[1]), rtol=1e-5, atol=1e-5)


def test_turned_off_by_the_environment_it_falls_back_to_xla_exactly():
    code = ("import numpy as np, jax.numpy as jnp\n"
            "from jaxpersona.model import skinny\n"
            "s = jnp.asarray(np.random.default_rng(0).standard_normal((2, 300, 70)).astype(np.float32))\n"
            "x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 300)).astype(np.float32))\n"
            "assert not skinny.available() and skinny.unavailable_reason() == 'JAXPERSONA_CPU_KERNEL=0'\n"
            "assert (np.asarray(skinny.matmul(x, s, 1)) == np.asarray(x @ s[1])).all()\n")
    env = {**os.environ, skinny.ENV: "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def served(model, prompts: list[str], max_tokens: int, cpu_kernel: bool) -> list[tuple[list, list]]:
    """Greedy tokens and log-probs of each prompt, submitted together to an engine (batch 4)."""
    import queue

    from jaxpersona.serve.engine import Engine, EngineConfig, Sequence

    eng = Engine(model.params, model.cfg, model.tokenizer, model.eos_ids, model.pad_id,
                 EngineConfig(batch=4, max_context=128, prefix_cache_mb=0, cpu_kernel=cpu_kernel))
    assert eng.cpu_kernel == (cpu_kernel and skinny.available())
    assert eng.prefill_kernel == eng.cpu_kernel  # 1 row x 16 tokens a prefill call: few rows
    eng.start()
    try:
        qs = []
        for p in prompts:
            ids, _ = model.tokens_and_role([{"role": "user", "content": p}], "assistant")
            qs.append(queue.Queue())
            eng.submit([Sequence(0, list(ids), max_tokens, qs[-1], logprobs=0, ignore_eos=True)])
        out = []
        for q in qs:
            toks, lps = [], []
            while (ev := q.get(timeout=600))[0] != "done":
                toks.append(ev[3][0])
                lps.append(ev[3][1])
            out.append((toks, lps))
        return out
    finally:
        eng.stop()


def test_the_engine_decode_step_reads_weights_in_place_with_xlas_tokens(smollm2):
    """The server's decode step on the embedded model: with the kernel, no projection weight is sliced out of
    its stack (the copies it exists to avoid) and the kernel's custom call is in the program; prefill calls of
    few rows use it too; served greedy tokens equal XLA's and log-probs agree within 1e-4."""
    from jaxpersona.model.transformer import Blocked
    from jaxpersona.serve.engine import Engine, EngineConfig, decode_step

    m = smollm2
    if not skinny.available():
        assert not machine_can_build()
        return
    b = 4
    eng = Engine(m.params, m.cfg, m.tokenizer, m.eos_ids, m.pad_id, EngineConfig(batch=b, max_context=64,
                                                                                  prefix_cache_mb=0))
    assert eng.cpu_kernel
    _, units, layers = eng.table.device()
    hlo = decode_step.lower(eng.params, m.cfg, eng.cache, eng.logits, jnp.zeros(b, jnp.int32), jnp.ones(b, bool),
                            jnp.asarray(eng.keys), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.float32),
                            jnp.ones(b, jnp.float32), None, units, layers, logprobs=jnp.asarray(True),
                            readout=False, blocked=Blocked(32, 64), cpu_kernel=True).compile().as_text()
    assert skinny.TARGET in hlo and cache_attention.TARGET in hlo  # projections and attention read in place
    assert not cache_copies(hlo, m.cfg), cache_copies(hlo, m.cfg)[:2]
    xla = decode_step.lower(eng.params, m.cfg, eng.cache, eng.logits, jnp.zeros(b, jnp.int32), jnp.ones(b, bool),
                            jnp.asarray(eng.keys), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.float32),
                            jnp.ones(b, jnp.float32), None, units, layers, logprobs=jnp.asarray(True),
                            readout=False, blocked=Blocked(32, 64), cpu_kernel=False).compile().as_text()
    assert cache_attention.TARGET not in xla and cache_copies(xla, m.cfg)  # what the kernel saves (and the check sees)
    sliced = [line for line in hlo.splitlines() if "dynamic-slice" in line and "fusion(" in line
              and any(f"f32[{a},{c}]" in line for a, c in [(576, 1536), (1536, 576), (576, 576), (576, 192)])]
    assert not sliced, sliced[:3]
    wide = Engine(m.params, m.cfg, m.tokenizer, m.eos_ids, m.pad_id,
                  EngineConfig(batch=b, max_context=512, prefill_chunk=256, prefix_cache_mb=0))
    assert wide.cpu_kernel and not wide.prefill_kernel  # 256-token prefill calls keep XLA's dots
    prompts = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]
    xla, kernel = served(m, prompts, 12, False), served(m, prompts, 12, True)
    for (t0, l0), (t1, l1) in zip(xla, kernel):
        assert t0 == t1
        np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-4)
    assert any(l0 != l1 for (_, l0), (_, l1) in zip(xla, kernel))  # the two really ran different kernels


LIBRARY_GREEDY = """
import json, sys
import numpy as np
from jaxpersona import load
from jaxpersona.compute.generate import generate
from jaxpersona.model import registry
m = load(registry.DEFAULT_MODEL)
b = m.encode(json.loads(sys.argv[1]), chat=True)
out = generate(m.params, m.cfg, b.tokens, b.valid, max_new_tokens=12, eos_ids=(), pad_id=m.pad_id)
print(json.dumps([np.asarray(out.tokens).tolist(), np.asarray(out.logprobs).tolist()]))
"""


def test_library_generation_decodes_with_the_kernel_and_xlas_tokens(smollm2):
    """Every decode step of the library's generation (generate, the sweep's vmapped generations, seeds) reads
    its projections and its attention over the cache with the kernels on one CPU device: their custom calls are
    in the program and no layer of the cache is copied out; greedy tokens on the embedded model equal XLA's
    (``JAXPERSONA_CPU_KERNEL=0``, another process) with log-probs within 1e-4."""
    import json

    from jaxpersona.compute.generate import generate, generate_loop

    m = smollm2
    if not skinny.available():
        assert not machine_can_build()
        return
    assert skinny.for_decode()
    prompts = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]
    b = m.encode(prompts, chat=True)
    hlo = generate_loop.lower(m.params, m.cfg, jnp.asarray(b.tokens), jnp.asarray(b.valid), jax.random.key(0),
                              jnp.float32(0), jnp.float32(1), None, max_new_tokens=4, greedy=True, eos_ids=(),
                              pad_id=0).compile().as_text()
    assert f'custom_call_target="{skinny.TARGET}"' in hlo
    assert f'custom_call_target="{cache_attention.TARGET}"' in hlo
    with pytest.MonkeyPatch.context() as mp:  # the decode without the kernels (another trace: 5 new tokens)
        mp.setattr(skinny, "for_decode", lambda: False)
        xla = generate_loop.lower(m.params, m.cfg, jnp.asarray(b.tokens), jnp.asarray(b.valid), jax.random.key(0),
                                  jnp.float32(0), jnp.float32(1), None, max_new_tokens=5, greedy=True, eos_ids=(),
                                  pad_id=0).compile().as_text()
    # the prefill streams the cache layer by layer (transformer.streams_cache) and the decode step reads it in place:
    # no layer of it is copied out; XLA's decode step slices its layer's keys and values out (2)
    assert not cache_copies(hlo, m.cfg) and len(cache_copies(xla, m.cfg)) >= 2, cache_copies(hlo, m.cfg)
    out = generate(m.params, m.cfg, b.tokens, b.valid, max_new_tokens=12, eos_ids=(), pad_id=m.pad_id)
    env = {**os.environ, skinny.ENV: "0"}
    done = subprocess.run([sys.executable, "-c", LIBRARY_GREEDY, json.dumps(prompts)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens, logprobs = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(logprobs), rtol=0, atol=1e-4)
    assert not np.array_equal(np.asarray(out.logprobs), np.asarray(logprobs))  # two kernels really ran
