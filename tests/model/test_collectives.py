"""The collectives of sharded programs, read from the compiled HLO (``sharding.collectives``), and the meshes a
config fits (KV heads repeated when the model axis exceeds them).

On 8 virtual CPU devices (a subprocess, tests/scripts/collectives.py; the device count is fixed when JAX
starts), with the mesh set so the forward's activation constraints act, a tiny llama-like model (4 layers,
d_model 64, 8 heads, 4 KV heads) is compiled on meshes 2x4 and 1x8 (tensor parallel; 1x8 repeats each KV head
twice) and 2x4 FSDP: its forward, a full-parameter training step and a LoRA training step (``value_and_grad``
of a token cross-entropy through ``final_hidden(remat=True)``). Measured on XLA:CPU (jax 0.10):

* forward, per layer (inside the layer scan's while body): exactly two all-reduces of
  ``[tokens per data shard, d_model]`` (after the attention output and after the MLP down-projection), bytes =
  tokens_per_data_shard * d_model * 4; outside the scan one more, the embedding lookup (vocabulary over model).
  Tensor parallel: no all-gather, no all-to-all. FSDP: one all-gather per weight matrix per layer (7, over
  data, each to its tensor-parallel shard), the embedding table and LM head gathered once outside the scan.
* training step: the forward scan as above; the backward scan has five activation all-reduces per layer (the
  input gradients of q, k, v and of gate, up: column-parallel matmuls give partial sums, and XLA reduces each
  of the five instead of their sum; it combines them into two ops) plus, with a data axis > 1, one combined
  all-reduce over data of the layer's weight gradients (per-device shard bytes). FSDP gathers each weight again
  in the backward scan (7 more per layer) and reduces the weight gradients with an all-reduce over data of the
  tensor-parallel shard (XLA:CPU forms no reduce-scatter).
* without the mesh set, propagation alone lays FSDP activations out with the batch whole (collectives over
  the full batch, all-to-alls): the constraints are what make the layout above.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jaxpersona import errors
from jaxpersona.model import sharding
from jaxpersona.model.config import ModelConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "collectives.py"
N_WEIGHTS = 7  # wq wk wv wo w_gate w_up w_down


@pytest.fixture(scope="module")
def measured() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("{")))


def numel(shape: list) -> int:
    n = 1
    for d in shape[1]:
        n *= d
    return n


def activation_reductions(cs: list[dict], tokens: int, d_model: int, itemsize: int) -> list[int]:
    """Bytes of each all-reduce-equivalent of a ``[tokens, d_model]`` activation among ``cs``: an all-reduce's
    array of that size, or a reduce-scatter to ``1/group`` of it (paired with an all-gather back)."""
    out = []
    for c in cs:
        for shape in c["shapes"]:
            n = numel(shape)
            if c["kind"] == "all-reduce" and n == tokens * d_model:
                out.append(n * itemsize)
            elif c["kind"] == "reduce-scatter" and c["group"] and n * c["group"] == tokens * d_model:
                out.append(n * c["group"] * itemsize)
    return out


def by_loop(cs: list[dict]) -> dict[str | None, list[dict]]:
    loops: dict[str | None, list[dict]] = {}
    for c in cs:
        loops.setdefault(c["loop"], []).append(c)
    return loops


@pytest.mark.parametrize("tag", ["tp2x4", "tp1x8", "fsdp2x4"])
def test_forward_has_two_activation_all_reduces_per_layer(measured, tag) -> None:
    m = measured[tag]
    tokens, d, item, (data, model) = m["tokens_per_data_shard"], m["d_model"], m["itemsize"], m["mesh"]
    formula = tokens * d * item
    fwd = m["forward"]
    loops = by_loop(fwd)
    assert set(loops) - {None} and len(set(loops) - {None}) == 1, loops.keys()  # one scan: the layers
    body = loops[next(k for k in loops if k is not None)]
    assert {c["trips"] for c in body} == {m["n_layers"]}
    red = activation_reductions(body, tokens, d, item)
    assert len(red) == 2, body
    assert all(abs(b - formula) <= 0.1 * formula for b in red), (red, formula)
    assert sum(c["bytes"] for c in body if c["kind"] == "all-reduce") <= 1.1 * 2 * formula
    assert all(c["group"] == model for c in body if c["kind"] == "all-reduce")
    assert not [c for c in fwd if c["kind"] in ("all-to-all", "collective-permute", "ragged-all-to-all")], fwd
    outside = loops.get(None, [])
    assert [c["kind"] for c in outside if c["kind"] != "all-gather"] == ["all-reduce"]  # the embedding lookup
    lookup = next(c for c in outside if c["kind"] == "all-reduce")
    assert lookup["shapes"] == [["f32", [8 // data, 24, d]]] and lookup["bytes"] == formula
    gathers = [c for c in fwd if c["kind"] == "all-gather"]
    if tag.startswith("tp"):
        assert gathers == []  # no weight is gathered without FSDP
    else:  # each weight matrix once per layer, to its tensor-parallel shard (d_model whole)
        inside = [c for c in gathers if c["in_loop"]]
        assert len(inside) == N_WEIGHTS and all(c["group"] == data for c in inside)
        want = Counter(tuple(s) for s in measured["tp2x4"]["weights"].values())
        assert Counter(tuple(c["shapes"][0][1]) for c in inside) == want
        top = sorted(tuple(c["shapes"][0][1]) for c in gathers if not c["in_loop"])
        assert top == [(64, 64), (64, 64)]  # the embedding table [V/4, D] and the LM head [D, V/4], once


@pytest.mark.parametrize("tag", ["tp2x4", "tp1x8", "fsdp2x4"])
@pytest.mark.parametrize("step", ["train_full", "train_lora"])
def test_training_step_collectives(measured, tag, step) -> None:
    m = measured[tag]
    tokens, d, item, (data, model) = m["tokens_per_data_shard"], m["d_model"], m["itemsize"], m["mesh"]
    formula = tokens * d * item
    cs = m[step]
    loops = {k: v for k, v in by_loop(cs).items() if k is not None}
    assert len(loops) == 2, loops.keys()  # the forward scan and the backward scan
    counts = sorted((len(activation_reductions(v, tokens, d, item)), k) for k, v in loops.items())
    assert [n for n, _ in counts] == [2, 5], counts  # forward: 2; backward: q, k, v and gate, up input grads
    fwd_loop, bwd_loop = loops[counts[0][1]], loops[counts[1][1]]
    for c in fwd_loop + bwd_loop:
        assert c["trips"] == m["n_layers"]
    assert not [c for c in cs if c["kind"] in ("all-to-all", "collective-permute", "ragged-all-to-all")]
    grads = [c for c in bwd_loop if c["kind"] == "all-reduce" and c["group"] == data and data > 1]
    if data > 1:  # one combined all-reduce over data of this layer's gradients (its per-device shard)
        assert len(grads) == 1, bwd_loop
        if step == "train_full":
            local = sum(numel(["f32", s]) for s in measured["tp2x4"]["weights"].values()) + 2 * d  # + 2 norms
            assert grads[0]["bytes"] == local * item
        else:  # the adapter's factors only: far below one activation
            assert grads[0]["bytes"] < formula
    else:
        assert [c for c in cs if c["group"] == data] == []
    gathers = [c for c in cs if c["kind"] == "all-gather"]
    if tag.startswith("tp"):
        assert gathers == []
    else:  # ZeRO-3: every weight gathered in the forward scan and again in the backward scan
        assert len([c for c in fwd_loop if c["kind"] == "all-gather"]) == N_WEIGHTS
        assert len([c for c in bwd_loop if c["kind"] == "all-gather"]) == N_WEIGHTS


def test_kv_heads_repeated_on_1x8_add_no_collective(measured) -> None:
    m = measured["tp1x8"]
    assert (m["r"], m["n_kv_heads"]) == (2, 8) and m["weights"]["wk"] == [64, 16]  # one KV head per device
    assert m["logits_sharding"] == "P(None, None, 'model')"  # data axis 1; vocabulary over model


def test_without_the_mesh_fsdp_activations_are_laid_out_otherwise(measured) -> None:
    """The control: the same FSDP forward compiled without ``jax.set_mesh`` (propagation only) reduces over the
    whole batch and moves data with all-to-alls; the constraints are what give the layout above."""
    fwd = measured["fsdp2x4_without_mesh"]["forward"]
    m = measured["fsdp2x4"]
    body = [c for c in fwd if c["in_loop"]]
    assert len(activation_reductions(body, m["tokens_per_data_shard"], m["d_model"], 4)) != 2
    assert Counter(c["kind"] for c in fwd) != Counter(c["kind"] for c in m["forward"])


def test_an_odd_batch_is_left_to_propagation(measured) -> None:
    r = measured["odd_batch_2x4"]
    assert r["logits"] < 1e-5
    assert "data" not in r["sharding"]  # 3 rows over a data axis of 2: batch not constrained


# --- the HLO reader on forms XLA:CPU does not print (async pairs, reduce-scatter, nested loops) ----------------
HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  %y = f32[4,8]{1,0} get-tuple-element(%q), index=1
  %a2a = f32[4,8]{1,0} all-to-all(%y), replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %a2a)
}

%inner_cond (q: (s32[], f32[4,8])) -> pred[] {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%body (p: (s32[], bf16[16,32])) -> (s32[], bf16[16,32]) {
  %p = (s32[], bf16[16,32]{1,0}) parameter(0)
  %x = bf16[16,32]{1,0} get-tuple-element(%p), index=1
  %ars = bf16[16,32]{1,0} all-reduce-start(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %ard = bf16[16,32]{1,0} all-reduce-done(%ars)
  %rs = bf16[4,32]{1,0} reduce-scatter(%ard), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %ags = (bf16[4,32]{1,0}, bf16[16,32]{1,0}) all-gather-start(%rs), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = bf16[16,32]{1,0} all-gather-done(%ags)
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%inner_cond, body=%inner_body
  ROOT %t = (s32[], bf16[16,32]{1,0}) tuple(%i, %agd)
}

%cond (p: (s32[], bf16[16,32])) -> pred[] {
  %p = (s32[], bf16[16,32]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main () -> f32[] {
  %w0 = (s32[], bf16[16,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"80"}}
  %g = (f32[2,3]{1,0}, f32[5]{0}) all-reduce(%u, %v), replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_reads_async_pairs_tuples_and_nested_loops() -> None:
    cs = sharding.collectives(HLO)
    got = [(c.kind, c.shapes, c.bytes, c.in_loop, c.loop, c.trips, c.group_size) for c in cs]
    assert got == [
        ("all-to-all", (("f32", (4, 8)),), 128, True, "body", 80, 4),  # nested: claimed by the outer scan
        ("all-reduce", (("bf16", (16, 32)),), 1024, True, "body", 80, 4),  # the -done, with the -start's groups
        ("reduce-scatter", (("bf16", (4, 32)),), 256, True, "body", 80, 4),
        ("all-gather", (("bf16", (16, 32)),), 1024, True, "body", 80, 4),
        ("all-reduce", (("f32", (2, 3)), ("f32", (5,))), 44, False, None, None, 2),
    ]


# --- which meshes a config fits --------------------------------------------------------------------------------
def _cfg(family: str, d: int, layers: int, heads: int, kv: int, ff: int, vocab: int) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                       head_dim=128, d_ff=ff, max_position=32768)


QWEN25_7B = _cfg("qwen2", 3584, 28, 28, 4, 18944, 152064)
LLAMA33_70B = _cfg("llama", 8192, 80, 64, 8, 28672, 128256)


def test_qwen25_7b_is_refused_on_a_model_axis_of_8_naming_what_fits() -> None:
    for call in (lambda: sharding.check_divisible(QWEN25_7B, 8), lambda: sharding.kv_replication(QWEN25_7B, 8),
                 lambda: sharding.layout_for_mesh(QWEN25_7B, (2, 8))):
        with pytest.raises(errors.MeshError, match=r"model axis \(8\) does not divide the attention heads \(28\);"
                                                   r" model-axis sizes that fit .*: 1, 2, 4$"):
            call()
    assert sharding.fitting_model_axes(QWEN25_7B) == [1, 2, 4]  # 7, 14, 28 would split the MLP width 18944
    assert [sharding.kv_replication(QWEN25_7B, m) for m in (1, 2, 4)] == [1, 1, 1]


def test_a_model_axis_neither_dividing_nor_a_multiple_of_the_kv_heads_is_refused() -> None:
    cfg = _cfg("llama", 768, 2, 12, 4, 3072, 32064)
    with pytest.raises(errors.MeshError, match=r"\(6\) neither divides the kv heads \(4\) nor is a multiple"
                                               r".*: 1, 2, 4, 12$"):
        sharding.kv_replication(cfg, 6)


def test_llama33_70b_on_a_4x16_mesh_repeats_each_kv_head_twice() -> None:
    import jax

    from jaxpersona.model.params import param_shapes

    sharding.check_divisible(LLAMA33_70B, 16, 4, fsdp=True)
    assert sharding.kv_replication(LLAMA33_70B, 16) == 2 and sharding.kv_replication(LLAMA33_70B, 8) == 1
    used, r = sharding.layout_for_mesh(LLAMA33_70B, "4x16", fsdp=True)
    assert r == 2 and used.n_kv_heads == 16 and used.n_heads == 64
    mesh = jax.sharding.AbstractMesh((4, 16), ("data", "model"))  # shardings planned without 64 devices
    with pytest.raises(errors.MeshError, match="layout_for_mesh"):
        sharding.param_shardings(LLAMA33_70B, mesh, sharding.FSDP)
    shapes = param_shapes(used)
    sh = sharding.param_shardings(used, mesh, sharding.FSDP)
    assert sh["layers"]["wk"].shard_shape(shapes["layers"]["wk"]) == (80, 2048, 128)  # one KV head per device
    assert sh["layers"]["wq"].shard_shape(shapes["layers"]["wq"]) == (80, 2048, 512)
    assert sharding.kv_cache_sharding(mesh).shard_shape((80, 8, 16, 4096, 128)) == (80, 2, 1, 4096, 128)
    assert sharding.per_device_bytes(shapes, sh, 2) < 2.2 * 2**30  # bf16 weights per device


def test_repeated_kv_heads_are_exact_gqa_on_one_device() -> None:
    """Each KV head repeated ``r`` times in a row keeps query head ``i`` on original KV head ``i // (H / KV)``:
    the logits are unchanged; tiling the heads instead (``[0, 1, 0, 1]``) would change them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpersona.model.config import from_hf_config
    from jaxpersona.model.params import init_params
    from jaxpersona.model.transformer import forward

    cfg = from_hf_config({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                          "head_dim": 8, "max_position_embeddings": 64, "attention_bias": True})
    params = init_params(cfg, jax.random.key(0), scale=0.2)
    params["layers"]["bk"] = params["layers"]["bk"] + 0.3
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    ref = forward(params, cfg, tokens).logits
    cfg2, p2 = sharding.replicate_kv_heads(cfg, params, 2)
    assert cfg2.n_kv_heads == 4 and p2["layers"]["wk"].shape == (2, 32, 32)
    assert float(jnp.abs(forward(p2, cfg2, tokens).logits - ref).max()) < 1e-5
    tiled = {**p2, "layers": {**p2["layers"], "wk": jnp.tile(params["layers"]["wk"], (1, 1, 2))}}
    assert float(jnp.abs(forward(tiled, cfg2, tokens).logits - ref).max()) > 1e-3
    np_cfg, np_p = sharding.replicate_kv_heads(cfg, jax.tree.map(np.asarray, params), 4)
    assert np_cfg.n_kv_heads == 8 and isinstance(np_p["layers"]["bv"], np.ndarray)
    assert sharding.replicate_kv_heads(cfg, params, 1) == (cfg, params)
    with pytest.raises(errors.MeshError, match="multiple of 6"):
        sharding.replicate_kv_heads(cfg, params, 3)


def test_constrain_acts_only_under_a_data_model_mesh() -> None:
    """No mesh (or one without ``data`` / ``model`` axes): the forward traces to the program it always was;
    under ``jax.set_mesh`` of a ``(data, model)`` mesh the constraints are in it."""
    import jax
    import jax.numpy as jnp

    from jaxpersona.model.config import from_hf_config
    from jaxpersona.model.params import init_params
    from jaxpersona.model.transformer import forward

    cfg = from_hf_config({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "head_dim": 8, "max_position_embeddings": 64})
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 5), jnp.int32)

    def text() -> str:
        return str(jax.make_jaxpr(lambda p, t: forward(p, cfg, t).logits)(params, tokens))

    plain = text()
    assert "sharding_constraint" not in plain
    with jax.set_mesh(jax.make_mesh((1,), ("batch",), devices=jax.devices()[:1])):
        assert "sharding_constraint" not in text()  # a mesh without data / model axes
    with jax.set_mesh(sharding.make_mesh((1, 1))):
        assert text().count("sharding_constraint") >= 8
    x = jnp.ones((3, 4))
    assert sharding.constrain(x, "batch", "embed") is x
