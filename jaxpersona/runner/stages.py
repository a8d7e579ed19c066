"""Cached stages every pipeline shares: generation and judging, keyed and resumable."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxpersona.artifacts.records import KeyedJsonl, digest
from jaxpersona.compute.batching import check_count, pad_left, round_up
from jaxpersona.compute.handle import Model
from jaxpersona.compute.progress import progress_bar
from jaxpersona.data.chat import Message
from jaxpersona.measure.judge import score_from_probs
from jaxpersona.runner.run import Stage


def generate_cached(
    model: Model,
    store: KeyedJsonl,
    jobs: list[tuple[str, list[Message], dict[str, Any]]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
    desc: str = "generate",
    progress: bool = True,
    stage: Stage | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate a reply for each ``(key, conversation, extra)`` job not yet in ``store``.

    Jobs are grouped by prompt length (longest first, ties in job order) into chunks of
    ``batch_size``; chunk ``c`` is sampled with key ``(seed, c)`` and padded only to its own longest
    prompt (rounded up to 32 tokens: a few compiles, little padding) and, the last chunk, to a multiple of
    8 rows. The grouping depends only on the jobs, so a resumed run reproduces an uninterrupted one.
    Returns ``{key: record}``.
    ``stage``: the run stage this is part of; the jobs already in ``store`` count as its cache hits.
    """
    check_count(batch_size)
    ids = dict(zip([k for k, _, _ in jobs], model.chat_ids([conv for _, conv, _ in jobs])))
    order = sorted(range(len(jobs)), key=lambda i: -len(ids[jobs[i][0]]))
    chunks = [[jobs[i] for i in order[j : j + batch_size]] for j in range(0, len(jobs), batch_size)]
    if stage is not None:
        stage.hit(sum(k in store for k, _, _ in jobs))
    bar = progress_bar(len(jobs), desc, progress)
    for c, chunk in enumerate(chunks):
        todo = [j for j in chunk if j[0] not in store]
        if todo:
            seqs = [ids[k] for k, _, _ in chunk]
            # padded to a multiple of 8 rows (the draws of the real rows do not depend on the padding rows)
            seqs += [seqs[-1]] * (min(round_up(len(seqs), 8), batch_size, len(jobs)) - len(seqs))
            width = round_up(max(len(x) for x in seqs), 32)
            out = model.generate_tokens(pad_left(seqs, model.pad_id, bucket=width), max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                        seed=seed * 100_003 + c)
            texts = model.decode(out)
            lengths = np.asarray(out.lengths)
            store.put({"key": k, **extra, "messages": conv, "response": texts[i].strip(), "tokens": int(lengths[i])}
                      for i, (k, conv, extra) in enumerate(chunk) if k not in store)
        bar.update(len(chunk))
    bar.close()
    return {k: store[k] for k, _, _ in jobs}


def judge_cached(
    judge: Any,
    judge_id: str,
    store: KeyedJsonl,
    prompts: list[str],
    *,
    batch: int,
    min_mass: float,
    desc: str = "judge",
    progress: bool = True,
    max_score: int = 100,
    stage: Stage | None = None,
) -> list[float | None]:
    """Scores of ``prompts`` (None where the judge puts < ``min_mass`` on integers), cached by
    ``(judge_id, prompt)``; each finished batch of judgements is persisted before the next.
    ``max_score``: the rubric's top integer (3 for role adherence): only ``0..max_score`` count.
    ``stage``: the run stage this is part of; the prompts already judged count as its cache hits."""
    keys = [digest(judge_id, p) for p in prompts]
    todo = sorted({k: p for k, p in zip(keys, prompts) if k not in store}.items())
    if stage is not None:
        stage.hit(sum(k in store for k in keys))
    bar = progress_bar(len(prompts), desc, progress)
    bar.update(len(prompts) - len(todo))
    for i in range(0, len(todo), batch):
        part = todo[i : i + batch]
        probs = np.asarray(judge.probs([p for _, p in part]), np.float64)
        store.put({"key": k, "probs": [round(float(x), 8) for x in pr], "mass": float(pr.sum())}
                  for (k, _), pr in zip(part, probs))
        bar.update(len(part))
    bar.close()
    out = []
    for k in keys:
        p = np.asarray(store[k]["probs"], np.float64)
        p[max_score + 1:] = 0.0
        s = float(score_from_probs(p, min_mass))
        out.append(None if math.isnan(s) else s)
    return out
