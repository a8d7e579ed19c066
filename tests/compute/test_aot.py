"""AOT dry runs: every stage of a small config compiled deviceless for a TPU v5e topology (libtpu) and as a
CPU-backend estimate on 8 virtual devices; the paper-size stage CI compiles (Llama-3.3-70B decode on a 4x16 v5e
mesh, KV heads replicated); the fast memory plan against the sharded program's memory analysis; the layout planner
and the CLI's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpersona import errors
from jaxpersona.cli import main
from jaxpersona.compute.accelerators import parse_slice
from jaxpersona.compute.aot import STAGES, Sizes, dry_run, wire_bytes
from jaxpersona.compute.layout import choose_layout

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aot_cpu.py"
SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
         "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "hidden_act": "silu"}
SIZES = {"prefill": Sizes(batch=8, seq=64), "activations": Sizes(batch=8, seq=64),
         "sweep": Sizes(batch=2, seq=32, grid=4, targets=8), "roles": Sizes(batch=8, seq=64),
         "capped": Sizes(batch=4, seq=16, context=64, new_tokens=8), "train": Sizes(batch=8, seq=64, targets=16, rank=4),
         "decode": Sizes(batch=8, seq=1, context=128, targets=1)}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("aot") / "config.json"
    p.write_text(json.dumps(SMALL))
    return str(p)


def test_llama_70b_decode_on_v5e_4x16_compiles_deviceless_with_kv_heads_replicated() -> None:
    r = dry_run("llama-3.3-70b-instruct", "decode", "4x16", "v5e", sizes=Sizes(batch=64, seq=1, context=4096, targets=1))
    assert r.backend == "tpu-deviceless" and r.kv_replication == 2  # 8 KV heads, 16-way model axis
    # arguments: the weights' shards (70.55B params + the repeated k/v projections, 80 x 2 x 8192 x 1024 more,
    # bf16, over 16) + this device's KV cache (16 rows, 1 KV head)
    kv = 2 * 80 * 16 * 1 * 4096 * 128 * 2
    assert abs(r.arguments - ((70.55e9 + 80 * 2 * 8192 * 1024) * 2 / 16 + kv)) / r.arguments < 0.002
    assert r.aliased == kv + 16 * 4096 and r.fits()  # the cache (and its valid mask) donated, updated in place
    # tensor parallelism: two all-reduces of [rows, 1, d_model] per layer (+ the head's), nothing gathered big
    s = r.collective_summary()
    assert s["all-reduce"][0] == 2 * 80 + 1
    in_loop = [c for c in r.collectives if c.kind == "all-reduce" and c.in_loop]
    # the TPU's HLO records no known_trip_count: the layer scan's 80 is read from its loop condition
    assert in_loop and all(c.bytes == 16 * 8192 * 2 and c.trip_counts == (80,) for c in in_loop)
    assert all(c.bytes < 2**20 for c in r.collectives if c.kind == "all-gather")
    assert r.bound == "memory" and r.utilisation["MBU"] == 1.0


def test_every_stage_of_a_small_model_compiles_for_a_tpu_topology(small) -> None:
    for stage in STAGES:
        r = dry_run(small, stage, "2x4", "v5e", sizes=SIZES[stage])
        assert r.backend == "tpu-deviceless", stage
        assert r.arguments > 0 and r.total > 0 and r.flops > 0 and r.fits(), stage
        assert r.kv_replication == 2, stage  # 2 KV heads on a model axis of 4
        assert "all-reduce" in r.collective_summary(), stage


def test_cpu_estimates_and_the_fast_plan_against_the_compiled_program(small) -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT), small], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("{")))
    assert set(res["stages"]) == set(STAGES)
    for stage, r in res["stages"].items():
        assert r["backend"] == "cpu-estimate" and r["fits"] and r["flops"] > 0, stage
    assert "all-to-all" not in res["stages"]["prefill"]["collectives"]
    for p in res["plan_vs_compiled"]:
        err = abs(p["planned"] - p["compiled"]) / p["compiled"]
        # the shard arithmetic + the local-shape compile (+ with FSDP the largest group of one layer's weights that
        # is gathered at once) is the sharded program's memory to 5% (measured: within 0.6%)
        assert err < 0.05, p


def test_the_planner_picks_a_layout_within_the_heads_and_the_cli_prints_it(capsys) -> None:
    assert parse_slice("v5p-8")[1] == 4 and parse_slice("8xh100")[1] == 8 and parse_slice("v5e-64")[1] == 64
    with pytest.raises(errors.InputError):
        parse_slice("tpu-9000")
    # Qwen2.5-7B: 28 query heads, 4 KV heads: a model axis of 8 is passed over, with the reason
    c = choose_layout("qwen2.5-7b-instruct", "decode", "v5e-8", sizes=Sizes(batch=16, seq=1, context=2048, targets=1))
    assert c.run.mesh[1] in (1, 2, 4) and c.run.fits() and c.run.backend == "tpu-deviceless"
    assert main(["plan", "--model", "qwen2.5-7b-instruct", "--slice", "v5e-8", "--stage", "decode", "--batch", "16",
                 "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert "confirm it: jaxpersona plan --model qwen2.5-7b-instruct --stage decode" in out and "serve it:" in out
    # 70B weights cannot fit 16 GiB on 8 chips at any layout
    assert main(["plan", "--model", "llama-3.3-70b-instruct", "--slice", "v5e-8", "--stage", "decode"]) == 2
    assert "no layout of decode fits v5e-8" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen3-32b", "--stage", "decode", "--mesh", "2x4"]) == 2  # no accelerator
    assert main(["plan", "--model", "qwen3-32b", "--stage", "nope", "--accelerator", "v5e"]) == 2
    assert main(["plan", "--model", "qwen2.5-7b-instruct", "--stage", "decode", "--mesh", "1x8",
                 "--accelerator", "v5e"]) == 2  # 28 query heads
    assert "attention heads (28)" in capsys.readouterr().err


def test_a_deviceless_tpu_plan_prints_no_libtpu_start_up_noise() -> None:
    """On a machine that is no TPU host, libtpu's start (for the deviceless compile) writes warnings and an
    ``E0000 ... INVALID_ARGUMENT`` line to stderr although nothing is wrong: a user of ``jaxpersona plan --slice``
    sees none of it (a fresh process: libtpu starts once per process)."""
    r = subprocess.run([sys.executable, "-m", "jaxpersona.cli", "plan", "--model", "qwen2.5-7b-instruct", "--slice",
                        "v5e-8", "--stage", "decode", "--batch", "16", "--context", "2048"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled deviceless for the TPU topology" in r.stdout
    assert r.stderr == "", r.stderr[-3000:]


def test_a_large_vocabulary_is_scored_shard_locally_under_tensor_parallelism() -> None:
    """Qwen2.5-7B's 152,064-id head, split over a model axis of 4: the sweep scores targets in strided vocabulary
    chunks, so no chunk gathers the head (contiguous chunks of a sharded vocabulary made the partitioner all-gather
    the whole [3584, 152064] head in every chunk: 1.1 GB per device per chunk)."""
    r = dry_run("qwen2.5-7b-instruct", "sweep", "2x4", "v5e", sizes=Sizes(batch=2, seq=64, grid=2, targets=16))
    gathers = [c for c in r.collectives if c.kind == "all-gather"]
    assert all(c.bytes < 2**20 for c in gathers), [(c.shapes, c.trip_counts) for c in gathers]
    assert r.bound == "compute" or r.seconds["interconnect"] < r.seconds["compute"] * 2


def test_wire_bytes_of_ring_collectives() -> None:
    from jaxpersona.model.sharding import Collective

    def c(kind: str, group: int | None) -> Collective:
        return Collective(kind, (("bf16", (1024,)),), 2048, False, None, None, group, "main", "x")

    assert wire_bytes(c("all-reduce", 4), 8) == 2 * 3 / 4 * 2048
    assert wire_bytes(c("all-gather", None), 8) == 7 / 8 * 2048  # no group stated: the model axis
    assert wire_bytes(c("reduce-scatter", 4), 8) == 3 * 2048
    assert wire_bytes(c("collective-permute", None), 1) == 2048
    assert wire_bytes(c("all-reduce", 1), 8) == 0.0


def test_a_deviceless_tpu_program_stays_out_of_the_compile_cache(small, tmp_path) -> None:
    """A deviceless TPU executable can be written to the persistent cache but not loaded back (no TPU client): with
    a cache on, two dry runs of one program warn nothing and leave no entry; the CPU programs still cache."""
    import warnings

    import jax

    from jaxpersona.compute.compiling import compile_cache

    with compile_cache(tmp_path / "xla"), warnings.catch_warnings():
        warnings.simplefilter("error")  # JAX's "Error reading persistent compilation cache entry" is a UserWarning
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # restored by compile_cache
        for _ in range(2):
            assert dry_run(small, "decode", "2x4", "v5e", sizes=SIZES["decode"]).backend == "tpu-deviceless"
        assert not list((tmp_path / "xla").glob("*-cache"))
        jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(5.0)).block_until_ready()
        assert list((tmp_path / "xla").glob("*-cache"))


def test_without_libtpu_a_tpu_target_is_a_labelled_cpu_estimate(small, monkeypatch, capsys) -> None:
    from jaxpersona.compute import aot

    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    r = dry_run(small, "decode", "1x1", "v5e", sizes=SIZES["decode"])
    assert r.backend == "cpu-estimate" and "CPU-backend estimate" in r.table()
    with pytest.raises(errors.MeshError, match="needs 8 CPU devices"):  # this process has one
        dry_run(small, "decode", "2x4", "v5e", sizes=SIZES["decode"])


def test_a_bf16_cpu_estimate_counts_the_model_dtype_not_xla_cpus_f32_copies(small) -> None:
    """XLA:CPU upcasts bf16 matmul operands to f32: the estimate compiles in f32 and scales, so a bf16 program's
    arguments are the bf16 weights + cache exactly, and its temporaries are not a second f32 copy of the weights."""
    from jaxpersona.compute.plan import param_bytes, read_config
    from jaxpersona.model.sharding import layout_for_mesh

    _, cfg = read_config(small)
    cfg, _ = layout_for_mesh(cfg, (1, 1))
    r = dry_run(small, "decode", "1x1", "h100", sizes=SIZES["decode"], dtype="bfloat16")
    kv = 2 * cfg.n_layers * 8 * cfg.n_kv_heads * 128 * cfg.head_dim * 2 + 8 * 128  # k, v in bf16 + the valid mask
    assert r.backend == "cpu-estimate"
    assert r.arguments == param_bytes(cfg, 1, 1, False, 2) + kv + 8 * 4 + 8 * 4  # + tokens [8, 1] + slots [8]
    assert r.aliased == kv and r.temporaries < param_bytes(cfg, 1, 1, False, 2)


def test_bad_sizes_are_refused_by_name(small, capsys) -> None:
    assert main(["plan", "--model", small, "--stage", "sweep", "--accelerator", "v5e", "--seq", "64",
                 "--targets", "999"]) == 2
    assert "targets (999) cannot exceed seq (64)" in capsys.readouterr().err
    assert main(["plan", "--model", small, "--stage", "decode", "--accelerator", "v5e", "--batch", "0"]) == 2
    assert "batch must be a whole number >= 1" in capsys.readouterr().err


def test_slices_smaller_than_a_host_compile_deviceless(small) -> None:
    """libtpu refuses a v5e:1x1 topology against its default 2x2x1 host: the host bounds are the slice's own."""
    for mesh in ("1x1", "1x2"):
        assert dry_run(small, "decode", mesh, "v5e", sizes=SIZES["decode"]).backend == "tpu-deviceless"
