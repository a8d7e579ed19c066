"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: compile a tiny llama-like model's forward, a
full-parameter training step and a LoRA training step on (data, model) meshes with the mesh set (so the
forward's activation constraints act), and print one JSON line: per case the collectives of the compiled
HLO (``sharding.collectives``) and the sizes the test compares them with."""

import contextlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona.model import sharding
from jaxpersona.model.config import from_hf_config
from jaxpersona.model.lora import LoraConfig, init_adapter
from jaxpersona.model.params import init_params
from jaxpersona.model.transformer import final_hidden, forward, token_logprobs

assert jax.device_count() == 8, jax.device_count()
hf = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
      "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "max_position_embeddings": 128,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
base_cfg = from_hf_config(hf)
base_params = init_params(base_cfg, jax.random.key(0), scale=0.1)
B, T = 8, 24
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, T)), jnp.int32)
valid = jnp.ones((B, T), bool)
no_mesh = "--no-mesh" in sys.argv  # the same programs compiled without jax.set_mesh (propagation only)


def loss(params, cfg, t, v, adapter=None):
    h = final_hidden(params, cfg, t, v, adapter=adapter, remat=True)
    return -token_logprobs(params, cfg, h[:, :-1], t[:, 1:]).mean()


def describe(cs):
    return [{"kind": c.kind, "shapes": [[dt, list(d)] for dt, d in c.shapes], "bytes": c.bytes, "in_loop": c.in_loop,
             "loop": c.loop, "trips": c.trips, "group": c.group_size} for c in cs]


out = {}
for tag, shape, rules in [("tp2x4", (2, 4), sharding.TENSOR_PARALLEL), ("tp1x8", (1, 8), sharding.TENSOR_PARALLEL),
                          ("fsdp2x4", (2, 4), sharding.FSDP)]:
    mesh = sharding.make_mesh(shape)
    cfg, r = sharding.layout_for_mesh(base_cfg, mesh, fsdp=rules is sharding.FSDP)
    cfg, params = sharding.replicate_kv_heads(base_cfg, base_params, r)
    p = sharding.shard_params(params, cfg, mesh, rules)
    bs = sharding.spec(mesh, "batch", "seq")
    t, v = jax.device_put(tokens, bs), jax.device_put(valid, bs)
    ad = init_adapter(cfg, LoraConfig(rank=4), jax.random.key(1))
    ctx = contextlib.nullcontext() if no_mesh else jax.set_mesh(mesh)
    with ctx:
        fwd = jax.jit(lambda p, t, v: forward(p, cfg, t, valid=v).logits).lower(p, t, v).compile().as_text()
        full = jax.jit(jax.value_and_grad(lambda p, t, v: loss(p, cfg, t, v))).lower(p, t, v).compile().as_text()
        lora = jax.jit(jax.value_and_grad(lambda a, p, t, v: loss(p, cfg, t, v, a))).lower(ad, p, t, v).compile()
        lora = lora.as_text()
        logits = jax.jit(lambda p, t, v: forward(p, cfg, t, valid=v).logits)(p, t, v)
    out[tag] = {
        "mesh": list(shape), "r": r, "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
        "tokens_per_data_shard": B * T // shape[0], "itemsize": 4,
        "logits_sharding": str(logits.sharding.spec),
        "weights": {k: list(a.sharding.shard_shape(a.shape)[1:]) for k, a in p["layers"].items() if a.ndim == 3},
        "forward": describe(sharding.collectives(fwd)), "train_full": describe(sharding.collectives(full)),
        "train_lora": describe(sharding.collectives(lora)),
        "hlo_has_while": [" while(" in x for x in (fwd, full, lora)]}

# controls: the FSDP forward compiled without the mesh set (propagation alone picks the activation layout), and
# an odd batch (3 rows: the data axis of 2 does not divide it, so batch is left unconstrained) on a 2x4 mesh
mesh = sharding.make_mesh((2, 4))
p = sharding.shard_params(base_params, base_cfg, mesh, sharding.FSDP)
t = jax.device_put(tokens, sharding.spec(mesh, "batch", "seq"))
fwd = jax.jit(lambda p, t: forward(p, base_cfg, t).logits)
out["fsdp2x4_without_mesh"] = {"forward": describe(sharding.collectives(fwd.lower(p, t).compile().as_text()))}
one = fwd(base_params, tokens[:3])
with jax.set_mesh(mesh):
    odd = fwd(sharding.shard_params(base_params, base_cfg, mesh), tokens[:3])
out["odd_batch_2x4"] = {"logits": float(jnp.abs(odd - one).max()), "sharding": str(odd.sharding.spec)}
print(json.dumps(out))
