"""One process of a multi-process LoRA training step: ``python multiprocess_train.py NPROC PID PORT HF_DIR OUT``
(PID -1: the single-process reference, no mesh). The trainer's loss (:func:`jaxpersona.compute.train.loss_terms`,
with a preventative steer) and its AdamW (:func:`~jaxpersona.compute.train.make_optimizer`), jitted with the
params sharded by :func:`jaxpersona.model.sharding.shard_params` on a ``(data = every device of every process,
model = 1)`` mesh and the batch split over ``data``: each process builds only the rows of its own devices
(``jax.make_array_from_callback``). Every process writes ``OUT.pPID.json`` (the batch rows it built); process 0
(or the reference) also writes the loss, and ``OUT.npz`` with the gradients and the updated adapter factors."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import testpath  # noqa: E402,F401

nproc, pid, port, hf_dir, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if pid >= 0:
    from jaxpersona.model.sharding import init_distributed

    init_distributed(f"127.0.0.1:{port}", nproc, pid)

import jax
import numpy as np
import optax

from jaxpersona.artifacts.adapters import adapter_shardings
from jaxpersona.compute.handle import Model
from jaxpersona.compute.train import TrainConfig, encode_examples, loss_terms, make_optimizer
from jaxpersona.edit import interventions as iv
from jaxpersona.model import sharding
from jaxpersona.model.lora import init_adapter
from jaxpersona.model.loaders.hf import load_hf_dir
from conftest import WORDS
from test_pipeline import full_word_tokenizer

BATCH = 16  # 2 rows per device on 8 devices
cfg, params = load_hf_dir(hf_dir)
params = jax.tree.map(np.asarray, params)  # host copies: the same values in every process
model = Model(cfg, params, full_word_tokenizer(), "tiny-llama")
rng = np.random.default_rng(0)
examples = [([{"role": "user", "content": " ".join(rng.choice(WORDS, 3 + i % 5))}],
             " ".join(rng.choice(WORDS, 2 + i % 4)) + " .") for i in range(BATCH)]
config = TrainConfig(rank=4, alpha=8.0, lr=1e-3, warmup_steps=0, batch_size=BATCH)
table, skipped = encode_examples(model, examples, config.max_len, train_eot=config.train_eot)
assert skipped == 0 and len(table["row_ok"]) == BATCH
# a started adapter (b != 0, so both factors get gradients), the same in every process
ad = init_adapter(cfg, config.lora, jax.random.key(1))
brng = np.random.default_rng(1)
factors = {"a": {t: np.asarray(x) for t, x in ad.a.items()},
           "b": {t: (0.05 * brng.normal(size=x.shape)).astype(np.float32) for t, x in ad.b.items()}}
scale = np.asarray(ad.scale)
vec = rng.normal(size=cfg.d_model).astype(np.float32)
prev = iv.steer(cfg.n_resid, vec, 2.0, [1], iv.Positions.all(np.ones((1, 1), bool)))
tx, _ = make_optimizer(config, updates=4)

loaded: list[int] = []
if pid >= 0:
    mesh = sharding.make_mesh((jax.device_count(), 1))
    params = sharding.shard_params(params, cfg, mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    factors = jax.device_put(factors, adapter_shardings(cfg, config.targets, mesh))
    scale, prev = jax.device_put(scale, rep), jax.device_put(prev, rep)

    def global_rows(x: np.ndarray) -> jax.Array:
        names = ("batch", "seq")[: x.ndim] if x.ndim <= 2 else ("batch", "seq", None)
        sh = sharding.spec(mesh, *names)

        def rows(idx):  # called for this process's devices only
            loaded.extend(range(*idx[0].indices(x.shape[0])))
            return x[idx]

        return jax.make_array_from_callback(x.shape, sh, rows)

    batch = {k: global_rows(v) for k, v in table.items()}
else:
    batch = {k: jax.numpy.asarray(v) for k, v in table.items()}
    loaded = list(range(BATCH))


@jax.jit
def step(factors, opt_state, params, scale, batch, prev):
    (loss, (ce, _)), grads = jax.value_and_grad(loss_terms, has_aux=True)(
        factors, scale, params, cfg, batch, None, prev, 0.0)
    upd, opt_state = tx.update(grads, opt_state, factors)
    return optax.apply_updates(factors, upd), opt_state, loss, ce, grads


opt_state = jax.jit(tx.init)(factors)
new, opt_state, loss, ce, grads = step(factors, opt_state, params, scale, batch, prev)
new, grads, loss = sharding.to_host((new, grads, loss))
start = sharding.to_host(factors)
moved = max(float(np.abs(new[k][t] - start[k][t]).max()) for k in ("a", "b") for t in new[k])
Path(f"{out}.p{max(pid, 0)}.json").write_text(json.dumps({"rows": sorted(set(loaded))}))
if pid <= 0:
    flat = {f"{kind}.{part}.{t}": np.asarray(v) for kind, tree in (("new", new), ("grad", grads))
            for part in ("a", "b") for t, v in tree[part].items()}
    np.savez(f"{out}.npz", **flat)
    Path(out).write_text(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                                     "loss": float(loss), "ce": float(ce), "moved": moved,
                                     "param_devices": len(params["layers"]["wq"].sharding.device_set)
                                     if pid >= 0 else 1}))
