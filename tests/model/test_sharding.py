"""The 2-D (data, model) mesh: forward, captures, generation, sharded loading and LoRA adapters (single and
stacked, sharded beside the params) on 8 virtual CPU devices (a subprocess: the device count is fixed when JAX
starts) equal one device's, with the forward's activation constraints active (the mesh set); KV heads fewer than
the model axis are repeated (exact GQA); bad meshes are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpersona import errors
from jaxpersona.model import sharding

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mesh_equality.py"


def _run(*args: str) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


@pytest.fixture(scope="module")
def results(tiny_llama) -> list[dict]:
    return _run("llama", str(tiny_llama.path))


def test_every_mesh_gives_the_single_device_numbers(results) -> None:
    meshes = results[0]
    assert set(meshes) == {"tp1x8", "tp2x4", "tp8x1", "fsdp2x4"}
    for name, r in meshes.items():
        assert r["logits"] < 1e-4 and r["capture"] < 1e-4, (name, r)  # fp32; reductions reordered across shards
        assert r["generate_equal"], name
        assert r["devices"] == 8
        assert r["constraints"] >= 8, (name, r)  # traced under the mesh: the forward's constraints are in
    assert meshes["tp1x8"]["w_up_local_shape"] == [3, 64, 16]  # the MLP width split 8 ways
    assert meshes["fsdp2x4"]["w_up_local_shape"] == [3, 32, 32]  # d_model over data, width over model


def test_sharded_loading_reads_slices_and_equals_the_eager_load(results) -> None:
    r = results[1]["sharded_load"]
    assert r["max_param_diff"] == 0.0 and r["logits"] < 1e-4
    assert r["q_reads"] >= 1 and r["q_reads_partial"]


def test_sharded_loading_repeats_kv_heads_for_a_wider_model_axis(results) -> None:
    """The tiny llama (4 heads, 2 KV heads) loaded onto a model axis of 4: each device reads its one stored KV
    head (16 rows of k_proj) and holds it, and the logits equal the eager load's."""
    r = results[1]["sharded_load_replicated"]
    assert r["mesh"] == [2, 4] and r["n_kv_heads"] == [2, 4]
    assert r["wk_local"] == [4, 64, 16]
    assert r["k_read_rows"] == [16]
    assert r["logits"] < 1e-4


def test_kv_heads_repeated_for_a_wider_model_axis_give_the_single_device_numbers(results) -> None:
    """8 query heads, 2 KV heads on model axes 8 (r = 4) and 4 (r = 2), tensor parallel and FSDP: the params
    of the un-repeated config are refused with the way out, the repeated ones give one device's logits (fp32,
    <= 1e-4) and greedy tokens, one KV head per device."""
    kv = results[3]["kv_replication"]
    assert set(kv) == {"tp1x8", "tp2x4", "fsdp2x4"}
    assert (kv["tp1x8"]["r"], kv["tp2x4"]["r"], kv["fsdp2x4"]["r"]) == (4, 2, 2)
    for name, r in kv.items():
        assert "layout_for_mesh" in r["refused_unreplicated"] and "replicate_kv_heads" in r["refused_unreplicated"]
        assert r["logits"] <= 1e-4 and r["one_device_replicated"] <= 1e-4, (name, r)
        assert r["generate_equal"], name
        assert r["wk_local"][-1] == 16, (name, r)  # one head (head_dim 16) of k per device
    assert kv["fsdp2x4"]["wk_local"] == [3, 32, 16]  # d_model over data


def test_sweep_and_adapter_on_a_2d_mesh(results) -> None:
    r = results[2]
    assert r["sweep_2x4"]["rows"] == 2 * 2 * 4 * 2 and r["sweep_2x4"]["same_keys"]
    assert r["sweep_2x4"]["max_logprob_diff"] < 1e-5
    assert r["adapter_2x4"]["b_wq_local"] == [3, 4, 32]  # the q factor's output split over model (128 / 4)
    assert r["adapter_2x4"]["logits"] <= 1e-5


def test_adapters_beside_sharded_params_give_the_single_device_logits(results) -> None:
    """A single adapter and a stack selected per example, sharded by ``adapter_shardings`` beside params sharded by
    the tensor-parallel and FSDP rules on a (2, 4) mesh: the logits of one device (fp32, <= 1e-5), the same greedy
    tokens, and a sweep of an adapted model gives the one-device rows."""
    ads = results[2]["adapters"]
    assert set(ads) == {"tp2x4", "fsdp2x4", "sweep_2x4"}
    for name in ("tp2x4", "fsdp2x4"):
        r = ads[name]
        assert r["adapter_changes_logits"] > 1e-2, name  # the adapters do something
        assert r["logits"] <= 1e-5 and r["stack_logits"] <= 1e-5, (name, r)
        assert r["stack_generate_equal"], name
        assert r["stack_b_wq_local"] == [3, 3, 4, 32]  # [L, K, r, out]: out over model, the stack axis whole
        assert r["stack_a_wdown_local"] == [3, 3, 32, 4]  # [L, K, in, r]: the MLP width over model
    sw = ads["sweep_2x4"]
    assert sw["rows"] == 2 * 4 * 2 and sw["adapter_changes"] > 1e-3 and sw["max_logprob_diff"] < 1e-5


def test_a_broken_index_is_refused_before_reading(tiny_llama, tmp_path) -> None:
    import shutil

    from jaxpersona.model.loaders.hf import load_hf_dir_sharded

    d = tmp_path / "m"
    shutil.copytree(tiny_llama.path, d)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(errors.ModelNotFoundError, match="download every shard"):
        load_hf_dir_sharded(d, sharding.make_mesh((1, 1)))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model.safetensors", "model.ghost.weight": "model.safetensors"}}))
    with pytest.raises(errors.CorruptCheckpointError, match="disagrees with the shard files"):
        load_hf_dir_sharded(d, sharding.make_mesh((1, 1)))


def test_bad_meshes(tiny_llama) -> None:
    cfg = tiny_llama.cfg
    with pytest.raises(errors.MeshError, match="needs 64 devices"):
        sharding.make_mesh("8x8")
    with pytest.raises(errors.MeshError, match="DATAxMODEL"):
        sharding.make_mesh("two-by-four")
    with pytest.raises(errors.MeshError, match=r"does not divide the attention heads \(4\).*fit.*: 1, 2, 4$"):
        sharding.check_divisible(cfg, 8)
    sharding.check_divisible(cfg, 4)  # 2 KV heads on 4: repeated (layout_for_mesh)
    with pytest.raises(errors.MeshError, match="FSDP"):
        sharding.check_divisible(cfg, 1, data_axis=7, fsdp=True)


def test_weights_that_do_not_fit_a_device_are_refused_before_reading(tiny_llama, monkeypatch) -> None:
    import jax

    from jaxpersona.model.loaders import hf

    mesh = sharding.make_mesh((1, 1))
    reads = []
    monkeypatch.setattr(hf, "_free_bytes", lambda dev: 1000)  # a device with 1000 bytes free
    with pytest.raises(errors.MemoryPlanError, match="per device"):
        hf.load_hf_dir_sharded(tiny_llama.path, mesh, read_log=reads)
    assert reads == []  # refused before a single slice was read
    monkeypatch.setattr(hf, "_free_bytes", lambda dev: None)  # the CPU: no limit reported
    cfg, params = hf.load_hf_dir_sharded(tiny_llama.path, mesh, read_log=reads)
    assert reads and jax.tree.leaves(params)[0].shape[0] > 0
