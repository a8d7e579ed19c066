"""The persona-vector pipeline of Chen et al. 2025, batched in JAX, resumable.

``run_extract(model, trait, judge, config, out_dir)`` runs, for one trait:

1. **generate** a response for every (instruction pair side x question x sample) under the system
   prompt "You are a/an {name} assistant. {instruction}" (batched, seeded sampling);
2. **judge** each response for the trait and for coherence (0-100, expected value of the judge's
   integer distribution; see :mod:`jaxpersona.judge`);
3. **filter** aligned pairs: pos trait >= t, neg trait < t, both coherence >= c;
4. **extract** per resid point ``0..L``: ``mean(pos) - mean(neg)`` of the response-mean, prompt-mean
   and last-prompt-token activations -> a :class:`~jaxpersona.bank.VectorBank` (Orbax);
5. **choose the layer** by a steering sweep (layers x coefficients, vmapped greedy generation on
   the evaluation questions, judged): the trait-score-vs-coefficient curve per layer;
6. **monitor**: projection of the last prompt token onto the unit vector vs the judged trait score
   across system prompts that elicit the trait to different degrees (Pearson r per layer).

Every unit of work is appended to a JSONL file in the run directory as it finishes, keyed by a
hash of what determines it, so a killed run resumes without redoing finished generations or
judgements (and a changed config recomputes only what changed). Chunks of generation are fixed
by the job order and seeded by their index, so a resumed run produces the same text as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.extract import VARIANTS, iter_activations
from jaxpersona.store import KeyedJsonl, digest

Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Sizes and thresholds of one pipeline run. ``default()`` fits ~10 min on a 2-core CPU with the
    135M default model; ``full()`` follows the paper's sizes and absolute thresholds.

    ``filter``: ``"absolute"`` keeps a pair when pos trait >= ``trait_threshold``, neg trait <
    ``trait_threshold`` and both coherences >= ``coherence_threshold`` (Chen et al.: 50/50/50).
    ``"relative"`` reads the thresholds as percentiles of this run's own trait and coherence scores
    (50 = the median), which survives a weak judge whose scale is compressed or shifted (a 135M judge
    scores everything ~25); it selects the pairs the judge ranks most contrastive, not pairs that
    cross a fixed bar.
    """

    n_pairs: int = 5  # instruction pairs used (<= the trait's)
    n_questions: int = 10  # extraction questions used
    samples: int = 1  # responses per (pair side, question)
    max_new_tokens: int = 48
    temperature: float = 0.7  # the paper samples at 1.0 (full preset); a 135M model stays coherent at 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 40
    filter: str = "relative"  # "absolute" (the paper's) or "relative" (percentiles of this run's scores)
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_pairs: int = 1
    min_mass: float = 0.25
    judge_batch: int = 16
    # layer choice by steering
    steer_layers: tuple[int, ...] = ()  # () -> evenly spaced over the middle of the model
    n_steer_layers: int = 5
    steer_coeffs: tuple[float, ...] = (0.0, 4.0, 8.0)
    n_eval: int = 8
    steer_tokens: int = 40
    steer_points_per_chunk: int = 4
    # monitoring
    monitor_pairs: int = 2  # system prompts: none + pos_i + neg_i for i < monitor_pairs
    monitor_tokens: int = 40

    @classmethod
    def default(cls) -> ExtractConfig:
        return cls()

    @classmethod
    def full(cls) -> ExtractConfig:
        """Chen et al.'s sizes: 5 pairs x all extraction questions x 10 samples, 20 eval questions."""
        return cls(filter="absolute", temperature=1.0, top_p=1.0, n_questions=10_000, samples=10, max_new_tokens=256, n_eval=20, steer_tokens=128,
                   n_steer_layers=10, steer_coeffs=(0.0, 2.0, 4.0, 6.0, 8.0, 12.0), monitor_pairs=5,
                   monitor_tokens=128, batch_size=64)

    def replace(self, **kw: Any) -> ExtractConfig:
        fields = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(kw) - fields)
        if bad:
            raise errors.InputError(f"unknown extract config keys {bad}; known: {sorted(fields)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
        return dataclasses.replace(self, **kw)

    def validate(self, n_resid: int) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            ok = {"int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                  "str": isinstance(v, str)}.get(kind)
            if kind.startswith("tuple"):
                ok = isinstance(v, tuple) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            if ok is False:
                raise errors.InputError(f"extract config {f.name} = {v!r} has the wrong type; expected {kind}")
        positive = ("n_pairs", "n_questions", "samples", "max_new_tokens", "batch_size", "min_pairs", "judge_batch",
                    "n_eval", "steer_tokens", "steer_points_per_chunk", "monitor_tokens", "n_steer_layers")
        for k in positive:
            if int(getattr(self, k)) < 1:
                raise errors.InputError(f"extract config {k} must be >= 1, got {getattr(self, k)}")
        if self.filter not in ("absolute", "relative"):
            raise errors.InputError(f"extract config filter must be 'absolute' or 'relative', got {self.filter!r}")
        if self.filter == "relative" and not (0 <= self.trait_threshold <= 100 and 0 <= self.coherence_threshold <= 100):
            raise errors.InputError("with filter = 'relative' the thresholds are percentiles in [0, 100]")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise errors.InputError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        bad = [l for l in self.steer_layers if not 0 <= l < n_resid]
        if bad:
            raise errors.InputError(f"steer_layers {bad} outside resid[0..{n_resid - 1}]")
        if not self.steer_coeffs or not all(math.isfinite(c) for c in self.steer_coeffs):
            raise errors.InputError(f"steer_coeffs must be finite and non-empty, got {self.steer_coeffs}")

    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        """Steering layers: given, or ``n_steer_layers`` evenly spaced over resid[L/4 .. 3L/4]."""
        if self.steer_layers:
            return tuple(sorted(set(self.steer_layers)))
        lo, hi = max(1, n_layers // 4), max(1, (3 * n_layers) // 4)
        return tuple(sorted(set(int(round(x)) for x in np.linspace(lo, hi, self.n_steer_layers))))


def load_extract_config(path: str | Path | None, full: bool = False) -> ExtractConfig:
    """Preset (``default`` or ``full``) overridden by the ``[extract]`` table of a TOML file."""
    base = ExtractConfig.full() if full else ExtractConfig.default()
    if path is None:
        return base
    path = Path(path)
    if not path.exists():
        raise errors.InputError(f"config file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise errors.InputError(f"{path} is not valid TOML: {e}") from e
    unknown = sorted(set(table) - {"preset", "extract"})
    if unknown:
        raise errors.InputError(f"{path}: unknown top-level keys {unknown}; use preset = \"full\" and an [extract] table")
    preset = table.get("preset", "full" if full else "default")
    if preset not in ("default", "full"):
        raise errors.InputError(f"{path}: preset must be \"default\" or \"full\", got {preset!r}")
    base = ExtractConfig.full() if preset == "full" else ExtractConfig.default()
    if not isinstance(table.get("extract", {}), dict):
        raise errors.InputError(f"{path}: [extract] must be a table")
    return base.replace(**table.get("extract", {}))


LOCAL_ANSWER_PREFIX = "Score: "


def build_judge(subject: Any, spec: str = "self", *, url: str | None = None, judge_model: str | None = None,
                key_env: str | None = "OPENAI_API_KEY", answer_prefix: str = LOCAL_ANSWER_PREFIX) -> tuple[Any, str]:
    """``(judge, judge_id)``: an HTTP judge when ``url`` is given, else a local JAX judge running
    ``subject`` (``spec == "self"``) or the model ``spec`` names. ``judge_id`` keys the judgement cache
    (it never contains credentials).

    Local judges start their reply with ``answer_prefix`` ("Score: "): small chat models otherwise
    rarely put their first token on a number (SmolLM2-135M: ~10% integer mass without it, ~95% with
    it; the trailing space matters because its tokenizer writes " 57" as [" ", "5", "7"])."""
    from jaxpersona.judge import HTTPJudge, LocalJudge

    if url:
        from jaxpersona.endpoint import OpenAIEndpoint, redact_url

        if not judge_model:
            raise errors.InputError("--judge-url needs --judge-model (the model name at that endpoint)")
        return HTTPJudge(OpenAIEndpoint(url, judge_model, api_key_env=key_env)), f"http:{redact_url(url)}:{judge_model}"
    if spec == "self":
        model = subject
    else:
        from jaxpersona.model import load

        model = load(spec, dtype="float32")
    judge = LocalJudge(model, answer_prefix=answer_prefix)
    return judge, f"local:{model.name or model.cfg.family}:{getattr(judge, 'answer_prefix', '')!r}"


def model_fingerprint(model: Any) -> str:
    """Identity of a model for cache keys: name, config and a sample of the weights (so a run directory
    reused with another model never serves the first model's generations)."""
    emb = np.asarray(model.params["embed"][:8], np.float32)
    return digest(model.name, repr(model.cfg), emb.tobytes().hex())


# --- building blocks --------------------------------------------------------------------------
def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def generate_cached(
    model: Any,
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
) -> dict[str, dict[str, Any]]:
    """Generate a reply for each ``(key, conversation, extra)`` job not yet in ``store``.

    Chunks are fixed by the job order (chunk ``c`` = jobs ``c*bs .. (c+1)*bs``) and sampled with key
    ``(seed, c)``, so a resumed run reproduces an uninterrupted one. Returns ``{key: record}``.
    """
    from jaxpersona.model import pad_left

    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    ids = {k: model.tokenizer.encode(model.format_chat(conv), add_special_tokens=False) for k, conv, _ in jobs}
    width = -(-max((len(x) for x in ids.values()), default=1) // 16) * 16  # one prompt width: one compile
    bar = _bar(len(jobs), desc, progress)
    for c, chunk in enumerate(chunks):
        todo = [j for j in chunk if j[0] not in store]
        if todo:
            seqs = [ids[k] for k, _, _ in chunk]
            seqs += [seqs[-1]] * (min(batch_size, len(jobs)) - len(seqs))  # a full batch: one compile
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
) -> list[float | None]:
    """Scores of ``prompts`` (None where the judge puts < ``min_mass`` on integers), cached by
    ``(judge_id, prompt)``; each finished batch of judgements is persisted before the next."""
    from jaxpersona.judge import score_from_probs

    keys = [digest(judge_id, p) for p in prompts]
    todo = sorted({k: p for k, p in zip(keys, prompts) if k not in store}.items())
    bar = _bar(len(prompts), desc, progress)
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
        s = float(score_from_probs(np.asarray(store[k]["probs"]), min_mass))
        out.append(None if math.isnan(s) else s)
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson r (None with < 3 points or a constant input)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


# --- the pipeline -----------------------------------------------------------------------------
@dataclasses.dataclass
class ExtractResult:
    """What ``run_extract`` found; also written to ``summary.json``."""

    trait: str
    model: str
    judge: str
    n_generated: int
    n_pairs_total: int
    n_pairs_kept: int
    filter: str  # mode and the cuts used
    best_layer: int
    steering: dict[str, dict[str, dict[str, float | None]]]  # layer -> coeff -> {trait, coherence}
    monitor_r: dict[str, float | None]  # layer -> r (per response)
    monitor_r_prompt_means: float | None  # at best layer, over per-system-prompt means
    wall_s: dict[str, float]
    out_dir: str

    def table(self) -> str:
        coeffs = sorted({c for v in self.steering.values() for c in v}, key=float)
        lines = [f"trait {self.trait} on {self.model} (judge: {self.judge})",
                 f"pairs kept {self.n_pairs_kept}/{self.n_pairs_total} ({self.n_generated} responses generated; "
                 f"filter {self.filter})",
                 "steering: mean trait score (coherence) per layer x coefficient",
                 "layer  " + "  ".join(f"c={float(c):>5g}     " for c in coeffs)]
        for layer, row in self.steering.items():
            cells = []
            for c in coeffs:
                t, h = row.get(c, {}).get("trait"), row.get(c, {}).get("coherence")
                cells.append(f"{_fmt(t):>5} ({_fmt(h):>5})")
            lines.append(f"{layer:>5}  " + "  ".join(cells))
        lines.append(f"best layer: {self.best_layer}")
        r = self.monitor_r.get(str(self.best_layer))
        lines.append(f"monitoring: Pearson r(last-prompt projection, trait score) at layer {self.best_layer} = {_fmt(r, 3)}"
                     f"; over system-prompt means = {_fmt(self.monitor_r_prompt_means, 3)}")
        lines.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.wall_s.items()))
        return "\n".join(lines)


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def run_extract(
    model: Any,
    trait: Any,
    judge: Any,
    config: ExtractConfig,
    out_dir: str | Path,
    *,
    judge_id: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExtractResult:
    """Steps 1-6 for ``trait`` (a :class:`~jaxpersona.traits.Trait`); see the module docstring.

    Run directory ``out_dir``: ``responses.jsonl``, ``judgements.jsonl``, ``steering.jsonl``,
    ``monitor.jsonl`` (resumable caches), ``pairs.jsonl`` (scored pairs, kept flag), ``vectors/``
    (Orbax :class:`VectorBank`: ``{trait}`` = response-mean, ``{trait}.prompt_mean``,
    ``{trait}.prompt_last``), ``steering.csv``, ``summary.json``, ``summary.txt``, ``steering.png``,
    ``monitor.png``.
    """
    import time

    from jaxpersona.bank import VectorBank

    cfg = model.cfg
    config.validate(cfg.n_resid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"trait": trait.name, "model": model.name, "judge": judge_id,
                                                 **dataclasses.asdict(config)}, indent=2))
    responses = KeyedJsonl(out / "responses.jsonl")
    judged = KeyedJsonl(out / "judgements.jsonl")
    wall: dict[str, float] = {}
    t0 = time.perf_counter()
    gen_kw = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                  seed=config.seed, batch_size=config.batch_size, progress=progress)

    def judge_rows(rows: list[dict[str, Any]], desc: str, coherence: bool = True) -> None:
        """Adds ``trait`` and ``coherence`` scores to rows with ``question``/``response`` (None for an
        empty response, or where the judge's integer mass is below ``min_mass``)."""
        from jaxpersona.traits import coherence_prompt

        live = [r for r in rows if r["response"]]
        prompts = [trait.judge_prompt(r["question"], r["response"]) for r in live]
        if coherence:
            prompts += [coherence_prompt(r["question"], r["response"]) for r in live]
        try:
            scores = judge_cached(judge, judge_id, judged, prompts, batch=config.judge_batch,
                                  min_mass=config.min_mass, desc=desc, progress=progress)
        except errors.EndpointError as e:
            raise errors.EndpointError(f"{e} Finished generations and judgements are kept in {out}; "
                                       "rerun the same command to resume.") from e
        for r in rows:
            r["trait"] = r["coherence"] = None
        for i, r in enumerate(live):
            r["trait"] = scores[i]
            r["coherence"] = scores[len(live) + i] if coherence else None

    mid = model_fingerprint(model)

    # 1. generate -----------------------------------------------------------------------------
    n_pairs = min(config.n_pairs, len(trait.pairs))
    questions = list(trait.questions[: config.n_questions])
    jobs = []
    for i in range(n_pairs):
        for qi, q in enumerate(questions):
            for s in range(config.samples):
                for side in ("pos", "neg"):
                    system = trait.system_prompt(side, i)
                    conv = [{"role": "system", "content": system}, {"role": "user", "content": q}]
                    key = digest("extract", mid, side, system, q, s, config.max_new_tokens, config.temperature,
                                 config.top_p, config.seed)
                    jobs.append((key, conv, {"side": side, "pair": i, "question": q, "sample": s}))
    log(f"[1/6] generating {len(jobs)} responses ({n_pairs} pairs x {len(questions)} questions x "
        f"{config.samples} samples x 2 sides, {config.max_new_tokens} new tokens)")
    # chunk order is fixed by the full job list (seed per chunk), cached keys are skipped
    recs = generate_cached(model, responses, jobs, desc="generate", **gen_kw)
    rows = [{**recs[k], "key": k} for k, _, _ in jobs]
    wall["generate"] = time.perf_counter() - t0

    # 2. judge -------------------------------------------------------------------------------
    t1 = time.perf_counter()
    log(f"[2/6] judging {len(rows)} responses for {trait.name} and coherence with {judge_id}")
    judge_rows(rows, "judge responses")
    wall["judge"] = time.perf_counter() - t1

    # 3. filter ------------------------------------------------------------------------------
    by_slot: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_slot.setdefault((r["pair"], r["question"], r["sample"]), {})[r["side"]] = r
    t_cut, c_cut = filter_thresholds(rows, config)
    pairs, kept = [], []
    for slot, sides in by_slot.items():
        p, n = sides["pos"], sides["neg"]
        ok = (p["trait"] is not None and n["trait"] is not None and p["coherence"] is not None
              and n["coherence"] is not None and p["trait"] >= t_cut
              and n["trait"] < t_cut and p["coherence"] >= c_cut
              and n["coherence"] >= c_cut)
        pairs.append({"pair": slot[0], "question": slot[1], "sample": slot[2], "kept": ok,
                      "pos_trait": p["trait"], "neg_trait": n["trait"], "pos_coherence": p["coherence"],
                      "neg_coherence": n["coherence"], "pos_response": p["response"], "neg_response": n["response"]})
        if ok:
            kept.append((p, n))
    _write_jsonl(out / "pairs.jsonl", pairs)
    how = "" if config.filter == "absolute" else (f" = percentiles {config.trait_threshold:g}/"
                                                    f"{config.coherence_threshold:g} of this run's scores")
    log(f"[3/6] {len(kept)}/{len(pairs)} pairs kept (pos {trait.name} >= {t_cut:.1f}, neg < {t_cut:.1f}, "
        f"coherence >= {c_cut:.1f}{how})")
    if len(kept) < config.min_pairs:
        raise errors.FilterError(_filter_message(pairs, config, judge_id, out))

    # 4. extract -----------------------------------------------------------------------------
    t1 = time.perf_counter()
    log(f"[4/6] extracting {', '.join(VARIANTS)} vectors at resid[0..{cfg.n_layers}]")
    sums = np.zeros((2, len(VARIANTS), cfg.n_resid, cfg.d_model), np.float64)
    for side_i, side_rows in enumerate(([p for p, _ in kept], [n for _, n in kept])):
        for _, acts in iter_activations(model, [r["messages"] for r in side_rows],
                                        [r["response"] for r in side_rows], config.batch_size):
            sums[side_i] += acts.sum(axis=2)
    vecs = ((sums[0] - sums[1]) / len(kept)).astype(np.float32)  # [V, L+1, D]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    counts = {"pairs_kept": len(kept), "pairs_total": len(pairs), "responses": len(rows)}
    bank = VectorBank(
        vectors=vecs, names=tuple(trait.name if v == "response_mean" else f"{trait.name}.{v}" for v in VARIANTS),
        model=model.name or cfg.family,
        meta=tuple({"trait": trait.name, "variant": v, "judge": judge_id, **counts, "date": now} for v in VARIANTS),
        created=now,
    )
    bank.save(out / "vectors", overwrite=True)
    np.save(out / "vectors.npy", vecs[0])
    wall["extract"] = time.perf_counter() - t1

    # 5. choose the layer by steering ----------------------------------------------------------
    t1 = time.perf_counter()
    layers = config.layers_for(cfg.n_layers)
    eval_qs = list(trait.eval_questions[: config.n_eval]) or questions[: config.n_eval]
    steer_rows = steering_sweep(model, vecs[0], layers, config.steer_coeffs, eval_qs, out / "steering.jsonl",
                                max_new_tokens=config.steer_tokens, points_per_chunk=config.steer_points_per_chunk,
                                progress=progress, log=log)
    log(f"      judging {len(steer_rows)} steered responses")
    judge_rows(steer_rows, "judge steering")
    steering = _steering_table(steer_rows, layers, config.steer_coeffs)
    best = choose_layer(steering, c_cut)  # the coherence cut the filter used (a percentile in relative mode)
    _write_jsonl(out / "steering_scored.jsonl", steer_rows)
    bank = dataclasses.replace(bank, meta=tuple({**m, "best_layer": best} for m in bank.meta))
    bank.save(out / "vectors", overwrite=True)
    wall["steer"] = time.perf_counter() - t1

    # 6. monitor -----------------------------------------------------------------------------
    t1 = time.perf_counter()
    systems: list[tuple[str, str | None]] = [("none", None)]
    for i in range(min(config.monitor_pairs, len(trait.pairs))):
        systems += [(f"pos{i}", trait.system_prompt("pos", i)), (f"neg{i}", trait.system_prompt("neg", i))]
    mjobs = []
    for label, system in systems:
        for q in eval_qs:
            conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
            mjobs.append((digest("monitor", mid, system, q, config.monitor_tokens, config.temperature, config.top_p,
                                 config.seed), conv, {"system_label": label, "question": q}))
    log(f"[6/6] monitoring: {len(mjobs)} responses under {len(systems)} system prompts")
    mrecs = generate_cached(model, KeyedJsonl(out / "monitor.jsonl"), mjobs, desc="monitor generate",
                            **{**gen_kw, "max_new_tokens": config.monitor_tokens})
    mrows = [{**mrecs[k]} for k, _, _ in mjobs]
    judge_rows(mrows, "judge monitor", coherence=False)
    proj = np.zeros((cfg.n_resid, len(mrows)), np.float32)
    units = vecs[0] / np.maximum(np.linalg.norm(vecs[0], axis=-1, keepdims=True), 1e-12)  # [L+1, D]
    for i, acts in iter_activations(model, [r["messages"] for r in mrows], [r["response"] for r in mrows],
                                    config.batch_size):
        proj[:, i : i + acts.shape[2]] = np.einsum("lbd,ld->lb", acts[VARIANTS.index("prompt_last")], units)
    scored = [j for j, r in enumerate(mrows) if r["trait"] is not None]
    monitor_r = {str(l): pearson(proj[l, scored], [mrows[j]["trait"] for j in scored]) for l in range(cfg.n_resid)}
    for j, r in enumerate(mrows):
        r["projection"] = float(proj[best, j])
    means = [(np.mean([proj[best, j] for j in scored if mrows[j]["system_label"] == lab]),
              _mean([mrows[j]["trait"] for j in scored if mrows[j]["system_label"] == lab])) for lab, _ in systems]
    means = [m for m in means if m[1] is not None and not np.isnan(m[0])]
    r_means = pearson([m[0] for m in means], [m[1] for m in means])
    _write_jsonl(out / "monitor_scored.jsonl", mrows)
    wall["monitor"] = time.perf_counter() - t1
    wall["total"] = time.perf_counter() - t0

    filt = f"{config.filter}: pos trait >= {t_cut:.2f}, neg trait < {t_cut:.2f}, coherence >= {c_cut:.2f}"
    result = ExtractResult(trait.name, model.name or cfg.family, judge_id, len(rows), len(pairs), len(kept), filt, best,
                           steering, monitor_r, r_means, wall, str(out))
    (out / "summary.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    (out / "summary.txt").write_text(result.table() + "\n")
    from jaxpersona import plots

    plots.steering_curves(steering, out / "steering.png", title=f"{trait.name}: steering on {result.model}",
                          best=best)
    plots.monitor_scatter([r["projection"] for r in mrows], [r["trait"] for r in mrows],
                          [r["system_label"] for r in mrows], out / "monitor.png",
                          title=f"{trait.name}: last-prompt projection @ resid[{best}] vs judged score",
                          r=monitor_r.get(str(best)))
    return result


def steering_sweep(
    model: Any,
    vectors: np.ndarray,
    layers: Sequence[int],
    coeffs: Sequence[float],
    questions: list[str],
    path: str | Path,
    *,
    max_new_tokens: int,
    points_per_chunk: int = 4,
    system: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Greedy replies to ``questions`` under ``h + c * v[l]`` at resid ``l`` (response positions:
    last prompt token + generated tokens), for every layer x coefficient; coefficient 0 is run once.

    Grid points are vmapped together (``sweep.generate_chunk``); each chunk is cached in ``path``.
    Returns rows ``{layer, coeff, question, response}`` (the baseline has ``layer = -1``).
    """
    from jaxpersona import interventions as iv
    from jaxpersona.model import conversation
    from jaxpersona.sweep import Grid, build_hooks, generate_chunk

    cfg = model.cfg
    store = KeyedJsonl(path)
    batch = model.encode_conversations([conversation(q, system) for q in questions])
    model.check_length(batch, max_new_tokens)
    pos = iv.Positions.response(batch.valid)
    nonzero = [float(c) for c in coeffs if c != 0]
    points = [{"vector": "v", "vector_index": 0, "layer": int(layers[0]), "coeff": 0.0}]
    points += [{"vector": "v", "vector_index": 0, "layer": int(l), "coeff": c} for l in layers for c in nonzero]
    grid = Grid("steer", np.asarray(vectors, np.float32)[None], ("v",), tuple(int(l) for l in layers),
                tuple(float(c) for c in coeffs) or (0.0,), positions="response")
    grid.validate(cfg)
    vec_id = hashlib.sha256(np.ascontiguousarray(vectors, np.float32).tobytes()).hexdigest()[:24]

    def key(pt: dict[str, Any]) -> str:
        layer = -1 if pt["coeff"] == 0 else pt["layer"]
        return digest("steer", model_fingerprint(model), vec_id, layer, pt["coeff"], questions, system, max_new_tokens)

    log(f"[5/6] steering sweep: {len(layers)} layers x {len(nonzero)} coefficients (+ baseline) on "
        f"{len(questions)} evaluation questions, {max_new_tokens} greedy tokens each")
    todo = [p for p in points if key(p) not in store]
    bar = _bar(len(points), "steering", progress)
    bar.update(len(points) - len(todo))
    size = max(1, points_per_chunk)
    for i in range(0, len(todo), size):
        chunk = todo[i : i + size]
        padded = chunk + [chunk[-1]] * (size - len(chunk))  # one compile for every chunk
        hooks = build_hooks(grid, cfg, padded, pos)
        gen = generate_chunk(model.params, cfg, jnp.asarray(batch.tokens), jnp.asarray(batch.valid), hooks,
                             max_new_tokens=int(max_new_tokens), eos_ids=model.eos_ids, pad_id=model.pad_id)
        store.put({"key": key(pt), "layer": -1 if pt["coeff"] == 0 else pt["layer"], "coeff": pt["coeff"],
                   "responses": [t.strip() for t in model.decode(jax.tree.map(lambda x, g=g: x[g], gen))]}
                  for g, pt in enumerate(chunk))
        bar.update(len(chunk))
    bar.close()
    rows = []
    for pt in points:
        rec = store[key(pt)]
        for q, text in zip(questions, rec["responses"]):
            rows.append({"layer": rec["layer"], "coeff": rec["coeff"], "question": q, "response": text})
    return rows


def _steering_table(rows: list[dict[str, Any]], layers: Sequence[int], coeffs: Sequence[float]) -> dict:
    """``{layer: {coeff: {trait, coherence, n_scored}}}`` (string keys, JSON-able); the coefficient-0
    baseline is shared by every layer."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for l in layers:
        row = {}
        for c in sorted(coeffs):
            sel = [r for r in rows if r["coeff"] == float(c) and (r["layer"] == l or (c == 0 and r["layer"] == -1))]
            row[f"{float(c):g}"] = {"trait": _mean([r["trait"] for r in sel]),
                                    "coherence": _mean([r["coherence"] for r in sel]),
                                    "n_scored": sum(r["trait"] is not None for r in sel)}
        table[str(l)] = row
    return table


def choose_layer(steering: dict, coherence_threshold: float) -> int:
    """The layer whose steering raises the trait score most over the unsteered baseline, counting
    only coefficients whose mean coherence stays >= ``coherence_threshold`` (all, if none does)."""
    def gain(row: dict, coherent_only: bool) -> float:
        base = row.get("0", {}).get("trait")
        best = -np.inf
        for c, cell in row.items():
            if float(c) == 0 or cell["trait"] is None:
                continue
            if coherent_only and (cell["coherence"] is None or cell["coherence"] < coherence_threshold):
                continue
            best = max(best, cell["trait"] - (base or 0.0))
        return best

    for coherent_only in (True, False):
        gains = {int(l): gain(row, coherent_only) for l, row in steering.items()}
        if any(np.isfinite(g) for g in gains.values()):
            return max(gains, key=lambda l: (gains[l], -l))
    return int(next(iter(steering)))


def filter_thresholds(rows: list[dict[str, Any]], config: ExtractConfig) -> tuple[float, float]:
    """(trait cut, coherence cut): the config's values, or with ``filter = "relative"`` those
    percentiles of the scored rows' trait and coherence scores."""
    if config.filter == "absolute":
        return config.trait_threshold, config.coherence_threshold
    ts = [r["trait"] for r in rows if r["trait"] is not None]
    cs = [r["coherence"] for r in rows if r["coherence"] is not None]
    t_cut = float(np.percentile(ts, config.trait_threshold)) if ts else math.inf
    c_cut = float(np.percentile(cs, config.coherence_threshold)) if cs else math.inf
    return t_cut, c_cut


def _filter_message(pairs: list[dict[str, Any]], config: ExtractConfig, judge_id: str, out: Path) -> str:
    def stat(key: str) -> str:
        xs = [p[key] for p in pairs if p[key] is not None]
        return f"{key} mean {np.mean(xs):.1f} (n={len(xs)})" if xs else f"{key}: no scores"

    return (
        f"only {sum(p['kept'] for p in pairs)} of {len(pairs)} pairs survived the {config.filter} filter "
        f"(need {config.min_pairs}): "
        + "; ".join(stat(k) for k in ("pos_trait", "neg_trait", "pos_coherence", "neg_coherence"))
        + f". Judge: {judge_id}. Inspect {out / 'pairs.jsonl'}; try more samples/questions, lower "
        "trait_threshold/coherence_threshold in a [extract] config, or a stronger judge (--judge NAME or "
        "--judge-url). Generations and judgements so far are kept; a rerun resumes."
    )


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
