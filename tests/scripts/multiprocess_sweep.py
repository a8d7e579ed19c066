"""One process of a multi-process sweep: ``python multiprocess_sweep.py PID PORT HF_DIR OUT [NPROC]`` (NPROC
processes, 2 by default, each with the CPU devices XLA_FLAGS gives it; PID -1 for the single-process reference).
Writes the sweep's rows as JSON (process 0)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import testpath  # noqa: E402,F401

pid, port, hf_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
nproc = int(sys.argv[5]) if len(sys.argv) > 5 else 2
if pid >= 0:
    from jaxpersona.model.sharding import init_distributed

    init_distributed(f"127.0.0.1:{port}", nproc, pid)

import jax
import numpy as np

from jaxpersona.model.loaders.hf import load_hf_dir
from jaxpersona.compute.handle import Model
from jaxpersona.compute.sweep import Grid, data_mesh, run_sweep
from jaxpersona.compute.scoring import ScoringSet
from test_pipeline import full_word_tokenizer

cfg, params = load_hf_dir(hf_dir)
model = Model(cfg, params, full_word_tokenizer(), "tiny-llama")
vecs = np.random.default_rng(0).normal(size=(2, cfg.d_model)).astype(np.float32)
grid = Grid("steer", vecs, ("a", "b"), (1, 2), (0.0, 1.5, -2.0, 3.0))
data = ScoringSet(("hello world", "what is the capital of france ?", "the cat sat"), ("paris .", "the mat", "hello"))
mesh = data_mesh() if pid >= 0 else None
rows = run_sweep(model, grid, data, mesh=mesh, progress=False)
if pid <= 0:
    Path(out).write_text(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "rows": rows}))
