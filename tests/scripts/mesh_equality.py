"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: the forward (logits, captures), greedy
generation and a sweep's rows on meshes (1,8), (2,4), (8,1) (tensor parallel) and (2,4) FSDP must
equal one device's; so must a LoRA adapter and a stack of adapters selected per example (sharded with
``adapter_shardings`` beside the sharded params) on a (2,4) mesh. The mesh runs are traced under
``jax.set_mesh(mesh)``, so the forward's activation constraints act (counted in the lowered program). A model
with 2 KV heads and 8 query heads on model axes 4 and 8 (KV heads repeated by ``layout_for_mesh`` /
``replicate_kv_heads``, and by the sharded loader) gives the one-device logits and tokens too. Prints JSON lines
with the max differences."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona.model import sharding
from jaxpersona.model.config import from_hf_config
from jaxpersona.compute.generate import generate
from jaxpersona.model.transformer import Capture, forward
from jaxpersona.model.params import init_params

assert jax.device_count() == 8, jax.device_count()
family = sys.argv[1] if len(sys.argv) > 1 else "llama"
hf = {"model_type": family, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
      "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 16, "max_position_embeddings": 128,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": family != "qwen2"}
if family == "qwen2":
    hf["use_sliding_window"] = False
cfg = from_hf_config(hf)
params = init_params(cfg, jax.random.key(0), scale=0.1)
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, 256, (8, 12)), jnp.int32)
valid = jnp.asarray(np.arange(12)[None, :] >= rng.integers(0, 6, (8, 1)))
cap = Capture((0, 2, 3), "mean")


@jax.jit
def run(p, t, v):
    out = forward(p, cfg, t, valid=v, capture=cap)
    return out.logits, out.captured


ref_logits, ref_cap = run(params, tokens, valid)
ref_gen = generate(params, cfg, tokens, valid, max_new_tokens=6, pad_id=0).tokens
res = {}
for shape, rules, tag in [((1, 8), sharding.TENSOR_PARALLEL, "tp"), ((2, 4), sharding.TENSOR_PARALLEL, "tp"),
                          ((8, 1), sharding.TENSOR_PARALLEL, "tp"), ((2, 4), sharding.FSDP, "fsdp")]:
    mesh = sharding.make_mesh(shape)
    p = sharding.shard_params(params, cfg, mesh, rules)
    bs = sharding.spec(mesh, "batch", "seq", rules=rules)
    t, v = jax.device_put(tokens, bs), jax.device_put(valid, bs)
    with jax.set_mesh(mesh):  # the forward's activation constraints act
        constraints = run.lower(p, t, v).as_text().count("sharding_constraint")
        logits, captured = run(p, t, v)
        gen = generate(p, cfg, t, v, max_new_tokens=6, pad_id=0).tokens
    n_shards = len({d.id for d in p["layers"]["wq"].sharding.device_set})
    local = p["layers"]["w_up"].addressable_shards[0].data.shape
    res[f"{tag}{shape[0]}x{shape[1]}"] = {"constraints": constraints,
        "logits": float(jnp.abs(logits - ref_logits).max()), "capture": float(jnp.abs(captured - ref_cap).max()),
        "generate_equal": bool(np.array_equal(np.asarray(gen), np.asarray(ref_gen))), "devices": n_shards,
        "w_up_local_shape": list(local)}
print(json.dumps(res))

