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

The run directory is a :func:`~jaxpersona.runner.run.open_run` run of kind ``"regimes"`` (``run.json``,
``config.json``, the lock); each stage above is a timed :meth:`~jaxpersona.runner.run.Run.stage` whose
arrays are cached atomically (``prompt_vectors.npz``, ``evaluation.npz``, ``bipo.npz``, ``grid.npz``,
``composition.npz``) under the keys of :func:`prompt_vectors_key` and its siblings; an unreadable cache
is recomputed with one :class:`~jaxpersona.errors.CacheWarning`. :func:`run_trait_data` (kind
``"trait-data"``) and :func:`run_finetune` (kind ``"finetune"``) are the data and fine-tuning steps on
their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts import plots
from jaxpersona.artifacts.adapters import load_adapter
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.peft import load_any_adapter
from jaxpersona.artifacts.records import KeyedJsonl, digest
from jaxpersona.compute.activations import (
    VARIANTS,
    iter_activations,
    response_activations,
)
from jaxpersona.compute.bipo import bipo_vector
from jaxpersona.compute.conditions import Condition, score_conditions
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.compute.train import TrainConfig, TrainResult, inoculate, train
from jaxpersona.compute.train import config_record as train_config_record
from jaxpersona.data.chat import conversation
from jaxpersona.data.configs import (
    check_positive,
    check_types,
    read_toml,
    replace_checked,
    resid_point,
)
from jaxpersona.edit import interventions as iv
from jaxpersona.edit.directions import bank_resid_norm, steering_vectors
from jaxpersona.measure import stats
from jaxpersona.model.lora import Adapter, stack_adapters
from jaxpersona.runner.run import Run, open_run
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
        if self.kl_beta < 0:  # checked here, not at the fine-tune stage minutes later
            raise errors.InputError(f"regimes kl_beta must be >= 0, got {self.kl_beta}")
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
def trait_data(model: Model, trait: Any, questions: Sequence[str], n_pairs: int, store: KeyedJsonl, *,
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
def per_question_means(model: Model, questions: Sequence[str], answers: list[list[str]], system: Sequence[str | None],
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
        missing = [questions[int(i)] for i in np.flatnonzero(counts == 0)]
        raise errors.FilterError(f"no non-empty answer for questions {missing[:3]}; raise max_new_tokens")
    means = sums / counts[:, None, None]
    return (means, norm_sum / len(rows)) if with_norms else means


# Not :func:`jaxpersona.edit.directions.unit` / ``cosine``: that ``unit`` returns float32 and that ``cosine``
# divides the dot product by the norms' product, so both differ from these in the last bits. The prevention
# vector built from ``_unit`` is part of the trainer's resume fingerprint (a float32 unit would make every
# earlier ``steer-trait`` run retrain), and the reported cosines keep their exact values.
def _unit(v: np.ndarray) -> np.ndarray:
    """``v / |v|`` along the last axis in ``v``'s own dtype (zeros stay zero): ``[..., D]``."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis of ``[..., D]`` arrays: ``[...]``."""
    return (_unit(a) * _unit(b)).sum(-1)


def regime_cosines(diff_a: np.ndarray, diff_b: np.ndarray | None, fixed_b: np.ndarray | None = None, *,
                 paired: bool = False) -> dict[str, list[float]]:
    """Per layer cos(mean_q diff_a, mean_q diff_b) (or cos with ``fixed_b [L+1, D]``) with a 95% jackknife
    interval over questions: leave one question out (of each side in turn, or of both at once with
    ``paired``) and combine the variances. (A bootstrap interval is biased here: resampled means of
    duplicated questions are noisier, which pulls the cosine toward 0 and can leave the estimate outside
    its own percentile interval.) Returns ``{"cos": [L+1], "lo": [L+1], "hi": [L+1]}``."""
    a_full = diff_a.mean(0)
    b_full = diff_b.mean(0) if diff_b is not None else fixed_b
    if b_full is None:
        raise errors.InputError("regime_cosines needs diff_b or fixed_b")
    point = _cosine(a_full, b_full)

    def loo(x: np.ndarray) -> np.ndarray:  # leave-one-out means [n, L+1, D]
        return (x.sum(0)[None] - x) / (len(x) - 1)

    if paired:
        if diff_b is None:
            raise errors.InputError("a paired interval needs diff_b")
        lo, hi = stats.jackknife_interval(point, _cosine(loo(diff_a), loo(diff_b)))
    else:
        parts = [_cosine(loo(diff_a), b_full[None])]
        if diff_b is not None:
            parts.append(_cosine(a_full[None], loo(diff_b)))
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
        cs.append(_cosine(diff[perm[: q // 2]].mean(0), diff[perm[q // 2 :]].mean(0)))
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


# --- cache keys: what each cached stage is computed from (unchanged since jaxpersona 0.4, so older run
# directories resume without recomputing) -----------------------------------------------------------------
def answers_key(tr: Any, ev: Any, tr_b: Any = None, ev_b: Any = None) -> str:
    """Digest of every answer a run's later stages are computed from (``trait_data`` results)."""
    return digest(tr, ev, tr_b, ev_b)


def prompt_vectors_key(fp: str, config: RegimesConfig, answers: str) -> str:
    """Key of ``prompt_vectors.npz`` (``fp``: the model fingerprint, ``answers``: :func:`answers_key`)."""
    return digest(fp, "prompt", dataclasses.asdict(config), answers)


def evaluation_key(fp: str, snaps: Sequence[tuple[str, int | str]], config: RegimesConfig, train_config: TrainConfig,
                   answers: str) -> str:
    """Key of ``evaluation.npz``: every (run name, adapter step) snapshot (and ``(adapter:NAME, file digest)`` of
    each adapter from elsewhere), both configs, the answers."""
    return digest(fp, "eval", [(n, s) for n, s in snaps], dataclasses.asdict(config),
                  train_config_record(train_config), answers)


def bipo_key(fp: str, layers: tuple[int, ...], config: RegimesConfig, answers: str) -> str:
    """Key of ``bipo.npz`` (``layers``: the BiPO resid points)."""
    return digest(fp, "bipo", layers, dataclasses.asdict(config), answers)


def grid_key(eval_key: str, trait_b: str | None) -> str:
    """Key of ``grid.npz``: the evaluation's key and the second trait's name (None without one)."""
    return digest(eval_key, "grid", trait_b)


def composition_key(fp: str, config: RegimesConfig, answers: str) -> str:
    """Key of ``composition.npz``."""
    return digest(fp, "compose", dataclasses.asdict(config), answers)


# --- preventative interventions ---------------------------------------------------------------------------
PREVENTIONS = ("steer", "ablate")


def prevention_intervention(n_resid: int, vector: np.ndarray, kind: str, coeff: float, layer: int) -> Any:
    """The intervention of preventative training at ``resid[layer]``, every position: ``"steer"`` adds
    ``coeff * vector`` (``[D]``), ``"ablate"`` projects the ``vector`` direction out (``coeff`` unused)."""
    if kind not in PREVENTIONS:
        raise errors.InputError(f"prevention must be one of {list(PREVENTIONS)}, got {kind!r}")
    allp = iv.Positions.all(np.ones((1, 1), bool))
    if kind == "steer":
        return iv.steer(n_resid, vector, coeff, [layer], allp)
    return iv.ablate(n_resid, vector, [layer], allp)


def prevention_from_bank(model: Model, bank_dir: str | Path, entry: str | None = None, *, kind: str = "steer",
                         coeff: float = 5.0, layer: int = -1, units: str = "absolute") -> Any:
    """The preventative intervention from vector bank entry ``entry`` (default: the bank's first) at resid
    ``layer`` (-1 = the middle): ``units="absolute"`` the raw vector times ``coeff`` (the reference),
    ``"relative"`` ``coeff`` times the residual norm the bank recorded (times the unit vector)."""
    if units not in ("relative", "absolute"):
        raise errors.InputError(f"prevention units must be 'relative' or 'absolute', got {units!r}")
    bank = VectorBank.load(bank_dir, model.cfg)
    entry = entry or bank.names[0]
    if entry not in bank:
        raise errors.InputError(f"--prevent-entry {entry!r} not in the bank; it has {list(bank.names)}")
    l = resid_point(model.cfg.n_layers, layer, "--prevent-layer")
    vecs = steering_vectors(bank.get(entry), bank_resid_norm(bank, entry), units)
    return prevention_intervention(model.cfg.n_resid, vecs[l], kind, coeff, l)


# --- the data and fine-tuning steps as runs of their own --------------------------------------------------
def chat_rows(examples: Sequence[tuple[list[dict[str, str]], str]]) -> list[dict[str, Any]]:
    """Examples as chat JSONL rows ``{"messages": [..., assistant]}`` (the format ``read_dataset`` reads)."""
    return [{"messages": [*prompt, {"role": "assistant", "content": resp}]} for prompt, resp in examples]


def run_trait_data(model: Model, trait: Any, questions: Sequence[str], n_pairs: int, out_dir: str | Path, *,
                   max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 16, progress: bool = True, log: Callable[[str], None] = print
                   ) -> dict[str, int]:
    """A ``trait-data`` run: the model's answers to ``questions`` (cached in ``answers.jsonl``) written as
    ``trait.jsonl`` (under the trait's positive prompts), ``neutral.jsonl`` (no system prompt) and
    ``counter.jsonl`` (negative prompts), each without the system prompt. Returns ``{name: examples}``."""
    if n_pairs < 1 or not questions:
        raise errors.InputError("--n-pairs must be >= 1 and the trait needs questions")
    settings = {"model": model.name, "trait": trait.name, "questions": list(questions), "n_pairs": n_pairs,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "batch_size": batch_size}
    counts: dict[str, int] = {}
    with open_run(out_dir, "trait-data", settings, model=model, seeds={"seed": seed}, log=log,
                  progress=progress) as run:
        with run.stage("generate"):
            ans = trait_data(model, trait, questions, n_pairs, run.records("answers.jsonl"),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             batch_size=batch_size, progress=progress)
        with run.stage("write"):
            for name, side in (("trait", "pos"), ("neutral", "plain"), ("counter", "neg")):
                ex = as_examples(questions, ans[side])
                run.write_jsonl(f"{name}.jsonl", chat_rows(ex))
                counts[name] = len(ex)
    return counts


def run_finetune(model: Model, examples: Sequence[Any], config: TrainConfig, out_dir: str | Path, *,
                 neutral: Sequence[Any] | None = None, inoculation: str = "", prevention: Any = None,
                 settings: Mapping[str, Any] | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> TrainResult:
    """A ``finetune`` run: :func:`~jaxpersona.compute.train.train` on ``examples`` (with ``inoculation`` as
    their system prompt when given) in ``out_dir``. The trainer keeps its own Orbax checkpoints, adapter
    snapshots and ``log.jsonl`` (a rerun resumes from its last checkpoint); the run adds ``run.json``,
    ``config.json`` (the train config and ``settings``, e.g. the data and prevention it came from) and the lock."""
    config.validate()
    cfg = {"model": model.name, **dict(settings or {}), "train": dataclasses.asdict(config)}
    with open_run(out_dir, "finetune", cfg, model=model, seeds={"seed": config.seed}, log=log,
                  progress=progress) as run:
        with run.stage("train"):
            return train(model, inoculate(examples, inoculation), config, run.out, neutral=neutral,
                         prevention=prevention, progress=progress)


# --- the regimes run -----------------------------------------------------------------------------------------
STAGES = ("data", "prompt_vectors", "fine_tune", "evaluate", "bipo", "compare")  # timed in wall_seconds


@dataclasses.dataclass
class _Ctx:
    """What every stage of one regimes run reads."""

    run: Run
    model: Model
    trait: Any
    trait_b: Any
    config: RegimesConfig
    train_config: TrainConfig
    fp: str
    layer: int
    train_q: list[str]
    eval_q: list[str]
    progress: bool
    external: dict[str, tuple[Adapter, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    @property
    def bs(self) -> int:  # scoring batch
        return max(2, self.config.batch_size // 4)

    def sys_prompts(self, trait: Any, side: str) -> list[str]:
        return [trait.system_prompt(side, i % len(trait.pairs)) for i in range(self.config.n_pairs)]


@dataclasses.dataclass
class _Answers:
    """Stage 1: the answers (``{side: [question][pair]}``) and the datasets made of them."""

    tr: dict[str, list[list[str]]]
    ev: dict[str, list[list[str]]]
    tr_b: dict[str, list[list[str]]] | None
    ev_b: dict[str, list[list[str]]] | None
    extra: dict[str, tuple[str, str]]
    key: str
    data: dict[str, list[Any]]


@dataclasses.dataclass
class _Evaluation:
    """Stage 4: every snapshot as a condition, their stacked adapters and what was measured."""

    conds: list[Condition]
    stack: Any
    key: str
    items: tuple[list[str], list[str], list[str]]  # (question, trait answer, neutral answer) per item
    ft_diff: np.ndarray  # [K, 3, L+1, Q, D] fine-tuned minus base activations per question
    points: list[dict[str, Any]]
    finals: dict[str, dict[str, Any]]
    corr: dict[str, Any]


def load_external_adapters(adapters: Mapping[str, str | Path] | None, cfg: Any, log: Callable[[str], None] = print
                           ) -> dict[str, tuple[Adapter, dict[str, Any]]]:
    """Adapters trained elsewhere as regimes: ``{NAME: directory}`` (a peft adapter, a Trainer directory of
    ``checkpoint-N`` or a jaxpersona Orbax adapter; :func:`~jaxpersona.artifacts.peft.load_any_adapter`) ->
    ``{NAME: (adapter, meta)}``, every one checked against the model before anything runs."""
    out: dict[str, tuple[Adapter, dict[str, Any]]] = {}
    for name, path in (adapters or {}).items():
        if not isinstance(name, str) or not name or name == "base" or any(c in name for c in "@/ \t"):
            raise errors.InputError(f"adapter name {name!r}: give a short name without '@', '/' or spaces "
                                    "(not 'base'), as NAME=DIR")
        out[name] = load_any_adapter(path, cfg, log=log)
    return out


def adapter_record(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the run records of an adapter from elsewhere: source path, checkpoint, file digest, peft config,
    base name, rank / alpha / scale (the per-layer lists left out)."""
    return {k: v for k, v in meta.items() if k not in ("layers", "ignored")} | {"ignored": len(meta.get("ignored", []))}


def run_regimes(model: Model, trait: Any, config: RegimesConfig, train_config: TrainConfig, out_dir: str | Path, *,
                trait_b: Any = None, adapters: Mapping[str, str | Path] | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole regimes run (see the module docstring); writes ``regimes.json`` / ``regimes.txt``.

    ``adapters``: ``{NAME: directory}`` of adapters trained elsewhere (peft, e.g. persona_vectors' ``checkpoint-N``,
    or Orbax), evaluated beside the snapshots as condition ``adapter:NAME`` and added to the regime grid; their
    source, digest, peft config and base name go to ``config.json`` and ``regimes.json``."""
    cfg = model.cfg
    config.validate(cfg)
    train_config.validate()
    external = load_external_adapters(adapters, cfg, log)
    if len(trait.questions) < config.n_train_questions or len(trait.eval_questions) < config.n_eval_questions:
        raise errors.InputError(f"trait {trait.name!r} has {len(trait.questions)} questions and "
                                f"{len(trait.eval_questions)} eval questions; the config asks for "
                                f"{config.n_train_questions} and {config.n_eval_questions}")
    if trait_b is not None and len(trait_b.questions) < 1:
        raise errors.InputError(f"trait {trait_b.name!r} has no questions")
    settings = {"model": model.name, "regimes": dataclasses.asdict(config), "train": dataclasses.asdict(train_config)}
    if external:
        settings["adapters"] = {n: adapter_record(m) for n, (_, m) in external.items()}
    with open_run(out_dir, "regimes", settings, model=model, seeds={"seed": config.seed, "train": train_config.seed},
                  log=log, progress=progress) as run:
        ctx = _Ctx(run, model, trait, trait_b, config, train_config, model_fingerprint(model),
                   config.resid(cfg.n_layers), list(trait.questions[: config.n_train_questions]),
                   list(trait.eval_questions[: config.n_eval_questions]), progress, external)
        with run.stage("data", f"[1/6] answers: {trait.name} on {len(ctx.train_q)} train + {len(ctx.eval_q)} eval "
                       f"questions x {config.n_pairs} pairs"):
            ans = _stage_data(ctx)
        with run.stage("prompt_vectors"):
            pd = _stage_prompt_vectors(ctx, ans)
        u = _unit(pd["A"].mean(0)[ctx.layer])  # unit prompt-regime vector at `layer` [D] (float64)
        with run.stage("fine_tune"):
            runs = _stage_fine_tune(ctx, ans, u * pd["norms"][ctx.layer] if config.prevention == "steer" else u)
        with run.stage("evaluate"):
            evl = _stage_evaluate(ctx, ans, runs, u)
        with run.stage("bipo"):
            bp = _stage_bipo(ctx, ans)
        with run.stage("compare"):
            parts = _stage_compare(ctx, ans, pd, evl, bp)
        wall = run.wall()
        wall = {k: wall.get(k, 0.0) for k in STAGES}
        wall["total"] = run.elapsed()
        with run.stage("write"):
            return _write_summary(ctx, pd, runs, evl, parts, wall)


def _stage_data(ctx: _Ctx) -> _Answers:
    """Stage 1: the model's answers (cached in ``answers.jsonl``) and ``data/{trait,neutral,mixed}.jsonl``."""
    config, trait, trait_b, run = ctx.config, ctx.trait, ctx.trait_b, ctx.run
    gen: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
               seed=config.seed, batch_size=config.batch_size, progress=ctx.progress)
    store = run.records("answers.jsonl")
    extra = {}
    if trait_b is not None:
        extra["AB"] = (f"{trait.system_prompt('pos', 0)} {trait_b.system_prompt('pos', 0)}",
                       f"{trait.system_prompt('neg', 0)} {trait_b.system_prompt('neg', 0)}")
    tr = trait_data(ctx.model, trait, ctx.train_q, config.n_pairs, store, extra_systems=extra, **gen)
    ev = trait_data(ctx.model, trait, ctx.eval_q, config.n_pairs, store, **gen)
    tr_b = ev_b = None
    if trait_b is not None:
        tr_b = trait_data(ctx.model, trait_b, ctx.train_q, config.n_pairs, store, **gen)
        ev_b = trait_data(ctx.model, trait_b, list(trait_b.eval_questions[: config.n_eval_questions]), config.n_pairs,
                          store, **gen)
    trait_ex, neutral_ex = as_examples(ctx.train_q, tr["pos"]), as_examples(ctx.train_q, tr["plain"])
    data = {"trait": trait_ex, "neutral": neutral_ex, "mixed": mixed_examples(trait_ex, neutral_ex)}
    for name, ex in data.items():
        run.write_jsonl(f"data/{name}.jsonl", chat_rows(ex))
    return _Answers(tr, ev, tr_b, ev_b, extra, answers_key(tr, ev, tr_b, ev_b), data)


def _stage_prompt_vectors(ctx: _Ctx, ans: _Answers) -> dict[str, np.ndarray]:
    """Stage 2: per-question prompt-regime differences ``A`` (and ``B``, ``AB``) ``[Q, L+1, D]`` and the mean
    residual norm per resid point ``norms [L+1]``, cached in ``prompt_vectors.npz``."""
    config, model, tr, bs = ctx.config, ctx.model, ans.tr, ctx.config.batch_size
    n = config.n_pairs

    def prompt_diffs() -> dict[str, np.ndarray]:
        pos_m, norms = per_question_means(model, ctx.train_q, tr["pos"], ctx.sys_prompts(ctx.trait, "pos"), bs,
                                          with_norms=True)
        res = {"A": pos_m - per_question_means(model, ctx.train_q, tr["neg"], ctx.sys_prompts(ctx.trait, "neg"), bs),
               "norms": norms}
        if ctx.trait_b is not None:
            assert ans.tr_b is not None
            res["B"] = (per_question_means(model, ctx.train_q, ans.tr_b["pos"], ctx.sys_prompts(ctx.trait_b, "pos"), bs)
                        - per_question_means(model, ctx.train_q, ans.tr_b["neg"], ctx.sys_prompts(ctx.trait_b, "neg"),
                                             bs))
            res["AB"] = (per_question_means(model, ctx.train_q, tr["AB:pos"], [ans.extra["AB"][0]] * n, bs)
                         - per_question_means(model, ctx.train_q, tr["AB:neg"], [ans.extra["AB"][1]] * n, bs))
        return res

    pd = ctx.run.arrays("prompt_vectors.npz", prompt_vectors_key(ctx.fp, config, ans.key), prompt_diffs)
    v_prompt, norms = pd["A"].mean(0), pd["norms"]
    ctx.run.log(f"[2/6] prompt-regime vector: |v| at resid[{ctx.layer}] = {np.linalg.norm(v_prompt[ctx.layer]):.2f} "
                f"(residual norm {norms[ctx.layer]:.1f})")
    return pd


def _stage_fine_tune(ctx: _Ctx, ans: _Answers, prevention_vector: np.ndarray) -> dict[str, dict[str, Any]]:
    """Stage 3: every trainer x dataset LoRA run in ``runs/NAME`` (each resumes on its own); returns
    ``{name: {trainer, dataset, steps, checkpoints, final_loss, skipped, examples}}``."""
    config, train_config, data = ctx.config, ctx.train_config, ans.data
    prevention = prevention_intervention(ctx.model.cfg.n_resid, prevention_vector, config.prevention,
                                         config.prevention_coeff, ctx.layer)
    inoc = ctx.trait.system_prompt("pos", config.inoculation_pair % len(ctx.trait.pairs))
    runs: dict[str, dict[str, Any]] = {}
    plan = [(t, "trait") for t in config.trainers] + [("plain", d) for d in config.datasets if d != "trait" or
                                                       "plain" not in config.trainers]
    for trainer, ds in plan:
        name = f"{trainer}-{ds}"
        ex = inoculate(data[ds], inoc) if trainer == "inoculate" else data[ds]
        tc = train_config.replace(kl_beta=config.kl_beta) if trainer == "kl" else train_config
        ctx.run.log(f"[3/6] fine-tune {name}: {len(ex)} examples, {tc.epochs} epoch(s), batch "
                    f"{tc.batch_size}x{tc.grad_accum}")
        res = train(ctx.model, ex, tc, ctx.run.path("runs") / name, neutral=data["neutral"] if trainer == "kl" else None,
                    prevention=prevention if trainer == "steer" else None, progress=ctx.progress)
        runs[name] = {"trainer": trainer, "dataset": ds, "steps": res.steps, "checkpoints": res.checkpoints,
                      "final_loss": res.log[-1]["ce"] if res.log else None, "skipped": res.skipped,
                      "examples": res.n_examples, "train_eot": res.train_eot}
    return runs


def _stage_evaluate(ctx: _Ctx, ans: _Answers, runs: dict[str, dict[str, Any]], u: np.ndarray) -> _Evaluation:
    """Stage 4: every snapshot in one stacked computation (trait score, neutral loss; cached in
    ``evaluation.npz``), the fine-tuning shift along ``u [D]``, and shift vs trait change."""
    model, cfg, config, eval_q, ev = ctx.model, ctx.model.cfg, ctx.config, ctx.eval_q, ans.ev
    snaps = [(name, s) for name, r in runs.items() for s in r["checkpoints"]]
    adapters = [load_adapter(ctx.run.path("runs") / n / "adapters" / f"step_{s}", cfg)[0] for n, s in snaps]
    adapters += [ad for ad, _ in ctx.external.values()]
    stack = stack_adapters([None, *adapters], cfg)
    conds = [Condition("base")] + [Condition(f"{n}@{s}", adapter=k + 1) for k, (n, s) in enumerate(snaps)]
    conds += [Condition(f"adapter:{n}", adapter=len(snaps) + k + 1) for k, n in enumerate(ctx.external)]
    e_q, e_pos, e_neg = _trait_items(eval_q, ev)
    neutral_q = [q for q, row in zip(eval_q, ev["plain"]) for a in row]
    neutral_a = [a for row in ev["plain"] for a in row]
    ext_keys = [(f"adapter:{n}", str(m.get("sha256") or m["digest"])) for n, (_, m) in ctx.external.items()]
    # the end-of-turn setting the runs really trained with (off when resumed from before the option existed)
    trained = dataclasses.replace(ctx.train_config, train_eot=all(r.get("train_eot", True) for r in runs.values()))
    ekey = evaluation_key(ctx.fp, [*snaps, *ext_keys], config, trained, ans.key)

    def evaluate() -> dict[str, np.ndarray]:
        n_pos, n_neg = len(e_q), len(e_q)
        lp = score_conditions(model, stack, conds, e_q + e_q + neutral_q, e_pos + e_neg + neutral_a,
                              batch_size=ctx.bs)
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

    ev_arr = ctx.run.arrays("evaluation.npz", ekey, evaluate)
    acts = ev_arr["acts"]  # [K, 3, L+1, Q, D]
    ft_diff = acts - acts[:1]  # fine-tuned minus base, per question
    points = _points(ctx, conds, ev_arr, ft_diff, u)
    own = points[: 1 + len(snaps)]  # base and this run's snapshots (adapters from elsewhere are reported apart)
    shifts = [p["shift"] for p in own]
    deltas = [p["trait_delta"][0] for p in own]
    corr: dict[str, Any] = {"response_mean": stats.pearson_ci(shifts, deltas),
            "prompt_last": stats.pearson_ci([p["shift_last_prompt"] for p in own], deltas),
            "n_points": len(own), "measure": "trait change = contrastive likelihood (judge-free)"}
    finals = {n: next(p for p in points if p["condition"] == f"{n}@{r['checkpoints'][-1]}") for n, r in runs.items()}
    last = [points[0], *finals.values()]  # one point per run (+ base): independent runs only
    corr["finals"] = stats.pearson_ci([p["shift"] for p in last], [p["trait_delta"][0] for p in last])
    ctx.run.log(f"[4/6] evaluated {len(snaps)} snapshots + base: shift vs trait change r = "
                f"{_fmt(corr['response_mean'].get('r'))} (n {len(points)})")
    return _Evaluation(conds, stack, ekey, (e_q, e_pos, e_neg), ft_diff, points, finals, corr)


def _points(ctx: _Ctx, conds: list[Condition], ev_arr: dict[str, np.ndarray], ft_diff: np.ndarray,
            u: np.ndarray) -> list[dict[str, Any]]:
    """One point per condition: its shift along ``u``, trait change and neutral-loss change vs base."""
    config, layer = ctx.config, ctx.layer
    trait_items = ev_arr["pos"] - ev_arr["neg"]  # [K, items] contrastive likelihood per item
    base_items = trait_items[0]
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
    return points


def _stage_bipo(ctx: _Ctx, ans: _Answers) -> dict[str, np.ndarray]:
    """Stage 5: BiPO vectors at ``bipo_layers`` (``vectors [n, D]``, ``losses [n, steps]``; ``bipo.npz``)."""
    config, tr = ctx.config, ans.tr
    bipo_layers = tuple(config.bipo_layers) or (ctx.layer,)
    bq = [q for q, row in zip(ctx.train_q, tr["pos"]) for _ in row]
    bpos = [a for row in tr["pos"] for a in row]
    bneg = [a for row in tr["neg"] for a in row]

    def bipo_all() -> dict[str, np.ndarray]:
        vs, ls = [], []
        for l in bipo_layers:
            ctx.run.log(f"[5/6] BiPO at resid[{l}]: {config.bipo_steps} steps")
            v, losses = bipo_vector(ctx.model, bq, bpos, bneg, l, steps=config.bipo_steps, lr=config.bipo_lr,
                                    beta=config.bipo_beta, batch_size=config.bipo_batch, seed=config.seed)
            vs.append(v)
            ls.append(losses)
        return {"vectors": np.stack(vs), "losses": np.asarray(ls)}

    return ctx.run.arrays("bipo.npz", bipo_key(ctx.fp, bipo_layers, config, ans.key), bipo_all)


def _stage_compare(ctx: _Ctx, ans: _Answers, pd: dict[str, np.ndarray], evl: _Evaluation,
                   bp: dict[str, np.ndarray]) -> dict[str, Any]:
    """Stage 6: cosines between regimes with their nulls, the regime grid and the composition analyses."""
    config, cfg, layer = ctx.config, ctx.model.cfg, ctx.layer
    bipo_layers = tuple(config.bipo_layers) or (layer,)
    plain_final = evl.finals.get("plain-trait") or next(iter(evl.finals.values()))
    k_plain = [c.name for c in evl.conds].index(plain_final["condition"])
    ft_q = np.moveaxis(evl.ft_diff[k_plain, VARIANTS.index("response_mean")], 1, 0)  # [Q, L+1, D]
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
    grid = _grid(ctx, ans, pd, evl, k_plain)
    compose = None
    if ctx.trait_b is not None:
        compose = _composition(ctx, ans, pd, composition_key(ctx.fp, config, ans.key))
    return {"cos": cos, "null": null, "bipo": bipo_tab, "bipo_full": bipo_full, "grid": grid, "composition": compose,
            "plain_final": plain_final, "ft_q": ft_q}


def _grid(ctx: _Ctx, ans: _Answers, pd: dict[str, np.ndarray], evl: _Evaluation, k_plain: int) -> dict[str, Any]:
    """The regime grid: {base, adapter} x {no prompt, trait prompt} x {no steering, steering} -> both traits'
    scores (``grid.npz``), as ``{condition: {trait: {"score", "delta"}}}`` with bootstrap intervals."""
    config, cfg, layer, model, bs = ctx.config, ctx.model.cfg, ctx.layer, ctx.model, ctx.bs
    allp = iv.Positions.all(np.ones((1, 1), bool))
    steer_vec = steering_vectors(pd["A"].mean(0), pd["norms"], "relative")
    pos_sys = ctx.sys_prompts(ctx.trait, "pos")
    grid_conds = []
    n_own = len(evl.conds) - len(ctx.external)
    groups = [("base", 0), ("adapter", k_plain), *[(f"adapter:{n}", n_own + k) for k, n in enumerate(ctx.external)]]
    for ad_name, ad_k in groups:
        for pr_name, system in (("", None), ("+prompt", pos_sys[0])):
            for st_name, coeff in (("", 0.0), ("+steer", config.steer_coeff)):
                hook = iv.steer(cfg.n_resid, steer_vec, coeff if coeff else 0.0, [layer], allp)
                grid_conds.append(Condition(ad_name + pr_name + st_name, ad_k, system, hook))
    e_q, e_pos, e_neg = evl.items
    trait_b = ctx.trait_b

    def grid_scores() -> dict[str, np.ndarray]:
        lp_p = score_conditions(model, evl.stack, grid_conds, e_q, e_pos, batch_size=bs)
        lp_n = score_conditions(model, evl.stack, grid_conds, e_q, e_neg, batch_size=bs)
        res = {"A": lp_p - lp_n}
        if trait_b is not None and ans.ev_b is not None:
            bq_, bp_, bn_ = _trait_items(list(trait_b.eval_questions[: config.n_eval_questions]), ans.ev_b)
            res["B"] = (score_conditions(model, evl.stack, grid_conds, bq_, bp_, batch_size=bs)
                        - score_conditions(model, evl.stack, grid_conds, bq_, bn_, batch_size=bs))
        return res

    gkey = grid_key(evl.key, trait_b.name if trait_b is not None else None)
    gs = ctx.run.arrays("grid.npz", gkey, grid_scores)
    return {c.name: {t: {"score": _mean_ci(gs[t][i], config.n_boot, config.seed),
                         "delta": _mean_ci(gs[t][i] - gs[t][0], config.n_boot, config.seed)} for t in gs}
            for i, c in enumerate(grid_conds)}


def _write_summary(ctx: _Ctx, pd: dict[str, np.ndarray], runs: dict[str, dict[str, Any]], evl: _Evaluation,
                   parts: dict[str, Any], wall: dict[str, float]) -> dict[str, Any]:
    """``vectors/`` (bank of the three regimes' vectors), ``regimes.json``, ``regimes.txt`` and the plots."""
    model, trait, trait_b, layer, run = ctx.model, ctx.trait, ctx.trait_b, ctx.layer, ctx.run
    v_prompt, norms = pd["A"].mean(0), pd["norms"]
    final_name = f"finetune:{parts['plain_final']['condition']}"
    names = (f"prompt:{trait.name}", final_name, f"bipo:{trait.name}")
    meta = {"resid_norm": norms.tolist(), "layer": layer}
    VectorBank.from_vectors(model.name or model.cfg.family, dict(zip(names, (
        v_prompt, parts["ft_q"].mean(0), parts["bipo_full"]))), {k: {**meta, "regime": k.split(":")[0]} for k in names}
    ).save(run.path("vectors"), overwrite=True)
    summary = {"model": model.name, "trait": trait.name, "trait_b": trait_b.name if trait_b is not None else None,
               "layer": layer, "runs": runs, "points": evl.points, "finals": evl.finals, "correlation": evl.corr,
               "cosines": {"per_layer": parts["cos"], "null": parts["null"], "bipo": parts["bipo"]},
               "grid": parts["grid"], "composition": parts["composition"], "adapters": _external_summary(ctx, pd, evl),
               "residual_norm": float(norms[layer]), "prompt_vector_norm": float(np.linalg.norm(v_prompt[layer])),
               "wall_seconds": wall,
               "measures": {"trait": "contrastive likelihood: mean per-token log-prob of held-out trait answers minus "
                                     "neutral answers (same questions, no system prompt); delta vs base, bootstrap "
                                     "95% over items",
                            "shift": "mean response activation (fine-tuned - base) on held-out questions with the "
                                     "base model's own answers, projected on the unit prompt-regime vector",
                            "neutral_loss": "mean per-token NLL of the base model's own held-out answers"}}
    run.write_json("regimes.json", summary, indent=2, default=float)
    run.write_text("regimes.txt", report(summary))
    _plots(summary, run.out)
    return summary


def _external_summary(ctx: _Ctx, pd: dict[str, np.ndarray], evl: _Evaluation) -> dict[str, Any]:
    """Per adapter from elsewhere: what the run recorded of it, its evaluation point (shift, trait change,
    neutral-loss change vs base) and cos(its fine-tuning vector, the prompt-regime vector) at ``layer``."""
    out: dict[str, Any] = {}
    names = [c.name for c in evl.conds]
    for n, (_, meta) in ctx.external.items():
        k = names.index(f"adapter:{n}")
        ft = np.moveaxis(evl.ft_diff[k, VARIANTS.index("response_mean")], 1, 0)  # [Q, L+1, D]
        c = regime_cosines(pd["A"], ft)
        out[n] = {**adapter_record(meta), "point": evl.points[k],
                  "cos_prompt": [c["cos"][ctx.layer], c["lo"][ctx.layer], c["hi"][ctx.layer]]}
    return out


def _composition(ctx: _Ctx, ans: _Answers, pd: dict[str, np.ndarray], key: str) -> dict[str, Any]:
    """v(A)+v(B) vs v(A and B prompted together) per layer (paired bootstrap over questions), and steering
    A then B (A at l1, B at l2) vs B then A vs A+B (both at l1) on both traits' judge-free scores
    (``composition.npz``)."""
    config, cfg, layer, model, norms = ctx.config, ctx.model.cfg, ctx.layer, ctx.model, pd["norms"]
    A, B, AB = pd["A"], pd["B"], pd["AB"]
    assert ans.ev_b is not None  # composition runs with a second trait only
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
    qa, pa, na = _trait_items(list(ctx.trait.eval_questions[: config.n_eval_questions]), ans.ev)
    qb, pb, nb = _trait_items(list(ctx.trait_b.eval_questions[: config.n_eval_questions]), ans.ev_b)
    bs = ctx.bs

    def scores() -> dict[str, np.ndarray]:
        return {"A": score_conditions(model, None, conds, qa, pa, batch_size=bs)
                - score_conditions(model, None, conds, qa, na, batch_size=bs),
                "B": score_conditions(model, None, conds, qb, pb, batch_size=bs)
                - score_conditions(model, None, conds, qb, nb, batch_size=bs)}

    s = ctx.run.arrays("composition.npz", key, scores)
    names = [x.name for x in conds]
    table = {n: {t: _mean_ci(s[t][i] - s[t][0], config.n_boot, config.seed) for t in ("A", "B")}
             for i, n in enumerate(names)}
    i_ab, i_ba, i_sum = names.index("A then B"), names.index("B then A"), names.index("A+B")
    asym = {t: _mean_ci(s[t][i_ab] - s[t][i_ba], config.n_boot, config.seed) for t in ("A", "B")}
    additivity = {t: _mean_ci(s[t][i_sum] - s[t][names.index("A")] - s[t][names.index("B")] + s[t][0],
                              config.n_boot, config.seed) for t in ("A", "B")}
    return {"traits": {"A": ctx.trait.name, "B": ctx.trait_b.name}, "layers": [int(l1), int(l2)], "coeff": c,
            "sum_vs_joint_prompt": {"cos": add, "norm_ratio": ratio.tolist(),
                                    "at_layer": [add["cos"][layer], add["lo"][layer], add["hi"][layer]],
                                    "cos_A_AB": float(_cosine(A.mean(0)[layer], AB.mean(0)[layer])),
                                    "cos_B_AB": float(_cosine(B.mean(0)[layer], AB.mean(0)[layer])),
                                    "cos_A_B": float(_cosine(A.mean(0)[layer], B.mean(0)[layer]))},
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
    ext = s.get("adapters") or {}
    if ext:
        lines += ["", "Adapters from elsewhere (same measures; cos = with the prompt-regime vector at the layer)"]
    for name, a in ext.items():
        p = a["point"]
        lo = a.get("lora") or {}
        src = f"{a.get('format')} {a.get('source')}" + (f" ({a['checkpoint']})" if a.get("checkpoint") else "")
        lines.append(f"  {name:22s} r {lo.get('rank', a.get('rank'))} scale {_fmt(lo.get('scale'))} "
                     f"shift {p['shift']:8.3f} trait change {_ci(p['trait_delta'])} neutral NLL change {_ci(p['neutral_loss_delta'])} "
                     f"cos {_ci(a['cos_prompt'])}")
        lines.append(f"  {'':22s} {src}; base {a.get('base_model_name_or_path') or 'unnamed'}; "
                     f"sha256 {str(a.get('sha256') or a.get('digest'))[:16]}")
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
