"""Regimes: one persona found by prompting, by fine-tuning and by steering, compared on one trainer.

Stages (each cached in the run directory; a rerun resumes):

1. **data** — the model's own answers: trait answers under the trait's positive system prompts and neutral
   answers under the negative ones, on the trait's extraction questions (train split) and evaluation
   questions (held out); plain answers with no system prompt (the *neutral set*). Written as chat JSONL
   without the system prompt: ``data/trait.jsonl``, ``data/neutral.jsonl``, ``data/mixed.jsonl``.
2. **prompt-regime vectors** — mean response activation under the positive minus the negative prompts,
   per question (for bootstrap), every resid point; for the trait, the second trait and both together.
3. **fine-tuning** — LoRA runs on one trainer: plain / preventative steering / inoculation / KL on the trait
   data, and plain on the mixed and neutral data (adapter snapshots every ``save_every`` updates).
4. **evaluation** — every snapshot in one stacked computation (:mod:`jaxpersona.compute.conditions`): the judge-free trait
   score (contrastive likelihood: mean log-prob of held-out trait answers minus neutral answers, no system
   prompt), the held-out neutral loss, and the fine-tuning shift (mean activation fine-tuned minus base on
   the same held-out prompts and responses, projected on the prompt-regime unit vector).
5. **steering-regime vectors** — BiPO at ``bipo_layers``.
6. **comparison** — per-layer cosines prompt/fine-tune/BiPO with jackknife intervals over questions and a
   null from random half-splits within one regime; the regime grid (base, +prompt, +adapter, +steering and
   combinations, one vmapped computation); composition: v(A)+v(B) against the vector of prompting A and B
   together, and steering A then B vs B then A vs A+B on both traits' judge-free scores.

Every number is judge-free: likelihoods and projections of the model's own activations.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts import plots
from jaxpersona.artifacts.adapters import load_adapter
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.records import KeyedJsonl, cached_arrays, digest
from jaxpersona.compute.activations import (
    VARIANTS,
    iter_activations,
    response_activations,
)
from jaxpersona.compute.bipo import bipo_vector
from jaxpersona.compute.conditions import Condition, score_conditions
from jaxpersona.compute.handle import model_fingerprint
from jaxpersona.compute.train import TrainConfig, inoculate, train
from jaxpersona.data.chat import conversation
from jaxpersona.data.configs import (
    check_positive,
    check_types,
    read_toml,
    replace_checked,
    resid_point,
)
from jaxpersona.data.datasets import write_dataset
from jaxpersona.edit import interventions as iv
from jaxpersona.edit.directions import steering_vectors
from jaxpersona.measure import stats
from jaxpersona.model.lora import stack_adapters
from jaxpersona.runner.stages import generate_cached

TRAINERS = ("plain", "steer", "inoculate", "kl")
DATASETS = ("trait", "mixed", "neutral")


@dataclasses.dataclass(frozen=True)
class RegimesConfig:
    """A regimes run. The default sizes run on a 2-core CPU with the embedded 135M model; see
    ``configs/regimes_gpu.toml`` for the reference sizes."""

    trait: str = "evil"
    trait_b: str = "optimistic"  # the second trait of the composition analyses ("" = skip them)
    n_pairs: int = 2  # instruction pairs used (answers per question per side)
    n_train_questions: int = 20  # of the trait's extraction questions
    n_eval_questions: int = 10  # of its evaluation questions (held out)
    max_new_tokens: int = 40
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    layer: int = -1  # resid point of shifts, projections and preventative steering (-1 = the middle)
    trainers: tuple[str, ...] = TRAINERS  # on the trait data
    datasets: tuple[str, ...] = DATASETS  # each with the plain trainer
    prevention: str = "steer"  # the 'steer' trainer's intervention: "steer" (toward the trait) or "ablate"
    prevention_coeff: float = 0.5  # in units of the mean residual norm at `layer` (times the unit vector)
    inoculation_pair: int = 0  # the positive instruction used as the inoculation system prompt
    kl_beta: float = 1.0
    bipo_layers: tuple[int, ...] = ()  # resid points (() = `layer`)
    bipo_steps: int = 20
    bipo_lr: float = 5e-3
    bipo_beta: float = 0.1
    bipo_batch: int = 8
    steer_coeff: float = 0.3  # grid and composition steering, in units of the residual norm
    compose_layers: tuple[int, ...] = ()  # (l1, l2) for 'A then B' (() = (layer, layer + L // 6))
    n_boot: int = 1000
    n_splits: int = 200

    def replace(self, **kw: Any) -> RegimesConfig:
        return replace_checked(self, "regimes", **kw)

    def validate(self, cfg: Any) -> None:
        for f in ("trainers", "datasets"):
            v = getattr(self, f)
            if not isinstance(v, tuple) or not all(isinstance(x, str) for x in v):
                raise errors.InputError(f"regimes config {f} must be a list of names, got {v!r}")
        check_types(dataclasses.replace(self, trainers=(), datasets=()), "regimes")
        check_positive(self, "regimes", ("n_pairs", "n_train_questions", "n_eval_questions", "max_new_tokens",
                                         "batch_size", "bipo_steps", "bipo_batch", "n_boot", "n_splits"))
        bad = [t for t in self.trainers if t not in TRAINERS] + [d for d in self.datasets if d not in DATASETS]
        if bad:
            raise errors.InputError(f"regimes: unknown trainers/datasets {bad}; trainers {list(TRAINERS)}, "
                                    f"datasets {list(DATASETS)}")
        if self.prevention not in ("steer", "ablate"):
            raise errors.InputError(f"regimes prevention must be 'steer' or 'ablate', got {self.prevention!r}")
        if self.n_train_questions < 4 or self.n_eval_questions < 2:
            raise errors.InputError("regimes needs >= 4 train questions (half-split nulls) and >= 2 eval questions")
        for l in (*self.bipo_layers, *self.compose_layers):
            if not 1 <= l <= cfg.n_layers:
                raise errors.InputError(f"regimes layer {l} outside resid[1..{cfg.n_layers}]")
        if self.compose_layers and len(self.compose_layers) != 2:
            raise errors.InputError("compose_layers must be two resid points (l1, l2)")
        resid_point(cfg.n_layers, self.layer)

    def resid(self, n_layers: int) -> int:
        return resid_point(n_layers, self.layer)


def load_regimes_config(path: str | Path | None) -> tuple[RegimesConfig, TrainConfig]:
    """``[regimes]`` and ``[train]`` tables of a TOML file (both optional) over the defaults."""
    if path is None:
        return RegimesConfig(), TrainConfig()
    table = read_toml(path, {"regimes", "train"}, "use [regimes] and [train] tables")
    for k in ("regimes", "train"):
        if not isinstance(table.get(k, {}), dict):
            raise errors.InputError(f"{path}: [{k}] must be a table")
    return RegimesConfig().replace(**table.get("regimes", {})), TrainConfig().replace(**table.get("train", {}))


# --- stage 1: the model's own answers --------------------------------------------------------------------
def trait_data(model: Any, trait: Any, questions: Sequence[str], n_pairs: int, store: KeyedJsonl, *,
               max_new_tokens: int, temperature: float, top_p: float, seed: int, batch_size: int,
               extra_systems: dict[str, tuple[str, str]] | None = None, progress: bool = True
               ) -> dict[str, list[list[str]]]:
    """Answers ``{side: [question][pair]}`` for ``pos`` / ``neg`` (the trait's instruction pairs) and ``plain``
    (no system prompt, ``n_pairs`` samples), plus each ``extra_systems`` side (``name: (pos, neg)`` system
    prompts, e.g. two traits together, giving ``name:pos`` / ``name:neg``). Generated once and cached in ``store``."""
    fp = model_fingerprint(model)
    systems: dict[str, list[str | None]] = {
        "pos": [trait.system_prompt("pos", i % len(trait.pairs)) for i in range(n_pairs)],
        "neg": [trait.system_prompt("neg", i % len(trait.pairs)) for i in range(n_pairs)],
        "plain": [None] * n_pairs,
    }
    for name, (p, n) in (extra_systems or {}).items():
        systems[f"{name}:pos"], systems[f"{name}:neg"] = [p] * n_pairs, [n] * n_pairs
    jobs, index = [], {}
    for side, sys_list in systems.items():
        for qi, q in enumerate(questions):
            for i, system in enumerate(sys_list):
                key = digest("regime-answer", fp, trait.name, side, system, q, i, max_new_tokens, temperature, seed)
                jobs.append((key, conversation(q, system), {"side": side, "question": q, "pair": i}))
                index[(side, qi, i)] = key
    recs = generate_cached(model, store, jobs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=seed, batch_size=batch_size, desc=f"answers ({trait.name})", progress=progress)
    return {side: [[recs[index[(side, qi, i)]]["response"] for i in range(n_pairs)] for qi in range(len(questions))]
            for side in systems}


def as_examples(questions: Sequence[str], answers: list[list[str]]) -> list[tuple[list[dict[str, str]], str]]:
    """Chat examples (user question, assistant answer), no system prompt; empty answers dropped."""
    return [([{"role": "user", "content": q}], a) for q, row in zip(questions, answers) for a in row if a.strip()]


def mixed_examples(trait_ex: list, neutral_ex: list) -> list:
    """Half trait, half neutral (alternating), as many examples as the trait set."""
    n = min(len(trait_ex), len(neutral_ex))
    return [trait_ex[i] if i % 2 == 0 else neutral_ex[i] for i in range(n)]


# --- stage 2: activations and vectors --------------------------------------------------------------------------
def per_question_means(model: Any, questions: Sequence[str], answers: list[list[str]], system: Sequence[str | None],
                       batch_size: int, with_norms: bool = False) -> Any:
    """Mean response activation per question over its answers: ``[Q, L+1, D]`` (``system[i]`` is answer i's
    system prompt). With ``with_norms`` also the mean residual norm per resid point ``[L+1]``."""
    rows = [(qi, i) for qi, row in enumerate(answers) for i, a in enumerate(row) if a.strip()]
    if not rows:
        raise errors.FilterError("no non-empty answers to take activations of")
    convs = [conversation(questions[qi], system[i]) for qi, i in rows]
    resps = [answers[qi][i] for qi, i in rows]
    d = model.cfg.d_model
    sums = np.zeros((len(questions), model.cfg.n_resid, d))
    counts = np.zeros(len(questions))
    norm_sum = np.zeros(model.cfg.n_resid)
    for idx, got in iter_activations(model, convs, resps, batch_size=batch_size, with_norms=True):
        acts, norms = got
        for j, r in enumerate(idx):
            qi = rows[r][0]
            sums[qi] += acts[0, :, j]
            counts[qi] += 1
        norm_sum += norms[0].sum(axis=1)
    if np.any(counts == 0):
        missing = [questions[i] for i in np.flatnonzero(counts == 0)]
        raise errors.FilterError(f"no non-empty answer for questions {missing[:3]}; raise max_new_tokens")
    means = sums / counts[:, None, None]
    return (means, norm_sum / len(rows)) if with_norms else means


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis."""
    return (unit(a) * unit(b)).sum(-1)


def regime_cosines(diff_a: np.ndarray, diff_b: np.ndarray | None, fixed_b: np.ndarray | None = None, *,
                 paired: bool = False) -> dict[str, list[float]]:
    """Per layer cos(mean_q diff_a, mean_q diff_b) (or cos with ``fixed_b [L+1, D]``) with a 95% jackknife
    interval over questions: leave one question out (of each side in turn, or of both at once with
    ``paired``) and combine the variances. (A bootstrap interval is biased here: resampled means of
    duplicated questions are noisier, which pulls the cosine toward 0 and can leave the estimate outside
    its own percentile interval.) Returns ``{"cos": [L+1], "lo": [L+1], "hi": [L+1]}``."""
    a_full = diff_a.mean(0)
    b_full = diff_b.mean(0) if diff_b is not None else fixed_b
    point = cosine(a_full, b_full)

    def loo(x: np.ndarray) -> np.ndarray:  # leave-one-out means [n, L+1, D]
        return (x.sum(0)[None] - x) / (len(x) - 1)

    if paired:
        lo, hi = stats.jackknife_interval(point, cosine(loo(diff_a), loo(diff_b)))
    else:
        parts = [cosine(loo(diff_a), b_full[None])]
        if diff_b is not None:
            parts.append(cosine(a_full[None], loo(diff_b)))
        halfwidths = [stats.jackknife_interval(point, p)[1] - point for p in parts]
        w = np.sqrt(sum(h ** 2 for h in halfwidths))
        lo, hi = point - w, point + w
    return {"cos": point.tolist(), "lo": np.clip(lo, -1, 1).tolist(), "hi": np.clip(hi, -1, 1).tolist()}


def split_half_null(diff: np.ndarray, n_splits: int, seed: int) -> dict[str, list[float]]:
    """Within one regime: cos between the vectors of two random halves of the questions, per layer
    (median and 2.5/97.5 percentiles over ``n_splits`` splits): how similar two estimates of *the same*
    regime's vector are at this sample size."""
    rng = np.random.default_rng(seed)
    q = len(diff)
    cs = []
    for _ in range(n_splits):
        perm = rng.permutation(q)
        cs.append(cosine(diff[perm[: q // 2]].mean(0), diff[perm[q // 2 :]].mean(0)))
    c = np.asarray(cs)
    return {"median": np.median(c, 0).tolist(), "lo": np.percentile(c, 2.5, 0).tolist(),
            "hi": np.percentile(c, 97.5, 0).tolist()}


# --- the run --------------------------------------------------------------------------------------------------
def _trait_items(questions: Sequence[str], answers: dict[str, list[list[str]]]) -> tuple[list[str], list[str], list[str]]:
    """Evaluation items: (question, trait answer, neutral answer) for each question and pair."""
    qs, pos, neg = [], [], []
    for qi, q in enumerate(questions):
        for p, n in zip(answers["pos"][qi], answers["neg"][qi]):
            qs.append(q)
            pos.append(p)
            neg.append(n)
    return qs, pos, neg


def _mean_ci(x: np.ndarray, n_boot: int, seed: int) -> list[float]:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return list(stats.bootstrap_ci(x, n_boot=n_boot, seed=seed)) if len(x) else [float("nan")] * 3


def run_regimes(model: Any, trait: Any, config: RegimesConfig, train_config: TrainConfig, out_dir: str | Path, *,
                trait_b: Any = None, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole regimes run (see the module docstring); writes ``regimes.json`` / ``regimes.txt``."""
    cfg = model.cfg
    config.validate(cfg)
    train_config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model": model.name, "regimes": dataclasses.asdict(config),
                                                 "train": dataclasses.asdict(train_config)}, indent=2))
    fp = model_fingerprint(model)
    layer = config.resid(cfg.n_layers)
    t0 = time.perf_counter()
    wall: dict[str, float] = {}
    if len(trait.questions) < config.n_train_questions or len(trait.eval_questions) < config.n_eval_questions:
        raise errors.InputError(f"trait {trait.name!r} has {len(trait.questions)} questions and "
                                f"{len(trait.eval_questions)} eval questions; the config asks for "
                                f"{config.n_train_questions} and {config.n_eval_questions}")
    train_q = list(trait.questions[: config.n_train_questions])
    eval_q = list(trait.eval_questions[: config.n_eval_questions])
    gen = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
               seed=config.seed, batch_size=config.batch_size, progress=progress)
    store = KeyedJsonl(out / "answers.jsonl")

    # 1. data
    log(f"[1/6] answers: {trait.name} on {len(train_q)} train + {len(eval_q)} eval questions x {config.n_pairs} pairs")
    extra = {}
    if trait_b is not None:
        extra["AB"] = (f"{trait.system_prompt('pos', 0)} {trait_b.system_prompt('pos', 0)}",
                       f"{trait.system_prompt('neg', 0)} {trait_b.system_prompt('neg', 0)}")
    tr = trait_data(model, trait, train_q, config.n_pairs, store, extra_systems=extra, **gen)
    ev = trait_data(model, trait, eval_q, config.n_pairs, store, **gen)
    trB = evB = None
    if trait_b is not None:
        if len(trait_b.questions) < 1:
            raise errors.InputError(f"trait {trait_b.name!r} has no questions")
        trB = trait_data(model, trait_b, train_q, config.n_pairs, store, **gen)
        evB = trait_data(model, trait_b, list(trait_b.eval_questions[: config.n_eval_questions]), config.n_pairs,
                         store, **gen)
    answers_key = digest(tr, ev, trB, evB)  # what every later stage is computed from
    trait_ex, neutral_ex = as_examples(train_q, tr["pos"]), as_examples(train_q, tr["plain"])
    data = {"trait": trait_ex, "neutral": neutral_ex, "mixed": mixed_examples(trait_ex, neutral_ex)}
    for name, ex in data.items():
        write_dataset(out / "data" / f"{name}.jsonl", ex)
    wall["data"] = time.perf_counter() - t0

    # 2. prompt-regime vectors (per question, every resid point)
    t1 = time.perf_counter()
    pos_sys = [trait.system_prompt("pos", i % len(trait.pairs)) for i in range(config.n_pairs)]
    neg_sys = [trait.system_prompt("neg", i % len(trait.pairs)) for i in range(config.n_pairs)]

    def prompt_diffs() -> dict[str, np.ndarray]:
        pos_m, norms = per_question_means(model, train_q, tr["pos"], pos_sys, config.batch_size, with_norms=True)
        res = {"A": pos_m - per_question_means(model, train_q, tr["neg"], neg_sys, config.batch_size), "norms": norms}
        if trait_b is not None:
            pb = [trait_b.system_prompt("pos", i % len(trait_b.pairs)) for i in range(config.n_pairs)]
            nb = [trait_b.system_prompt("neg", i % len(trait_b.pairs)) for i in range(config.n_pairs)]
            res["B"] = (per_question_means(model, train_q, trB["pos"], pb, config.batch_size)
                        - per_question_means(model, train_q, trB["neg"], nb, config.batch_size))
            res["AB"] = (per_question_means(model, train_q, tr["AB:pos"], [extra["AB"][0]] * config.n_pairs,
                                            config.batch_size)
                         - per_question_means(model, train_q, tr["AB:neg"], [extra["AB"][1]] * config.n_pairs,
                                              config.batch_size))
        return res

    pd = cached_arrays(out / "prompt_vectors.npz", digest(fp, "prompt", dataclasses.asdict(config), answers_key),
                 prompt_diffs)
    v_prompt = pd["A"].mean(0)  # [L+1, D]
    norms = pd["norms"]  # mean residual norm per resid point
    log(f"[2/6] prompt-regime vector: |v| at resid[{layer}] = {np.linalg.norm(v_prompt[layer]):.2f} "
        f"(residual norm {norms[layer]:.1f})")
    wall["prompt_vectors"] = time.perf_counter() - t1

    # 3. fine-tuning runs
    t1 = time.perf_counter()
    u = unit(v_prompt[layer])
    allp = iv.Positions.all(np.ones((1, 1), bool))
    if config.prevention == "steer":
        prevention = iv.steer(cfg.n_resid, u * norms[layer], config.prevention_coeff, [layer], allp)
    else:
        prevention = iv.ablate(cfg.n_resid, u, [layer], allp)
    inoc = trait.system_prompt("pos", config.inoculation_pair % len(trait.pairs))
    runs: dict[str, dict[str, Any]] = {}
    plan = [(t, "trait") for t in config.trainers] + [("plain", d) for d in config.datasets if d != "trait" or
                                                       "plain" not in config.trainers]
    for trainer, ds in plan:
        name = f"{trainer}-{ds}"
        ex = inoculate(data[ds], inoc) if trainer == "inoculate" else data[ds]
        tc = train_config.replace(kl_beta=config.kl_beta) if trainer == "kl" else train_config
        log(f"[3/6] fine-tune {name}: {len(ex)} examples, {tc.epochs} epoch(s), batch {tc.batch_size}x{tc.grad_accum}")
        res = train(model, ex, tc, out / "runs" / name, neutral=data["neutral"] if trainer == "kl" else None,
                    prevention=prevention if trainer == "steer" else None, progress=progress)
        runs[name] = {"trainer": trainer, "dataset": ds, "steps": res.steps, "checkpoints": res.checkpoints,
                      "final_loss": res.log[-1]["ce"] if res.log else None, "skipped": res.skipped,
                      "examples": res.n_examples}
    wall["fine_tune"] = time.perf_counter() - t1

    # 4. evaluate every snapshot: trait score, neutral loss (one stacked computation), fine-tuning shift
    t1 = time.perf_counter()
    snaps = [(name, s) for name, r in runs.items() for s in r["checkpoints"]]
    adapters = [load_adapter(out / "runs" / n / "adapters" / f"step_{s}", cfg)[0] for n, s in snaps]
    stack = stack_adapters([None, *adapters], cfg)
    conds = [Condition("base")] + [Condition(f"{n}@{s}", adapter=k + 1) for k, (n, s) in enumerate(snaps)]
    e_q, e_pos, e_neg = _trait_items(eval_q, ev)
    neutral_q = [q for q, row in zip(eval_q, ev["plain"]) for a in row]
    neutral_a = [a for row in ev["plain"] for a in row]
    ekey = digest(fp, "eval", [(n, s) for n, s in snaps], dataclasses.asdict(config), dataclasses.asdict(train_config),
                  answers_key)

    def evaluate() -> dict[str, np.ndarray]:
        n_pos, n_neg = len(e_q), len(e_q)
        lp = score_conditions(model, stack, conds, e_q + e_q + neutral_q, e_pos + e_neg + neutral_a,
                              batch_size=max(2, config.batch_size // 4))
        acts = []
        rows = [(q, a) for q, a in zip(neutral_q, neutral_a) if a.strip()]

        for k in range(len(conds)):
            m = model if k == 0 else model.with_adapter(adapters[k - 1], f"{conds[k].name}")
            acts.append(response_activations(m, [conversation(q) for q, _ in rows], [a for _, a in rows]))
        a = np.stack(acts)  # [K, 3, L+1, N, D]
        qidx = np.asarray([eval_q.index(q) for q, _ in rows])
        per_q = np.stack([a[:, :, :, qidx == i].mean(3) for i in range(len(eval_q))], axis=3)  # [K, 3, L+1, Q, D]
        return {"pos": lp[:, :n_pos], "neg": lp[:, n_pos : n_pos + n_neg], "neutral": lp[:, n_pos + n_neg :],
                "acts": per_q.astype(np.float32)}

    ev_arr = cached_arrays(out / "evaluation.npz", ekey, evaluate)
    trait_items = ev_arr["pos"] - ev_arr["neg"]  # [K, items] contrastive likelihood per item
    base_items = trait_items[0]
    acts = ev_arr["acts"]  # [K, 3, L+1, Q, D]
    ft_diff = acts - acts[:1]  # fine-tuned minus base, per question
    ri = VARIANTS.index("response_mean")
    li = VARIANTS.index("prompt_last")
    points = []
    for k, c in enumerate(conds):
        shift_r = float(ft_diff[k, ri, layer].mean(0) @ u)
        shift_l = float(ft_diff[k, li, layer].mean(0) @ u)
        d = _mean_ci(trait_items[k] - base_items, config.n_boot, config.seed)
        nl = _mean_ci(-(ev_arr["neutral"][k] - ev_arr["neutral"][0]), config.n_boot, config.seed)
        name, _, step = c.name.partition("@")
        points.append({"condition": c.name, "run": name if k else "base", "step": int(step) if step else 0,
                       "shift": shift_r, "shift_last_prompt": shift_l, "trait_delta": d,
                       "trait_score": float(np.nanmean(trait_items[k])),
                       "neutral_loss": float(-np.nanmean(ev_arr["neutral"][k])), "neutral_loss_delta": nl})
    shifts = [p["shift"] for p in points]
    deltas = [p["trait_delta"][0] for p in points]
    corr = {"response_mean": stats.pearson_ci(shifts, deltas),
            "prompt_last": stats.pearson_ci([p["shift_last_prompt"] for p in points], deltas),
            "n_points": len(points), "measure": "trait change = contrastive likelihood (judge-free)"}
    finals = {n: next(p for p in points if p["condition"] == f"{n}@{r['checkpoints'][-1]}") for n, r in runs.items()}
    last = [points[0], *finals.values()]  # one point per run (+ base): independent runs only
    corr["finals"] = stats.pearson_ci([p["shift"] for p in last], [p["trait_delta"][0] for p in last])
    log(f"[4/6] evaluated {len(snaps)} snapshots + base: shift vs trait change r = "
        f"{_fmt(corr['response_mean'].get('r'))} (n {len(points)})")
    wall["evaluate"] = time.perf_counter() - t1

    # 5. BiPO vectors
    t1 = time.perf_counter()
    bipo_layers = tuple(config.bipo_layers) or (layer,)
    bq = [q for q, row in zip(train_q, tr["pos"]) for _ in row]
    bpos = [a for row in tr["pos"] for a in row]
    bneg = [a for row in tr["neg"] for a in row]

    def bipo_all() -> dict[str, np.ndarray]:
        vs, ls = [], []
        for l in bipo_layers:
            log(f"[5/6] BiPO at resid[{l}]: {config.bipo_steps} steps")
            v, losses = bipo_vector(model, bq, bpos, bneg, l, steps=config.bipo_steps, lr=config.bipo_lr,
                                    beta=config.bipo_beta, batch_size=config.bipo_batch, seed=config.seed)
            vs.append(v)
            ls.append(losses)
        return {"vectors": np.stack(vs), "losses": np.asarray(ls)}

    bp = cached_arrays(out / "bipo.npz", digest(fp, "bipo", bipo_layers, dataclasses.asdict(config), answers_key),
                 bipo_all)
    wall["bipo"] = time.perf_counter() - t1

    # 6. comparison
    t1 = time.perf_counter()
    plain_final = finals.get("plain-trait") or next(iter(finals.values()))
    k_plain = [c.name for c in conds].index(plain_final["condition"])
    ft_q = ft_diff[k_plain, ri]  # [L+1, Q, D]
    ft_q = np.moveaxis(ft_q, 1, 0)  # [Q, L+1, D]
    cos = {"prompt_vs_finetune": regime_cosines(pd["A"], ft_q)}
    null = {"prompt": split_half_null(pd["A"], config.n_splits, config.seed),
            "finetune": split_half_null(ft_q, config.n_splits, config.seed)}
    bipo_full = np.zeros((cfg.n_resid, cfg.d_model), np.float32)
    bipo_tab = []
    for l, v in zip(bipo_layers, bp["vectors"]):
        bipo_full[l] = v
        fixed = np.zeros_like(bipo_full)
        fixed[:] = v
        cp = regime_cosines(pd["A"], None, fixed)
        cf = regime_cosines(ft_q, None, fixed)
        bipo_tab.append({"layer": int(l), "prompt_vs_bipo": [cp["cos"][l], cp["lo"][l], cp["hi"][l]],
                         "finetune_vs_bipo": [cf["cos"][l], cf["lo"][l], cf["hi"][l]],
                         "prompt_vs_finetune": [cos["prompt_vs_finetune"][k][l] for k in ("cos", "lo", "hi")],
                         "null_prompt": [null["prompt"][k][l] for k in ("median", "lo", "hi")],
                         "null_finetune": [null["finetune"][k][l] for k in ("median", "lo", "hi")],
                         "bipo_norm": float(np.linalg.norm(v)), "bipo_final_loss": float(np.mean(bp["losses"][
                             list(bipo_layers).index(l)][-5:]))})
    # regime grid: {base, adapter} x {no prompt, trait prompt} x {no steering, steering} -> both traits' scores
    steer_vec = steering_vectors(v_prompt, norms, "relative")
    grid_conds = []
    for ad_name, ad_k in (("base", 0), ("adapter", k_plain)):
        for pr_name, system in (("", None), ("+prompt", pos_sys[0])):
            for st_name, coeff in (("", 0.0), ("+steer", config.steer_coeff)):
                hook = iv.steer(cfg.n_resid, steer_vec, coeff if coeff else 0.0, [layer], allp)
                grid_conds.append(Condition(ad_name + pr_name + st_name, ad_k, system, hook))
    gkey = digest(ekey, "grid", trait_b.name if trait_b is not None else None)

    def grid_scores() -> dict[str, np.ndarray]:
        lp_p = score_conditions(model, stack, grid_conds, e_q, e_pos, batch_size=max(2, config.batch_size // 4))
        lp_n = score_conditions(model, stack, grid_conds, e_q, e_neg, batch_size=max(2, config.batch_size // 4))
        res = {"A": lp_p - lp_n}
        if trait_b is not None:
            bq_, bp_, bn_ = _trait_items(list(trait_b.eval_questions[: config.n_eval_questions]), evB)
            res["B"] = (score_conditions(model, stack, grid_conds, bq_, bp_, batch_size=max(2, config.batch_size // 4))
                        - score_conditions(model, stack, grid_conds, bq_, bn_, batch_size=max(2, config.batch_size // 4)))
        return res

    gs = cached_arrays(out / "grid.npz", gkey, grid_scores)
    grid = {c.name: {t: {"score": _mean_ci(gs[t][i], config.n_boot, config.seed),
                         "delta": _mean_ci(gs[t][i] - gs[t][0], config.n_boot, config.seed)} for t in gs}
            for i, c in enumerate(grid_conds)}
    compose = None
    if trait_b is not None:
        compose = _composition(model, config, cfg, pd, norms, layer, trait, trait_b, ev, evB, out,
                               digest(fp, "compose", dataclasses.asdict(config), answers_key))
    wall["compare"] = time.perf_counter() - t1
    wall["total"] = time.perf_counter() - t0

    meta = {"resid_norm": norms.tolist(), "layer": layer}
    VectorBank.from_vectors(model.name or cfg.family, {
        f"prompt:{trait.name}": v_prompt, f"finetune:{plain_final['condition']}": ft_q.mean(0),
        f"bipo:{trait.name}": bipo_full}, {k: {**meta, "regime": k.split(":")[0]} for k in (
            f"prompt:{trait.name}", f"finetune:{plain_final['condition']}", f"bipo:{trait.name}")}
    ).save(out / "vectors", overwrite=True)
    summary = {"model": model.name, "trait": trait.name, "trait_b": trait_b.name if trait_b is not None else None,
               "layer": layer, "runs": runs, "points": points, "finals": finals, "correlation": corr,
               "cosines": {"per_layer": cos, "null": null, "bipo": bipo_tab}, "grid": grid, "composition": compose,
               "residual_norm": float(norms[layer]), "prompt_vector_norm": float(np.linalg.norm(v_prompt[layer])),
               "wall_seconds": wall,
               "measures": {"trait": "contrastive likelihood: mean per-token log-prob of held-out trait answers minus "
                                     "neutral answers (same questions, no system prompt); delta vs base, bootstrap "
                                     "95% over items",
                            "shift": "mean response activation (fine-tuned - base) on held-out questions with the "
                                     "base model's own answers, projected on the unit prompt-regime vector",
                            "neutral_loss": "mean per-token NLL of the base model's own held-out answers"}}
    (out / "regimes.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "regimes.txt").write_text(report(summary))
    _plots(summary, out)
    return summary


def _composition(model: Any, config: RegimesConfig, cfg: Any, pd: dict[str, np.ndarray], norms: np.ndarray,
                 layer: int, trait: Any, trait_b: Any, ev: dict, evB: dict, out_dir: Path, key: str) -> dict[str, Any]:
    """v(A)+v(B) vs v(A and B prompted together) per layer (paired bootstrap over questions), and steering
    A then B (A at l1, B at l2) vs B then A vs A+B (both at l1) on both traits' judge-free scores."""
    A, B, AB = pd["A"], pd["B"], pd["AB"]
    add = regime_cosines(A + B, AB, paired=True)
    ratio = np.linalg.norm(AB.mean(0), axis=-1) / np.maximum(np.linalg.norm((A + B).mean(0), axis=-1), 1e-12)
    l1, l2 = tuple(config.compose_layers) or (layer, min(layer + max(cfg.n_layers // 6, 1), cfg.n_layers))
    allp = iv.Positions.all(np.ones((1, 1), bool))
    vA, vB = steering_vectors(A.mean(0), norms, "relative"), steering_vectors(B.mean(0), norms, "relative")
    c = config.steer_coeff

    def chain(a_layer: int | None, b_layer: int | None) -> Any:
        sa = iv.steer(cfg.n_resid, vA, c if a_layer else 0.0, [a_layer or l1], allp)
        sb = iv.steer(cfg.n_resid, vB, c if b_layer else 0.0, [b_layer or l1], allp)
        return iv.Chain((sa, sb))

    conds = [Condition("none", hook=chain(None, None)), Condition("A", hook=chain(l1, None)),
             Condition("B", hook=chain(None, l1)), Condition("A+B", hook=chain(l1, l1)),
             Condition("A then B", hook=chain(l1, l2)), Condition("B then A", hook=chain(l2, l1))]
    qa, pa, na = _trait_items(list(trait.eval_questions[: config.n_eval_questions]), ev)
    qb, pb, nb = _trait_items(list(trait_b.eval_questions[: config.n_eval_questions]), evB)
    bs = max(2, config.batch_size // 4)

    def scores() -> dict[str, np.ndarray]:
        return {"A": score_conditions(model, None, conds, qa, pa, batch_size=bs)
                - score_conditions(model, None, conds, qa, na, batch_size=bs),
                "B": score_conditions(model, None, conds, qb, pb, batch_size=bs)
                - score_conditions(model, None, conds, qb, nb, batch_size=bs)}

    s = cached_arrays(out_dir / "composition.npz", key, scores)
    names = [x.name for x in conds]
    table = {n: {t: _mean_ci(s[t][i] - s[t][0], config.n_boot, config.seed) for t in ("A", "B")}
             for i, n in enumerate(names)}
    i_ab, i_ba, i_sum = names.index("A then B"), names.index("B then A"), names.index("A+B")
    asym = {t: _mean_ci(s[t][i_ab] - s[t][i_ba], config.n_boot, config.seed) for t in ("A", "B")}
    additivity = {t: _mean_ci(s[t][i_sum] - s[t][names.index("A")] - s[t][names.index("B")] + s[t][0],
                              config.n_boot, config.seed) for t in ("A", "B")}
    return {"traits": {"A": trait.name, "B": trait_b.name}, "layers": [int(l1), int(l2)], "coeff": c,
            "sum_vs_joint_prompt": {"cos": add, "norm_ratio": ratio.tolist(),
                                    "at_layer": [add["cos"][layer], add["lo"][layer], add["hi"][layer]],
                                    "cos_A_AB": float(cosine(A.mean(0)[layer], AB.mean(0)[layer])),
                                    "cos_B_AB": float(cosine(B.mean(0)[layer], AB.mean(0)[layer])),
                                    "cos_A_B": float(cosine(A.mean(0)[layer], B.mean(0)[layer]))},
            "steering": table, "asymmetry_AthenB_minus_BthenA": asym, "nonadditivity_AplusB": additivity,
            "measure": "score change vs no steering (contrastive likelihood, judge-free), bootstrap 95% over items"}


def _fmt(x: Any, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _ci(t: Sequence[float], nd: int = 3) -> str:
    return f"{_fmt(t[0], nd)} [{_fmt(t[1], nd)}, {_fmt(t[2], nd)}]"


def report(s: dict[str, Any]) -> str:
    """The summary as plain text tables."""
    lines = [f"regimes: {s['model']} · trait {s['trait']} · resid[{s['layer']}] (residual norm "
             f"{s['residual_norm']:.1f}, |prompt vector| {s['prompt_vector_norm']:.2f})", "",
             "Trainers (final checkpoints): trait change = contrastive likelihood vs base [95% CI]; shift = "
             "projection of (fine-tuned - base) activation on the prompt vector",
             f"  {'run':22s} {'steps':>5s} {'train CE':>8s} {'shift':>8s} {'trait change':>26s} {'neutral NLL change':>26s}"]
    for name, p in s["finals"].items():
        r = s["runs"][name]
        lines.append(f"  {name:22s} {r['steps']:5d} {_fmt(r['final_loss'], 3):>8s} {p['shift']:8.3f} "
                     f"{_ci(p['trait_delta']):>26s} {_ci(p['neutral_loss_delta']):>26s}")
    c = s["correlation"]
    lines += ["", f"Fine-tuning shift vs trait change over {c['n_points']} checkpoints (all runs + base): "
              f"r = {_fmt(c['response_mean'].get('r'))} [{_fmt(c['response_mean'].get('lo'))}, "
              f"{_fmt(c['response_mean'].get('hi'))}] (checkpoints of one run are not independent); final checkpoints "
              f"only: r = {_fmt(c['finals'].get('r'))} [{_fmt(c['finals'].get('lo'))}, {_fmt(c['finals'].get('hi'))}] "
              f"(n {c['finals']['n']}); last-prompt-token shift r = {_fmt(c['prompt_last'].get('r'))}"]
    lines += ["", "Cosines between regimes [95% jackknife over questions]; null = split-half within a regime (median [2.5, 97.5])"]
    for b in s["cosines"]["bipo"]:
        lines.append(f"  resid[{b['layer']}]: prompt-finetune {_ci(b['prompt_vs_finetune'])}  prompt-BiPO "
                     f"{_ci(b['prompt_vs_bipo'])}  finetune-BiPO {_ci(b['finetune_vs_bipo'])}")
        lines.append(f"             null prompt {_ci(b['null_prompt'])}  null finetune {_ci(b['null_finetune'])}")
    lines += ["", "Regime grid (one vmapped computation): change in each trait's score vs base [95% CI, paired over items]"]
    for name, g in s["grid"].items():
        lines.append(f"  {name:22s} " + "  ".join(f"{t}: {_ci(v['delta'])}" for t, v in g.items()))
    comp = s.get("composition")
    if comp:
        sj = comp["sum_vs_joint_prompt"]
        lines += ["", f"Composition {comp['traits']['A']} (A) + {comp['traits']['B']} (B), steering at "
                  f"resid{comp['layers']} coeff {comp['coeff']} x residual norm",
                  f"  cos(v(A)+v(B), v(A and B prompted together)) at resid[{s['layer']}]: {_ci(sj['at_layer'])}; "
                  f"cos(A,B) {sj['cos_A_B']:.3f}, cos(A,AB) {sj['cos_A_AB']:.3f}, cos(B,AB) {sj['cos_B_AB']:.3f}"]
        for name, row in comp["steering"].items():
            lines.append(f"  {name:10s} change in A score {_ci(row['A'])}   in B score {_ci(row['B'])}")
        a = comp["asymmetry_AthenB_minus_BthenA"]
        lines.append(f"  asymmetry (A then B - B then A): A {_ci(a['A'])}  B {_ci(a['B'])}")
        n = comp["nonadditivity_AplusB"]
        lines.append(f"  non-additivity (A+B - A - B + none): A {_ci(n['A'])}  B {_ci(n['B'])}")
    w = s["wall_seconds"]
    lines += ["", "wall: " + ", ".join(f"{k} {v:.0f}s" for k, v in w.items())]
    return "\n".join(lines) + "\n"


def _plots(s: dict[str, Any], out: Path) -> None:
    plots.regime_cosines(s, out / "cosines.png")
    plots.shift_vs_trait(s, out / "shift_vs_trait.png")