def replicated_load(path, cfg2, logits_e):
    """Load onto a model axis of 2x the KV heads (a 2x4 or 1x8 mesh): KV heads repeated while reading."""
    from jaxpersona.model.loaders.hf import load_hf_dir_sharded

    model_axis = 2 * cfg2.n_kv_heads
    mesh = sharding.make_mesh((8 // model_axis, model_axis))
    log = []
    cfg3, sharded = load_hf_dir_sharded(path, mesh, read_log=log)
    k_reads = [idx for name, idx in log if name.endswith("layers.0.self_attn.k_proj.weight")]
    with jax.set_mesh(mesh):
        logits_s = jax.jit(lambda p: forward(p, cfg3, tokens % cfg3.vocab_size, valid=valid).logits)(sharded)
    return {"mesh": [8 // model_axis, model_axis], "n_kv_heads": [cfg2.n_kv_heads, cfg3.n_kv_heads],
            "wk_local": list(sharded["layers"]["wk"].addressable_shards[0].data.shape),
            "k_read_rows": sorted({(s.stop or 0) - (s.start or 0) for s, _ in k_reads}),
            "logits": float(jnp.abs(logits_e - logits_s).max())}


# sharded loading of an HF directory (argv[2]): values equal the eager load; sharded weights are read in slices
if len(sys.argv) > 2:
    from jaxpersona.model.loaders.hf import load_hf_dir, load_hf_dir_sharded

    cfg2, eager = load_hf_dir(sys.argv[2])
    model_axis = 2 if cfg2.n_kv_heads % 2 == 0 else 1
    mesh = sharding.make_mesh((8 // model_axis, model_axis))
    log = []
    cfg3, sharded = load_hf_dir_sharded(sys.argv[2], mesh, read_log=log)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(sharded)))
    q_reads = [idx for name, idx in log if name.endswith("layers.0.self_attn.q_proj.weight")]
    full_rows = cfg2.n_heads * cfg2.head_dim
    partial = all((s.stop - s.start if s.stop is not None else full_rows) < full_rows for s, _ in q_reads)
    logits_e = forward(eager, cfg2, tokens % cfg2.vocab_size, valid=valid).logits
    logits_s = jax.jit(lambda p: forward(p, cfg2, tokens % cfg2.vocab_size, valid=valid).logits)(sharded)
    print(json.dumps({"sharded_load": {"max_param_diff": diff, "q_reads": len(q_reads), "q_reads_partial": partial,
                                       "logits": float(jnp.abs(logits_e - logits_s).max()),
                                       "mesh": [8 // model_axis, model_axis]},
                      "sharded_load_replicated": replicated_load(sys.argv[2], cfg2, logits_e)}))

# a sweep (grid over data, weights over model) and a LoRA adapter restored into shards, on a 2x4 mesh
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import testpath  # noqa: E402,F401
import tempfile  # noqa: E402

from jaxpersona.model.lora import LoraConfig, init_adapter, stack_adapters
from jaxpersona.artifacts.adapters import load_adapter, save_adapter, shard_adapter
from jaxpersona.compute.handle import Model
from jaxpersona.compute.sweep import Grid, run_sweep
from jaxpersona.compute.scoring import ScoringSet
from test_pipeline import full_word_tokenizer  # noqa: E402

model = Model(cfg, params, full_word_tokenizer(), "mesh-test")
grid = Grid("steer", rng.normal(size=(2, cfg.d_model)).astype(np.float32), ("a", "b"), (1, 2), (0.0, 2.0, -1.0, 4.0))
data = ScoringSet(("hello world", "what is the capital of france ?"), ("paris .", "the mat"))
one = run_sweep(model, grid, data, progress=False)
two = run_sweep(model, grid, data, mesh=sharding.make_mesh((2, 4)), progress=False)
ad = init_adapter(cfg, LoraConfig(rank=4), jax.random.key(3))
ad = type(ad)(ad.a, {t: b + 0.05 for t, b in ad.b.items()}, ad.scale)
ad2 = init_adapter(cfg, LoraConfig(rank=2, alpha=3.0, targets=("q", "o", "down")), jax.random.key(4))
ad2 = type(ad2)(ad2.a, {t: b - 0.04 for t, b in ad2.b.items()}, ad2.scale)
stack = stack_adapters([None, ad, ad2], cfg)
select = jnp.asarray([2, 0, 1, 2, 1, 0, 2, 1], jnp.int32)  # the adapter of each example


@jax.jit
def adapted(p, a, sel):
    return forward(p, cfg, tokens, valid=valid, adapter=a, adapter_select=sel).logits


one_ad, one_stack = adapted(params, ad, None), adapted(params, stack, select)
one_gen = generate(params, cfg, tokens, valid, max_new_tokens=6, pad_id=0, adapter=stack, adapter_select=select).tokens
adapters = {}
with tempfile.TemporaryDirectory() as d:
    save_adapter(f"{d}/ad", ad, cfg, LoraConfig(rank=4))
    for shape, rules, tag in [((2, 4), sharding.TENSOR_PARALLEL, "tp"), ((2, 4), sharding.FSDP, "fsdp")]:
        mesh = sharding.make_mesh(shape)
        p = sharding.shard_params(params, cfg, mesh, rules)
        sad = load_adapter(f"{d}/ad", cfg, mesh=mesh)[0] if tag == "tp" else shard_adapter(ad, cfg, mesh, rules)
        sst = shard_adapter(stack, cfg, mesh, rules)
        bs = sharding.spec(mesh, "batch", "seq", rules=rules)
        t, v = jax.device_put(tokens, bs), jax.device_put(valid, bs)
        sel = jax.device_put(select, sharding.spec(mesh, "batch", rules=rules))
        gen = generate(p, cfg, t, v, max_new_tokens=6, pad_id=0, adapter=sst, adapter_select=sel).tokens
        adapters[f"{tag}{shape[0]}x{shape[1]}"] = {
            "b_wq_local": list(sad.b["q"].addressable_shards[0].data.shape),
            "stack_b_wq_local": list(sst.b["q"].addressable_shards[0].data.shape),
            "stack_a_wdown_local": list(sst.a["down"].addressable_shards[0].data.shape),
            "logits": float(jnp.abs(one_ad - adapted(p, sad, None)).max()),
            "stack_logits": float(jnp.abs(one_stack - adapted(p, sst, sel)).max()),
            "stack_generate_equal": bool(np.array_equal(np.asarray(gen), np.asarray(one_gen))),
            "adapter_changes_logits": float(jnp.abs(one_ad - ref_logits).max())}
tuned = model.with_adapter(ad)  # a sweep of an adapted model: the adapter is sharded beside the params
small = Grid("steer", grid.vectors, grid.names, (1,), (0.0, 2.0, -1.0, 4.0))
ad_one = run_sweep(tuned, small, data, progress=False)
ad_two = run_sweep(tuned, small, data, mesh=sharding.make_mesh((2, 4)), progress=False)
base_rows = run_sweep(model, small, data, progress=False)
adapters["sweep_2x4"] = {"max_logprob_diff": max(abs(a["logprob"] - b["logprob"]) for a, b in zip(ad_one, ad_two)),
                         "rows": len(ad_two),
                         "adapter_changes": max(abs(a["logprob"] - b["logprob"]) for a, b in zip(ad_one, base_rows))}
print(json.dumps({"sweep_2x4": {"rows": len(two), "same_keys": [
    {k: v for k, v in a.items() if k != "logprob"} for a in one] == [{k: v for k, v in b.items() if k != "logprob"}
                                                                      for b in two],
    "max_logprob_diff": max(abs(a["logprob"] - b["logprob"]) for a, b in zip(one, two))},
    "adapter_2x4": adapters["tp2x4"], "adapters": adapters}))

# KV heads fewer than the model axis: 2 KV heads, 8 query heads, on model axes 4 and 8 (each KV head repeated
# r = model / 2 times): the one-device logits and greedy tokens
from jaxpersona import errors  # noqa: E402

hf_kv = {**hf, "num_key_value_heads": 2}
cfg_kv = from_hf_config(hf_kv)
params_kv = init_params(cfg_kv, jax.random.key(5), scale=0.1)
run_kv = jax.jit(lambda p, c, t, v: forward(p, c, t, valid=v).logits, static_argnums=1)
ref_logits_kv = run_kv(params_kv, cfg_kv, tokens, valid)
ref_gen_kv = generate(params_kv, cfg_kv, tokens, valid, max_new_tokens=6, pad_id=0).tokens
kv = {}
for shape, rules, tag in [((1, 8), sharding.TENSOR_PARALLEL, "tp"), ((2, 4), sharding.TENSOR_PARALLEL, "tp"),
                          ((2, 4), sharding.FSDP, "fsdp")]:
    mesh = sharding.make_mesh(shape)
    try:
        sharding.param_shardings(cfg_kv, mesh, rules)
        refused = ""
    except errors.MeshError as e:
        refused = str(e)
    cfg_r, r = sharding.layout_for_mesh(cfg_kv, mesh, fsdp=rules is sharding.FSDP)
    cfg_r, params_r = sharding.replicate_kv_heads(cfg_kv, params_kv, r)
    p = sharding.shard_params(params_r, cfg_r, mesh, rules)
    bs = sharding.spec(mesh, "batch", "seq", rules=rules)
    t, v = jax.device_put(tokens, bs), jax.device_put(valid, bs)
    with jax.set_mesh(mesh):
        logits = run_kv(p, cfg_r, t, v)
        gen = generate(p, cfg_r, t, v, max_new_tokens=6, pad_id=0).tokens
    one = run_kv(params_r, cfg_r, tokens, valid)  # the replicated model on one device
    kv[f"{tag}{shape[0]}x{shape[1]}"] = {
        "r": r, "n_kv_heads": cfg_r.n_kv_heads, "refused_unreplicated": refused,
        "wk_local": list(p["layers"]["wk"].addressable_shards[0].data.shape),
        "logits": float(jnp.abs(logits - ref_logits_kv).max()), "one_device_replicated": float(
            jnp.abs(one - ref_logits_kv).max()),
        "generate_equal": bool(np.array_equal(np.asarray(gen), np.asarray(ref_gen_kv)))}
print(json.dumps({"kv_replication": kv}))
