"""Screen a chat dataset with a persona vector before fine-tuning on it (Chen et al. 2025, sec. 6).

For each sample (a JSONL line ``{"messages": [..., {"role": "assistant", "content": ...}]}``) the
*projection difference* is

    proj(dataset response) - proj(the model's own greedy response to the same prompt)

where ``proj`` is the mean over response tokens of ``<resid[layer], v / |v|>``. Samples that push
the model towards the trait more than its own answers would have a large positive difference.
The output directory is a ``"screen"`` run (:func:`~jaxpersona.runner.run.open_run`: ``run.json``,
``config.json``, the lock); the model's own responses are cached in it (``own_responses.jsonl``), so a
killed screen resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.records import digest
from jaxpersona.compute.activations import VARIANTS, iter_activations
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.data.datasets import read_chat_jsonl
from jaxpersona.runner.run import open_run
from jaxpersona.runner.stages import generate_cached

Message = dict[str, str]


def projections(model: Model, prompts: list[list[Message]], responses: list[str], unit: np.ndarray, layer: int,
                batch_size: int = 16) -> np.ndarray:
    """Mean over response tokens of ``<resid[layer], unit>`` per row: ``[N]``."""
    out = np.zeros(len(prompts), np.float32)
    v = VARIANTS.index("response_mean")
    for idx, acts in iter_activations(model, prompts, responses, batch_size):
        out[idx] = acts[v, layer] @ unit
    return out


def screen_dataset(
    model: Model,
    vector: np.ndarray,
    layer: int,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Rank the samples of ``data_path`` by projection difference onto ``vector`` (``[L+1, D]`` or
    ``[D]``) at resid ``layer``. Writes ``screen.jsonl`` (ranked, descending) and ``screen_summary.json``
    and returns ``{"mean_difference", "n", "layer", "rows"}``."""
    cfg = model.cfg
    if not 0 <= int(layer) <= cfg.n_layers:
        raise errors.InputError(f"layer {layer} outside resid[0..{cfg.n_layers}]")
    v = np.asarray(vector, np.float32)
    if v.ndim == 2 and v.shape[0] != cfg.n_resid:
        raise errors.ModelMismatchError(f"per-layer vectors have {v.shape[0]} resid points; this model has "
                                        f"{cfg.n_resid} (vectors from another model?)")
    v = v[int(layer)] if v.ndim == 2 else v
    if v.shape != (cfg.d_model,) or not np.all(np.isfinite(v)) or not np.any(v):
        raise errors.ModelMismatchError(f"vector has shape {v.shape}; expected a finite nonzero [{cfg.d_model}] "
                                        "direction for this model")
    unit = v / np.linalg.norm(v)
    samples = read_chat_jsonl(data_path)
    settings = {"model": model.name, "data": str(data_path), "layer": int(layer), "vector": digest(v.tobytes().hex()),
                "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    with open_run(out_dir, "screen", settings, model=model, log=log, progress=progress) as run:
        mid = model_fingerprint(model)
        jobs = [(digest("screen", mid, msgs, max_new_tokens), msgs, {"index": i}) for i, (msgs, _) in enumerate(samples)]
        with run.stage("generate"):
            own = generate_cached(model, run.records("own_responses.jsonl"), jobs, max_new_tokens=max_new_tokens,
                                  temperature=0.0, top_p=1.0, seed=0, batch_size=batch_size, desc="own responses",
                                  progress=progress)
        prompts = [m for m, _ in samples]
        data_resp = [r for _, r in samples]
        own_resp = [own[k]["response"] for k, _, _ in jobs]
        with run.stage("project"):
            p_data = projections(model, prompts, data_resp, unit, int(layer), batch_size)
            p_own = projections(model, prompts, own_resp, unit, int(layer), batch_size)
        diff = p_data - p_own
        rows = [{"index": i, "difference": float(diff[i]), "projection_data": float(p_data[i]),
                 "projection_model": float(p_own[i]), "prompt": prompts[i][-1]["content"], "response": data_resp[i],
                 "model_response": own_resp[i]} for i in map(int, np.argsort(-diff, kind="stable"))]
        summary = {"mean_difference": float(diff.mean()), "n": len(rows), "layer": int(layer)}
        with run.stage("write"):
            run.write_jsonl("screen.jsonl", rows)
            run.write_json("screen_summary.json", summary, indent=2)
    return {**summary, "rows": rows}
