"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=4: the serving engine on meshes (1,4) and (2,2)
— weights tensor parallel over `model`, cache rows over `data` — must give one device's tokens and
log-probs for a mix of plain, steered, capped and ablated requests joining each other mid-decode.
Prints one JSON line."""

import json
import queue

import jax
import numpy as np

from jaxpersona.model import sharding
from jaxpersona.model.config import from_hf_config
from jaxpersona.model.params import init_params
from jaxpersona.serve.engine import Engine, EngineConfig, Item, Sequence

assert jax.device_count() == 4, jax.device_count()
cfg = from_hf_config({"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
                      "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                      "tie_word_embeddings": True})
params = init_params(cfg, jax.random.key(0), scale=0.1)
rng = np.random.default_rng(0)
n = cfg.n_resid
v = rng.normal(size=(n, cfg.d_model)).astype(np.float32)
w = np.zeros(n, np.float32)
w[2] = 1.0
items = [[], [Item(v, 2.0, steer_w=w)], [Item(v, lo=np.full(n, -np.inf, np.float32), hi=np.zeros(n, np.float32), cap_w=w)],
         [Item(v, lo=np.zeros(n, np.float32), hi=np.zeros(n, np.float32), cap_w=w, positions="response")], []]
prompts = [rng.integers(3, 256, size=k).tolist() for k in (9, 9, 12, 7, 20)]
prompts[0] = prompts[1]  # plain vs steered on the same prompt


class Tok:  # the engine only needs decode()
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def serve(mesh):
    p = params if mesh is None else sharding.shard_params(params, cfg, mesh)
    eng = Engine(p, cfg, Tok(), (), 0, EngineConfig(batch=4, max_context=64, prefill_chunk=16, prefill_rows=2), mesh)
    eng.start()
    qs = []
    for i, (ids, its) in enumerate(zip(prompts, items)):
        q = queue.Queue()
        eng.submit([Sequence(0, ids, 8 + 2 * i, q, items=its, logprobs=0)])
        qs.append(q)
    out = []
    for q in qs:
        toks, lps = [], []
        while (ev := q.get(timeout=600))[0] != "done":
            if ev[3] is not None:
                toks.append(ev[3][0])
                lps.append(ev[3][1])
        out.append((toks, lps))
    eng.stop()
    return out, eng.stats["joined_running"]


ref, _ = serve(None)
res = {}
for shape in ((1, 4), (2, 2)):
    got, joined = serve(sharding.make_mesh(shape))
    res[f"{shape[0]}x{shape[1]}"] = {
        "tokens_equal": all(a[0] == b[0] for a, b in zip(got, ref)),
        "logprob": max(float(np.abs(np.subtract(a[1], b[1])).max()) for a, b in zip(got, ref)),
        "joined_running": joined}
res["steered_differs"] = ref[1][0] != ref[0][0][: len(ref[1][0])]
print(json.dumps(res))
