"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: the persona-vector pipeline on the tiny llama
(tests/pipelines/test_pipeline.py's model, trait, judge and config) with ``mesh="4x2"`` (steering sweep and
random control sharded: grid points over data, weights over model). Prints one JSON line: the steering cells,
held-out gain, control and chosen setting, and the mesh each of the pipeline's sweeps was given (the test
compares them with its own one-device run of the same inputs)."""

import json
import sys
import tempfile
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(HERE), str(HERE / "pipelines")]

import hf_tiny  # noqa: E402
import test_pipeline as tp  # noqa: E402

from jaxpersona.model.loaders.hf import load_hf_dir  # noqa: E402
import jaxpersona.pipelines.persona as persona  # noqa: E402
from jaxpersona.pipelines.persona import run_extract  # noqa: E402

seen = []  # the mesh each sweep of the pipeline was given (so the test sees the sharding was really asked for)
_sweep = persona.run_sweep


def recording_sweep(*a, **kw):
    mesh = kw.get("mesh")
    seen.append(None if mesh is None else dict(mesh.shape))
    return _sweep(*a, **kw)


persona.run_sweep = recording_sweep

assert jax.device_count() == 8, jax.device_count()
root = Path(tempfile.mkdtemp())
cfg, params = load_hf_dir(hf_tiny.save_hf_dir(hf_tiny.hf_model("llama"), root / "llama"))
model = tp.CountingModel(cfg, params, tp.full_word_tokenizer(), "tiny-llama")
r = run_extract(model, tp.TRAIT, tp.ScriptedJudge(), tp.CONFIG, root / "mesh", judge_id="scripted", progress=False,
                log=lambda _: None, mesh="4x2")
print(json.dumps({"meshes": seen, "steering": r.steering, "heldout": r.heldout, "control": r.control,
                  "setting": r.setting}, default=float))
