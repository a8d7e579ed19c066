"""Persona space and the Assistant Axis (Lu et al. 2026), batched in JAX, resumable.

``run_space(model, roles, scripts, judge, config, out_dir)``:

1. **generate** an answer for every role x system prompt x question (+ the default Assistant's
   prompts x questions), batched and seeded;
2. **judge** (optional): role adherence 0-3 through the judge interface, *checked first*: the judge
   must tell role-prompted answers from default-Assistant answers to the same questions (AUROC >=
   ``judge_min_auroc``) before it may drop anything; unchecked or failing judges keep every
   non-empty answer, and the summary says so;
3. **activations**: the mean over the assistant's content tokens (template tokens excluded) at every
   resid point, in the batched forward;
4. **vectors**: role vectors, the Assistant Axis ``mean(default) - mean(roles)`` (toward the
   Assistant), PCA of the mean-centred role vectors per resid point, a held-out check of the axis
   (split-half over questions), saved as an Orbax :class:`~jaxpersona.artifacts.bank.VectorBank`;
5. **capping**: per-token projections of the default answers on the unit axis -> floors at the
   chosen percentile over the cap layer range -> ``capping.json`` (explicit direction/floor/ceiling);
   its cost in log-likelihood of the default answers and the bit-identity of in-range rows;
6. **drift**: conversation scripts turn by turn (KV cache reused), unsteered / capped /
   assistant-tokens-only capped / one-time KV-cache edit, vmapped; a teacher-forced check of whether
   assistant-only capping changes user-token activations;
7. **plots** and ``summary.txt``/``summary.json``.

Every unit of work is cached in the run directory (generations and judgements per answer, the
activations and the drift stage as a whole), keyed by what determines it. The directory is a ``space``
run (:func:`~jaxpersona.runner.run.open_run`): locked while it runs, its stages timed in ``run.json``,
every cache written atomically; a cache that cannot be read (a file cut short) is recomputed with one
:class:`~jaxpersona.errors.CacheWarning`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts import plots
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.records import digest
from jaxpersona.compute.activations import VARIANTS, iter_activations
from jaxpersona.compute.drift import VARIANTS as DRIFT_VARIANTS
from jaxpersona.compute.drift import DriftSpec, run_drift
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.compute.scoring import encode_targets, target_logprob, target_shape
from jaxpersona.data.chat import conversation
from jaxpersona.data.configs import (
    check_positive,
    check_types,
    preset_config,
    replace_checked,
    resid_point,
)
from jaxpersona.edit.capping import (
    CapConfig,
    cap_layer_range,
    check_percentile,
    percentile_floors,
)
from jaxpersona.edit.directions import cosine, unit
from jaxpersona.edit.interventions import Positions
from jaxpersona.measure import stats
from jaxpersona.measure.axis import (
    assistant_axis,
    components_for,
    default_position,
    role_pca,
)
from jaxpersona.measure.judge_check import Labelled, check_set
from jaxpersona.model.transformer import Capture, apply_hook, embed, prepare, run_layers
from jaxpersona.runner.run import Run, open_run
from jaxpersona.runner.stages import generate_cached, judge_cached


@dataclasses.dataclass(frozen=True)
class SpaceConfig:
    """Sizes and choices of one persona-space run. ``default()`` fits a 2-core CPU in about 10 minutes
    with the 135M default model; ``full()`` is the GPU-sized run (every role prompt, 80 questions)."""

    n_roles: int = 0  # 0 = every role in the set
    prompts_per_role: int = 2
    n_questions: int = 4
    default_questions: int = 12  # the default Assistant answers more questions: its answers calibrate the caps
    samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.7  # the reference samples at 0.7, top_p 0.9
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 32
    # judge (only with --judge / --judge-url)
    filter: str = "auto"  # "auto": filter only with a judge that passes its check; "none": never
    min_score: float = 2.5  # keep answers whose expected 0-3 score is >= this (3 = fully in role)
    min_count: int = 1  # roles with fewer surviving answers are dropped (0 surviving is an error)
    min_mass: float = 0.25
    judge_batch: int = 16
    judge_check_n: int = 48
    judge_min_auroc: float = 0.8
    trust_judge: bool = False
    # axis, PCA
    axis_layer: int = -1  # -1: the reference's target layer, block L//2's output = resid[L//2 + 1]
    variance: float = 0.7
    # capping
    cap_layers: Any = "0.7:0.85"  # fractions of the depth (the reference: 46:54 of 64, 56:72 of 80) or a list
    cap_percentile: float = 25.0
    # drift
    conversations: int = 4  # the first n scripts (0 = all); the shipped first four span the four domains
    drift_tokens: int = 32
    probe: str = "Who are you?"
    edit_coeff: float = 0.5  # KV edit: + coeff * |resid[l]| * axis_unit[l] on past assistant tokens

    @classmethod
    def default(cls) -> SpaceConfig:
        return cls()

    @classmethod
    def full(cls) -> SpaceConfig:
        return cls(prompts_per_role=5, n_questions=80, default_questions=80, max_new_tokens=256, batch_size=128,
                   conversations=0, drift_tokens=128, judge_check_n=200)

    def replace(self, **kw: Any) -> SpaceConfig:
        return replace_checked(self, "space", **kw)

    def validate(self, cfg: Any) -> None:
        check_types(self, "space")
        check_positive(self, "space", ("prompts_per_role", "n_questions", "default_questions", "samples",
                                       "max_new_tokens", "batch_size", "judge_batch", "judge_check_n", "drift_tokens"))
        if self.filter not in ("auto", "none"):
            raise errors.InputError(f"space config filter must be 'auto' or 'none', got {self.filter!r}")
        if not 0 <= self.min_score <= 3:
            raise errors.InputError(f"min_score is on the 0-3 role scale, got {self.min_score}")
        if self.min_count < 0 or self.n_roles < 0 or self.conversations < 0:
            raise errors.InputError("min_count, n_roles and conversations must be >= 0")
        if self.default_questions < self.n_questions:
            raise errors.InputError(f"default_questions ({self.default_questions}) must be >= n_questions "
                                    f"({self.n_questions}): the axis contrasts default and role answers to the same questions")
        if not 0 < self.variance <= 1:
            raise errors.InputError(f"variance must be in (0, 1], got {self.variance}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise errors.InputError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        check_percentile(self.cap_percentile)
        self.axis_point(cfg.n_layers)
        cap_layer_range(cfg.n_layers, self.cap_layers)

    def axis_point(self, n_layers: int) -> int:
        return resid_point(n_layers, self.axis_layer, "axis_layer")


def load_space_config(path: str | Path | None, full: bool = False) -> SpaceConfig:
    """Preset (``default`` or ``full``) overridden by the ``[space]`` table of a TOML file."""
    return preset_config(path, "space", {"default": SpaceConfig.default(), "full": SpaceConfig.full()},
                         "full" if full else "default", 'use preset = "full" and a [space] table', {"roles"})


# --- forward helpers ------------------------------------------------------------------------------
class _Projections:
    """Recorder for ``run_layers``: ``<resid[l], units[l]>`` of every token at every resid point."""

    def __init__(self, units: jax.Array) -> None:
        self.units = units

    def __call__(self, buf: jax.Array, layer: jax.Array, h: jax.Array) -> jax.Array:
        p = jnp.einsum("btd,d->bt", h.astype(jnp.float32), self.units[layer])
        return jax.lax.dynamic_update_index_in_dim(buf, p, layer, axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _project_and_score(params: Any, cfg: Any, data: dict[str, jax.Array], units: jax.Array, hook: Any):
    """One forward of prompt + answer rows: per-token projections ``[L+1, B, T]`` on ``units [L+1, D]``,
    the answers' mean log-prob ``[B]`` and the final residual ``[B, T, D]`` (under ``hook``)."""
    prep = prepare(cfg, data["valid"])
    rec = _Projections(units)
    h = apply_hook(hook, jnp.int32(0), embed(params, cfg, data["tokens"]), prep.ctx)
    buf = rec(jnp.zeros((cfg.n_resid, *data["tokens"].shape), jnp.float32), jnp.int32(0), h)
    h, buf, _ = run_layers(params, cfg, h, prep, buf, rec, hook=hook)
    return buf, target_logprob(params, cfg, h, data), h


def answer_projections(model: Model, convs: list[list[dict[str, str]]], answers: list[str], units: np.ndarray, *,
                       hook_for: Callable[[dict[str, np.ndarray]], Any] | None = None, batch_size: int = 16
                       ) -> dict[str, Any]:
    """Teacher-forced prompt + answer rows (answers non-empty). Per row: ``proj`` — projections of every
    valid token on ``units [L+1, D]`` (``[L+1, n_valid]``), ``resp`` — which of those are the answer's
    content tokens, ``lp`` — the answer's mean log-prob. With ``hook_for(enc) -> hook`` also, under the
    hook: ``proj_hooked`` (post-hook projections), ``lp_hooked`` and ``identical`` (the row's final
    residual bit-identical to the unhooked one)."""
    width, r_width = target_shape(model, convs, answers)
    rows = min(batch_size, len(answers))
    u = jnp.asarray(units, jnp.float32)
    out: dict[str, list[Any]] = {k: [] for k in ("proj", "resp", "lp", "proj_hooked", "lp_hooked", "identical")}
    for s in range(0, len(answers), rows):
        enc = encode_targets(model, convs[s: s + rows], answers[s: s + rows], rows=rows, width=width, r_width=r_width)
        data = {k: jnp.asarray(v) for k, v in enc.items()}
        n = min(rows, len(answers) - s)
        valid = enc["valid"]
        p, lp, h0 = _project_and_score(model.params, model.cfg, data, u, None)
        p = np.asarray(p)
        out["proj"] += [p[:, i, valid[i]] for i in range(n)]
        out["resp"] += [enc["resp"][i][valid[i]] for i in range(n)]
        out["lp"] += list(np.asarray(lp)[:n])
        if hook_for is not None:
            p1, lpc, h1 = _project_and_score(model.params, model.cfg, data, u, hook_for(enc))
            p1 = np.asarray(p1)
            out["proj_hooked"] += [p1[:, i, valid[i]] for i in range(n)]
            out["lp_hooked"] += list(np.asarray(lpc)[:n])
            out["identical"] += list(np.asarray(jnp.all((h0 == h1) | ~data["valid"][..., None], axis=(1, 2)))[:n])
    return {k: (np.asarray(v) if k in ("lp", "lp_hooked", "identical") else v) for k, v in out.items()}


def cap_check(res: dict[str, Any], layers: list[int], floors: np.ndarray) -> dict[str, Any]:
    """What a floor cap did, from :func:`answer_projections` with the cap as hook (every token capped).

    At the first capped point nothing upstream has changed, so there the clamp can be checked
    exactly: tokens at or above the floor must come out with bit-identical projections, tokens below
    it exactly at the floor. Deeper points see already-capped inputs; rows where no token fell below
    any floor must come out bit-identical end to end."""
    l0, f0 = layers[0], float(floors[0])
    before = np.concatenate([p[l0] for p in res["proj"]])
    after = np.concatenate([p[l0] for p in res["proj_hooked"]])
    inside = before >= f0
    below_any = np.asarray([bool(np.any(p[layers] < floors[:, None])) for p in res["proj"]])
    return {"first_layer": l0, "tokens": int(before.size), "tokens_in_range": int(inside.sum()),
            "in_range_bit_identical": int((after[inside] == before[inside]).sum()),
            "below_floor_max_error": float(np.abs(after[~inside] - f0).max()) if (~inside).any() else 0.0,
            "rows": int(len(res["proj"])), "rows_untouched": int((~below_any).sum()),
            "rows_untouched_bit_identical": int(res["identical"][~below_any].sum()),
            "rows_identical_total": int(res["identical"].sum())}


# --- the pipeline ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SpaceResult:
    out: Path
    summary: dict[str, Any]

    def table(self) -> str:
        return (self.out / "summary.txt").read_text()


# the stages whose wall seconds the summary reports (plus "total"), in order
WALL_STAGES = ("generate", "judge", "activations", "vectors", "capping", "drift")


def _log_stage(log: Callable[[str], None], k: int, msg: str) -> None:
    log(f"[{k}/7] {msg}")


def run_space(model: Model, roles: Any, scripts: list[Any], judge: Any, config: SpaceConfig, out_dir: str | Path, *,
              judge_id: str = "none", progress: bool = True, log: Callable[[str], None] = print) -> SpaceResult:
    """The whole persona-space pipeline (see the module docstring); ``judge`` None = judge-free.

    A ``space`` run (:func:`~jaxpersona.runner.run.open_run`): ``run.json`` records the stages
    ``generate``, ``judge``, ``activations``, ``vectors``, ``capping``, ``drift``, ``plots``, ``summary``."""
    cfg = model.cfg
    config.validate(cfg)
    out = Path(out_dir)
    run_config = {"model": model.name, "judge": judge_id, "roles": roles.source, **dataclasses.asdict(config)}
    with open_run(out, "space", run_config, model=model, seeds={"seed": config.seed}, log=log,
                  progress=progress) as run:
        mid = model_fingerprint(model)
        role_list = list(roles.roles[: config.n_roles] if config.n_roles else roles.roles)
        if len(role_list) < 2:
            raise errors.InputError(f"persona space needs at least 2 roles, got {len(role_list)}")
        rows = _generate_stage(run, model, roles, role_list, config, mid)
        sel = _judge_stage(run, judge, judge_id, rows, roles, role_list, config)
        axis_l = config.axis_point(cfg.n_layers)
        kept = [r for r in rows if r["kept"] and (r["role"] in sel.names or r["role"] == roles.default.name)]
        acts = _activations_stage(run, model, kept, sel.names, roles.default.name, sel.n_default, axis_l,
                                  config.batch_size, mid)
        vec = _vectors_stage(run, model, kept, sel, acts, roles.default.name, axis_l, config)
        drows = [r for r in kept if r["role"] == roles.default.name]
        caps, cap_sum = _capping_stage(run, model, drows, vec["units"], config)
        drift_sum, drift_recs = _drift_stage(run, model, scripts, config, caps, vec["units"], vec["resid_norm"],
                                             axis_l, list(caps.layers), mid)
        with run.stage("plots"):
            _plots(run, model, vec, drift_recs, drift_sum, axis_l, config)
        wall = run.wall()
        summary = {"model": model.name, "roles": len(sel.names), "dropped_roles": sel.dropped,
                   "role_answers": int(vec["n_per"].sum()), "default_answers": sel.n_default, "judge": sel.check,
                   "axis_layer": axis_l,
                   "components_for_fraction": {"fraction": config.variance, "axis_layer": int(vec["n70"][axis_l]),
                                               "by_layer": vec["n70"].tolist()},
                   "cos_axis_pc1_axis_layer": float(vec["cos_pc1"][axis_l]),
                   "default_pc1": {"relative": float(vec["pos"]["relative"][axis_l]),
                                   "beyond": float(vec["pos"]["beyond"][axis_l])},
                   "heldout_axis_auroc": vec["heldout"], "pc1_split_half": vec["split_half"], "capping": cap_sum,
                   "drift": drift_sum,
                   "wall_s": {**{k: round(wall[k], 1) for k in WALL_STAGES},
                              "total": round(run.elapsed(), 1)}}
        with run.stage("summary"):
            run.write_json("summary.json", summary, indent=1, default=float)
            run.write_text("summary.txt", _summary_text(summary, vec["pca_json"]))
    return SpaceResult(out, summary)


def _generate_stage(run: Run, model: Model, roles: Any, role_list: list[Any], config: SpaceConfig, mid: str
                    ) -> list[dict[str, Any]]:
    """Stage 1: an answer for every role x prompt x question x sample (+ the default Assistant's), cached
    per answer in ``responses.jsonl``. Rows in job order, each with its cache ``key``."""
    qs = list(roles.questions[: config.n_questions])
    dqs = list(roles.questions[: config.default_questions])
    jobs = []
    for role, prompts, questions in [(r, r.prompts[: config.prompts_per_role], qs) for r in role_list] + \
                                    [(roles.default, roles.default.prompts, dqs)]:
        for pi, system in enumerate(prompts):
            for qi, q in enumerate(questions):
                for s in range(config.samples):
                    key = digest("space", mid, role.name, system, q, s, config.max_new_tokens, config.temperature,
                                 config.top_p, config.seed)
                    jobs.append((key, conversation(q, system or None),
                                 {"role": role.name, "prompt": pi, "question": q, "qi": qi, "sample": s}))
    n_role_jobs = sum(1 for j in jobs if j[2]["role"] != roles.default.name)
    msg = (f"[1/7] generating {n_role_jobs} role answers ({len(role_list)} roles x {config.prompts_per_role} "
           f"prompts x {len(qs)} questions x {config.samples}) + {len(jobs) - n_role_jobs} default-Assistant answers, "
           f"{config.max_new_tokens} new tokens")
    with run.stage("generate", msg, total=len(jobs)) as st:
        store = run.records("responses.jsonl")
        st.hit(sum(1 for k, _, _ in jobs if k in store))
        recs = generate_cached(model, store, jobs, max_new_tokens=config.max_new_tokens,
                               temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                               batch_size=config.batch_size, progress=run.progress)
    return [{**recs[k], "key": k} for k, _, _ in jobs]


@dataclasses.dataclass
class _Selection:
    """What the judge stage kept: the surviving roles and the judge's check (the summary's ``judge``)."""

    names: list[str]
    counts: dict[str, int]
    dropped: list[str]
    n_default: int
    check: dict[str, Any]
    decision: str


def role_check_set(rows: list[dict[str, Any]], by_name: dict[str, Any], default: str, n: int) -> tuple[Labelled, int]:
    """The ``role`` labelled set of a space run: up to ``n`` role answers spread over the run (label 1) and
    the default Assistant's answer (its second prompt) to the same question and sample (label 0), both on
    the role's rubric. Returns the set and the number of pairs."""
    dflt = {(r["question"], r["sample"]): r for r in rows if r["role"] == default and r["prompt"] == 1}
    cand = [r for r in rows if r["role"] != default and r["response"]
            and dflt.get((r["question"], r["sample"]), {}).get("response")]
    step = max(1, len(cand) // n)
    sample = cand[::step][:n]
    high = [by_name[r["role"]].judge_prompt(r["question"], r["response"]) for r in sample]
    low = [by_name[r["role"]].judge_prompt(r["question"], dflt[(r["question"], r["sample"])]["response"])
           for r in sample]
    return Labelled.of("role", high, low), len(sample)


def _judge_rows(run: Run, judge: Any, judge_id: str, rows: list[dict[str, Any]], role_list: list[Any], default: str,
                config: SpaceConfig) -> tuple[dict[str, Any], bool]:
    """Judge the role answers (scores into ``rows``) once the judge passed its ``role`` check (or
    ``trust_judge``). Returns the check (with its ``decision``) and whether the judge filters."""
    check: dict[str, Any] = {"judge": judge_id, "checked": False, "auroc": None, "passed": False}
    if judge is None or config.filter == "none":
        check["decision"] = "no judge: kept every non-empty answer (role adherence unchecked)"
        return check, False
    missing = [r.name for r in role_list if r.eval_prompt is None]
    if missing:
        raise errors.RoleFileError(f"roles {missing[:10]} have no eval_prompt; the judge needs one per role "
                                   "(or run without --judge)")
    store = run.records("judgements.jsonl")
    score = lambda ps, desc: judge_cached(judge, judge_id, store, ps, batch=config.judge_batch,  # noqa: E731
                                          min_mass=config.min_mass, desc=desc, progress=run.progress, max_score=3)
    by_name = {r.name: r for r in role_list}
    labelled, n = role_check_set(rows, by_name, default, config.judge_check_n)
    verdict, _ = check_set(lambda ps: score(ps, "judge check"), labelled, config.judge_min_auroc)
    auc = verdict.auroc
    check.update(checked=True, auroc=auc, n=n, passed=verdict.passed)
    use_judge = check["passed"] or config.trust_judge
    desc = (f"judge {judge_id}: AUROC {auc if auc is None else round(auc, 3)} telling role answers from default "
            f"answers under the role rubric (n={n}, bar {config.judge_min_auroc})")
    if use_judge:
        role_rows = [r for r in rows if r["role"] != default and r["response"]]
        scores = score([by_name[r["role"]].judge_prompt(r["question"], r["response"]) for r in role_rows],
                       "judge answers")
        for r, s in zip(role_rows, scores):
            r["score"] = s
        check["decision"] = f"{desc}: {'passed' if check['passed'] else 'FAILED, used anyway (trust_judge)'}; kept " \
                            f"answers scored >= {config.min_score}"
    else:
        check["decision"] = f"{desc}: failed, so it drives nothing: kept every non-empty answer"
    return check, use_judge


def _judge_stage(run: Run, judge: Any, judge_id: str, rows: list[dict[str, Any]], roles: Any, role_list: list[Any],
                 config: SpaceConfig) -> _Selection:
    """Stage 2: the judge's check and (if it may) its filter; every row gets ``kept``; roles without
    enough surviving answers are dropped; ``answers.jsonl``."""
    default = roles.default.name
    with run.stage("judge"):
        check, use_judge = _judge_rows(run, judge, judge_id, rows, role_list, default, config)
        decision = check["decision"]
        _log_stage(run.log, 2, decision)
        for r in rows:
            ok = bool(r["response"])
            if use_judge and r["role"] != default:
                ok = ok and r.get("score") is not None and r["score"] >= config.min_score
            r["kept"] = ok
        counts = {r.name: sum(1 for x in rows if x["role"] == r.name and x["kept"]) for r in role_list}
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            raise errors.FilterError(
                f"role(s) {empty[:12]}{' ...' if len(empty) > 12 else ''} have no surviving answers ({decision}). "
                f"Lower min_score, raise max_new_tokens, or leave these roles out (a role directory without them, "
                f"or n_roles); generations and judgements so far are kept in {run.out}")
        dropped = sorted(n for n, c in counts.items() if c < config.min_count)
        names = [r.name for r in role_list if r.name not in dropped]
        if len(names) < 2:
            raise errors.FilterError(f"fewer than 2 roles have >= {config.min_count} surviving answers; lower min_count")
        n_default = sum(1 for r in rows if r["role"] == default and r["kept"])
        if n_default == 0:
            raise errors.FilterError(f"every default-Assistant answer is empty ({run.out}/responses.jsonl); raise "
                                     "max_new_tokens")
        run.write_jsonl("answers.jsonl", [{k: r.get(k) for k in ("role", "prompt", "question", "qi", "sample",
                                                                  "response", "score", "kept")} for r in rows])
    return _Selection(names, counts, dropped, n_default, check, decision)


def _activations_stage(run: Run, model: Model, kept: list[dict[str, Any]], names: list[str], default: str,
                       n_default: int, axis_l: int, batch_size: int, mid: str) -> dict[str, np.ndarray]:
    """Stage 3, cached as ``activations.npz`` under ``digest(mid, answer keys, axis_l)``: ``sums [R, L+1, D]``
    (float64, per surviving role), ``default_acts [n_default, L+1, D]``, ``at_axis [N, D]`` (every kept
    answer at the axis point) and ``norm_sum [L+1]`` (default answers' summed token norms)."""
    cfg = model.cfg

    def compute() -> dict[str, np.ndarray]:
        _log_stage(run.log, 3, f"activations of {len(kept)} answers (mean over the answer's tokens at "
                   f"resid[0..{cfg.n_layers}])")
        sums = np.zeros((len(names), cfg.n_resid, cfg.d_model), np.float64)
        default_acts = np.zeros((n_default, cfg.n_resid, cfg.d_model), np.float32)
        at_axis = np.zeros((len(kept), cfg.d_model), np.float32)
        norm_sum = np.zeros(cfg.n_resid, np.float64)
        index = {n: i for i, n in enumerate(names)}
        d_index = {row: k for k, row in enumerate(i for i, r in enumerate(kept) if r["role"] == default)}
        rm = VARIANTS.index("response_mean")
        for idx, (acts, norms) in iter_activations(model, [r["messages"] for r in kept], [r["response"] for r in kept],
                                                   batch_size, with_norms=True):
            a = acts[rm]  # [L+1, n, D]
            for j, row in enumerate(idx):
                r = kept[row]
                at_axis[row] = a[axis_l, j]
                if r["role"] == default:
                    default_acts[d_index[row]] = a[:, j]
                    norm_sum += norms[rm][:, j]
                else:
                    sums[index[r["role"]]] += a[:, j]
        return {"sums": sums, "default_acts": default_acts, "at_axis": at_axis, "norm_sum": norm_sum}

    with run.stage("activations") as st:
        got = run.arrays("activations.npz", digest(mid, [r["key"] for r in kept], axis_l), compute)
        if st.cache_hits:
            _log_stage(run.log, 3, f"activations of {len(kept)} answers: cached")
    return got


def _vectors_stage(run: Run, model: Model, kept: list[dict[str, Any]], sel: _Selection, acts: dict[str, np.ndarray],
                   default: str, axis_l: int, config: SpaceConfig) -> dict[str, Any]:
    """Stage 4: role vectors, the Assistant Axis, PCA, the held-out checks; ``vectors/`` (the bank),
    ``pca.npz`` and ``pca.json``."""
    cfg = model.cfg
    with run.stage("vectors"):
        names = sel.names
        n_per = np.asarray([sel.counts[n] for n in names], np.float64)
        role_vecs = (acts["sums"] / n_per[:, None, None]).astype(np.float32)
        # the axis contrasts the same questions: default answers to the roles' questions only (the extra
        # default answers only calibrate the caps)
        shared = np.asarray([r["qi"] for r in kept if r["role"] == default]) < config.n_questions
        default_vec = acts["default_acts"][shared].mean(axis=0)
        resid_norm = (acts["norm_sum"] / sel.n_default).astype(np.float32)
        axis = assistant_axis(default_vec, role_vecs)
        pca = role_pca(role_vecs, axis)
        n70 = components_for(pca.variance_ratio, config.variance)
        cos_pc1 = cosine(axis, pca.components[:, 0])
        pos = default_position(pca, default_vec)
        on_shared = [r["qi"] < config.n_questions for r in kept]
        kept_shared = [r for r, ok in zip(kept, on_shared) if ok]
        heldout = _heldout_axis_auroc(kept_shared, acts["at_axis"][on_shared], default)
        split_half = _split_half_pc1(kept_shared, acts["at_axis"][on_shared], default)
        meta = {"kind": "assistant_axis", "direction": "toward the Assistant: mean(default) - mean(roles)",
                "roles": len(names), "default_answers": int(shared.sum()), "judge": sel.decision,
                "resid_norm": [round(float(x), 5) for x in resid_norm],
                "resid_norm_of": "mean token norm of resid[l] over the default-Assistant answers"}
        bank = VectorBank(np.concatenate([axis[None], default_vec[None], role_vecs]),
                          ("assistant_axis", "default", *(f"role:{n}" for n in names)), model.name or cfg.family,
                          (meta, {"kind": "default", "answers": int(shared.sum())},
                           *({"kind": "role", "role": n, "answers": int(c)} for n, c in zip(names, n_per))))
        bank.save(run.path("vectors"), overwrite=True)
        run.artifact("vectors")
        k_save = min(10, pca.components.shape[1])
        run.write_npz("pca.npz", {"components": pca.components[:, :k_save], "variance_ratio": pca.variance_ratio,
                                  "scores": pca.scores[:, :, :k_save], "mean": pca.mean, "roles": np.asarray(names)})
        pca_json = {"layers": list(range(cfg.n_resid)), "axis_layer": axis_l, "variance_fraction": config.variance,
                    "components_for_fraction": n70.tolist(), "cos_axis_pc1": [round(float(x), 4) for x in cos_pc1],
                    "default_pc1_relative": [round(float(x), 4) for x in pos["relative"]],
                    "default_beyond_fraction_of_roles": [round(float(x), 4) for x in pos["beyond"]],
                    "variance_ratio_axis_layer": [round(float(x), 5) for x in pca.variance_ratio[axis_l, :20]],
                    "pc1_loadings_axis_layer": dict(sorted(((n, round(float(x), 4)) for n, x in
                                                            zip(names, pca.scores[axis_l, :, 0])), key=lambda kv: kv[1])),
                    "heldout_axis_auroc": heldout, "pc1_split_half": split_half}
        run.write_json("pca.json", pca_json, indent=1)
        _log_stage(run.log, 4, f"axis + PCA over {len(names)} roles: at resid[{axis_l}] {n70[axis_l]} components for "
                   f"{config.variance:.0%} variance, cos(axis, PC1) {cos_pc1[axis_l]:.3f}, default beyond "
                   f"{pos['beyond'][axis_l]:.0%} of roles on PC1; held-out axis AUROC {_fmt(heldout.get('auroc'))}")
    return {"names": names, "n_per": n_per, "default_vec": default_vec, "resid_norm": resid_norm, "pca": pca,
            "n70": n70, "cos_pc1": cos_pc1, "pos": pos, "heldout": heldout, "split_half": split_half,
            "units": unit(axis), "pca_json": pca_json}


def _capping_stage(run: Run, model: Model, drows: list[dict[str, Any]], units: np.ndarray, config: SpaceConfig
                   ) -> tuple[CapConfig, dict[str, Any]]:
    """Stage 5: floors at the chosen percentile of the default answers' per-token projections on the unit
    axis (``capping.json``); the clamp check and the log-likelihood cost of capping every token."""
    cfg = model.cfg
    with run.stage("capping"):
        cap_l = cap_layer_range(cfg.n_layers, config.cap_layers)
        dconv, dans = [r["messages"] for r in drows], [r["response"] for r in drows]
        base = answer_projections(model, dconv, dans, units, batch_size=config.batch_size)
        projs = [p[:, r] for p, r in zip(base["proj"], base["resp"])]  # content tokens only
        floors = percentile_floors(projs, cap_l, config.cap_percentile)
        caps = CapConfig(model.name or cfg.family, cfg.n_resid, cfg.d_model, tuple(cap_l), units[cap_l], floors,
                         np.full(len(cap_l), np.inf, np.float32),
                         {"direction": "assistant_axis (unit), toward the Assistant", "percentile": config.cap_percentile,
                          "calibrated_on": f"{len(projs)} default-Assistant answers, per-token projections (content "
                                           "tokens)",
                          "bank": str(run.path("vectors")), "layers_spec": config.cap_layers})
        run.write_json("capping.json", caps.to_json(), indent=1)
        res = answer_projections(model, dconv, dans, units, batch_size=config.batch_size,
                                 hook_for=lambda enc: caps.hook(Positions.all(enc["valid"])))
        delta = res["lp_hooked"] - res["lp"]
        _, d_lo, d_hi = stats.bootstrap_ci(delta, seed=config.seed)
        ck = cap_check(res, cap_l, floors)
        cap_sum = {"layers": cap_l, "floors": [round(float(x), 4) for x in floors], "percentile": config.cap_percentile,
                   "positions": "all tokens (prompt and answer), as the reference", "answers": len(projs), "check": ck,
                   "delta_logprob_per_token": {"mean": float(delta.mean()), "lo": d_lo, "hi": d_hi}}
        _log_stage(run.log, 5, f"capping at resid{cap_l} floors at p{config.cap_percentile:g} -> "
                   f"{run.path('capping.json')}; at resid[{ck['first_layer']}] {ck['in_range_bit_identical']}/"
                   f"{ck['tokens_in_range']} in-range tokens bit-identical; log-likelihood change per token "
                   f"{delta.mean():+.4f} [{_fmt(d_lo, 4)}, {_fmt(d_hi, 4)}]")
    return caps, cap_sum


def _plots(run: Run, model: Model, vec: dict[str, Any], drift_recs: list[dict[str, Any]], drift_sum: dict[str, Any],
           axis_l: int, config: SpaceConfig) -> None:
    """Stage 7: the PC1/PC2 map, the variance curve, |cos(axis, PC1)| by layer, the drift traces."""
    pca = vec["pca"]
    plots.persona_map(pca.scores[axis_l, :, :2], vec["names"], vec["pos"]["score"][axis_l],
                      float(np.dot(vec["default_vec"][axis_l] - pca.mean[axis_l], pca.components[axis_l, 1])),
                      run.path("pca_map.png"), title=f"{model.name}: roles on PC1/PC2 at resid[{axis_l}]")
    plots.variance_curve(pca.variance_ratio[axis_l], run.path("variance.png"), fraction=config.variance,
                         title=f"{model.name}: PCA of role vectors at resid[{axis_l}]")
    plots.cos_by_layer(vec["cos_pc1"], run.path("cos_axis_pc1.png"), mark=axis_l,
                       title=f"{model.name}: |cos(axis, PC1)| by layer")
    plots.drift_traces(drift_recs, run.path("drift.png"), labels=[f"resid[{l}]" for l in drift_sum["monitor"]],
                       title=f"{model.name}: projection on the Assistant Axis per assistant turn")


def _fmt(x: Any, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _heldout_axis_auroc(kept: list[dict[str, Any]], at_axis: np.ndarray, default: str) -> dict[str, Any]:
    """Judge-free check of the axis at its layer: build it from even-indexed questions, score the
    odd-indexed questions' answers (default vs roles) by their projection, and vice versa."""
    qi = np.asarray([r["qi"] for r in kept])
    is_def = np.asarray([r["role"] == default for r in kept])
    role = np.asarray([r["role"] for r in kept])
    aucs: list[float] = []
    for half in (0, 1):
        fit, test = qi % 2 == half, qi % 2 != half
        if not (fit & is_def).any() or not (test & is_def).any() or not (test & ~is_def).any():
            continue
        rmeans = [at_axis[fit & (role == n)].mean(0) for n in np.unique(role[fit & ~is_def])]
        if not rmeans:
            continue
        u = unit(at_axis[fit & is_def].mean(0) - np.mean(rmeans, axis=0))
        p = at_axis[test] @ u
        auc = stats.auroc(list(p[is_def[test]]), list(p[~is_def[test]]))
        if auc is not None:
            aucs.append(auc)
    return {"auroc": float(np.mean(aucs)) if aucs else None, "halves": aucs,
            "what": "AUROC of default vs role answers by projection on an axis built from the other half of the questions"}


def _split_half_pc1(kept: list[dict[str, Any]], at_axis: np.ndarray, default: str) -> dict[str, Any]:
    """How reproducible the role map is at the axis layer: role vectors from the even- and from the
    odd-indexed questions, PC1 of each half, Pearson r of the roles' PC1 scores between halves
    (sign-aligned), with a Fisher interval. Noise in small per-role samples shows up here."""
    qi = np.asarray([r["qi"] for r in kept])
    role = np.asarray([r["role"] for r in kept])
    names = [n for n in dict.fromkeys(role) if n != default]
    halves = []
    for h in (0, 1):
        sel = qi % 2 == h
        if not all((sel & (role == n)).any() for n in names):
            return {"r": None, "lo": None, "hi": None, "n": len(names), "what": "needs >= 2 questions per role"}
        halves.append(np.stack([at_axis[sel & (role == n)].mean(0) for n in names]))
    scores = []
    for x in halves:
        xc = x - x.mean(0)
        _, _, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
        scores.append(xc @ vt[0])
    ci = stats.pearson_ci(list(scores[0]), list(scores[1]))
    if ci["r"] is not None and ci["r"] < 0:  # PC signs are arbitrary
        ci = stats.pearson_ci(list(scores[0]), list(-scores[1]))
    return {**ci, "what": "Pearson r of role PC1 scores from even- vs odd-indexed questions (axis layer)"}


def _drift_stage(run: Run, model: Model, scripts: list[Any], config: SpaceConfig, caps: CapConfig, units: np.ndarray,
                 resid_norm: np.ndarray, axis_l: int, cap_l: list[int], mid: str
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stage 6: the conversation scripts under the four variants, cached in ``drift.jsonl`` under a key of
    what determines it; the teacher-forced user-token check; the drift summary."""
    scripts = list(scripts[: config.conversations] if config.conversations else scripts)
    monitor = (axis_l, cap_l[len(cap_l) // 2])
    spec = DriftSpec(monitor, units[list(monitor)], caps, units * resid_norm[:, None], tuple(cap_l), config.edit_coeff,
                     config.drift_tokens, config.probe or None)
    key = digest(mid, [dataclasses.asdict(s) for s in scripts], monitor, units[list(monitor)].tobytes().hex()[:64],
                 caps.floors.tolist(), cap_l, config.edit_coeff, config.drift_tokens, config.probe)
    computed = []

    def compute() -> dict[str, Any]:
        _log_stage(run.log, 6, f"drift over {len(scripts)} conversations x 4 variants (vmapped), "
                   f"{config.drift_tokens} tokens per answer, monitored at resid{list(monitor)}")
        computed.append(True)
        return {"records": run_drift(model, scripts, spec, progress=run.progress)}

    with run.stage("drift"):
        recs = run.record("drift.jsonl", key, compute)["records"]
        if not computed:
            _log_stage(run.log, 6, f"drift over {len(scripts)} conversations: cached")
        user_check = _user_token_check(model, scripts, recs, caps, cap_l, config.batch_size)
    summ = _drift_summary(recs, monitor)
    summ["assistant_only_cap_user_tokens"] = user_check
    summ["edit"] = {"coeff": config.edit_coeff, "layers": cap_l, "units": "fraction of the residual norm"}
    return summ, recs


def _drift_summary(recs: list[dict[str, Any]], monitor: tuple[int, ...]) -> dict[str, Any]:
    """Per variant and monitored point: mean projection per turn over scripts, first/last turn, the
    per-script least-squares slope per turn (mean, bootstrap interval over scripts), the probe's."""
    out: dict[str, Any] = {"monitor": list(monitor), "variants": {}}
    for v in DRIFT_VARIANTS:
        rs = [r for r in recs if r["variant"] == v and r["proj"] is not None and not r["probe"]]
        turns = sorted({r["turn"] for r in rs})
        probe = [r for r in recs if r["variant"] == v and r["probe"]]
        points = []
        for i in range(len(monitor)):
            per_turn = [float(np.mean([r["proj"][i] for r in rs if r["turn"] == t])) for t in turns]
            by_script: dict[str, dict[int, float]] = {}
            for r in rs:
                by_script.setdefault(r["script"], {})[r["turn"]] = r["proj"][i]
            slopes = [float(np.polyfit(list(d), list(d.values()), 1)[0]) for d in by_script.values() if len(d) > 1]
            pp = [r["proj"][i] for r in probe if r["proj"]]
            points.append({"resid": monitor[i], "per_turn": per_turn, "first": per_turn[0] if per_turn else None,
                           "last": per_turn[-1] if per_turn else None,
                           "slope": float(np.mean(slopes)) if slopes else None,
                           "slope_ci": list(stats.bootstrap_ci(slopes)[1:]) if len(slopes) > 1 else None,
                           "probe": float(np.mean(pp)) if pp else None})
        out["variants"][v] = {"points": points, "probe_answers": {r["script"]: r["answer"] for r in probe}}
    out["by_domain"] = {}  # unsteered, first monitored point: per-turn projection per domain
    for r in recs:
        if r["variant"] == "unsteered" and r["proj"] is not None and not r["probe"]:
            out["by_domain"].setdefault(r["domain"] or r["script"], {}).setdefault(r["turn"], []).append(r["proj"][0])
    out["by_domain"] = {d: [float(np.mean(t[k])) for k in sorted(t)] for d, t in out["by_domain"].items()}
    base = out["variants"]["unsteered"]["probe_answers"]
    edit = out["variants"]["kv_edit"]["probe_answers"]
    out["kv_edit_changed_probe_answers"] = sum(base[s] != edit.get(s) for s in base)
    out["probe_answers_total"] = len(base)
    return out


def _user_token_check(model: Model, scripts: list[Any], recs: list[dict[str, Any]], caps: CapConfig, cap_l: list[int],
                      batch_size: int) -> dict[str, Any]:
    """Teacher-forced on the unsteered transcripts: does capping the assistant's tokens only change the
    user tokens' residuals at the capped layers and above? (Later user tokens attend to capped
    assistant tokens, so a binding cap can.)"""
    convs = []
    for s in scripts:
        rs = sorted((r for r in recs if r["variant"] == "unsteered" and r["script"] == s.id), key=lambda r: r["turn"])
        conv = [{"role": "system", "content": s.system}] if s.system else []
        for r in rs:
            conv += [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["answer"] or "."}]
        convs.append(conv)
    layers = tuple(sorted(set(cap_l) | {model.cfg.n_layers}))
    changed, total, max_rel = 0, 0, 0.0
    for i in range(0, len(convs), batch_size):
        part = convs[i: i + batch_size]
        batch, amask = model.role_mask(part, "assistant", add_generation_prompt=False)
        _, umask = model.role_mask(part, "user", add_generation_prompt=False)
        cap = Capture(layers, "tokens")
        h0 = np.asarray(model.run(batch, capture=cap, logits=False).captured, np.float32)
        h1 = np.asarray(model.run(batch, capture=cap, logits=False,
                                  hook=caps.hook(Positions.explicit(amask, False))).captured, np.float32)
        diff = np.abs(h1 - h0).max(axis=(0, 3))  # [B, T]
        scale = np.abs(h0).max(axis=(0, 3)) + 1e-12
        changed += int((diff[umask] > 0).sum())
        total += int(umask.sum())
        if umask.any():
            max_rel = max(max_rel, float((diff / scale)[umask].max()))
    return {"user_tokens": total, "user_tokens_changed": changed, "max_relative_change": max_rel,
            "layers": list(layers), "on": "unsteered transcripts, teacher-forced"}


def _summary_text(s: dict[str, Any], pca: dict[str, Any]) -> str:
    c = s["capping"]
    d = s["drift"]
    al = s["axis_layer"]
    lines = [
        f"persona space: {s['model']}, {s['roles']} roles ({s['role_answers']} answers), {s['default_answers']} "
        f"default-Assistant answers",
        f"judge: {s['judge']['decision']}",
        f"dropped roles (< min_count answers): {s['dropped_roles'] or 'none'}",
        "",
        "measure: mean activation over each answer's content tokens; axis = mean(default) - mean(roles), toward the Assistant",
        f"PCA at resid[{al}] (the reference's middle layer): {s['components_for_fraction']['axis_layer']} components for "
        f"{s['components_for_fraction']['fraction']:.0%} of the variance (reference: 4/8/19 on 27-70B models); "
        f"PC1 {pca['variance_ratio_axis_layer'][0]:.1%}",
        f"cos(axis, PC1) at resid[{al}]: {s['cos_axis_pc1_axis_layer']:.3f} (reference: > 0.71)",
        f"default on PC1: beyond {s['default_pc1']['beyond']:.0%} of roles, relative position "
        f"{s['default_pc1']['relative']:.2f} of the role range (> 1 = past every role)",
        f"held-out axis AUROC (default vs roles, other half of questions): {_fmt(s['heldout_axis_auroc']['auroc'])}",
        f"PC1 split-half reliability (roles' PC1 scores, even vs odd questions): r = {_fmt(s['pc1_split_half']['r'])} "
        f"[{_fmt(s['pc1_split_half']['lo'], 2)}, {_fmt(s['pc1_split_half']['hi'], 2)}], n = {s['pc1_split_half']['n']} roles",
        "PC1 extremes: " + ", ".join(list(pca["pc1_loadings_axis_layer"])[:4]) + " ... "
        + ", ".join(list(pca["pc1_loadings_axis_layer"])[-4:]),
        "",
        f"capping: floors at p{c['percentile']:g} of default-Assistant token projections at resid{c['layers']}",
        f"  clamp check at resid[{c['check']['first_layer']}]: {c['check']['in_range_bit_identical']}/"
        f"{c['check']['tokens_in_range']} in-range tokens bit-identical, below-floor tokens land on the floor (max error "
        f"{c['check']['below_floor_max_error']:.1e}); rows with no token below any floor: {c['check']['rows_untouched']}/"
        f"{c['check']['rows']} ({c['check']['rows_untouched_bit_identical']} bit-identical end to end)",
        f"  log-likelihood cost on default answers (per token, capped - uncapped): "
        f"{c['delta_logprob_per_token']['mean']:+.4f} [{_fmt(c['delta_logprob_per_token']['lo'], 4)}, "
        f"{_fmt(c['delta_logprob_per_token']['hi'], 4)}]",
        "",
        "drift: mean projection of each assistant turn on the unit axis (over scripts); slope per turn with a "
        "bootstrap interval over scripts; the last turn is the identity probe",
    ]
    for i, l in enumerate(d["monitor"]):
        lines.append(f"  at resid[{l}]" + (" (the axis layer)" if l == al else " (inside the capped range)"))
        for v, x in d["variants"].items():
            pt = x["points"][i]
            ci = pt["slope_ci"]
            lines.append(f"    {v:17s} turn 0 {_fmt(pt['first'], 2)} -> last {_fmt(pt['last'], 2)}; slope/turn "
                         f"{_fmt(pt['slope'], 3)}" + (f" [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]" if ci else "")
                         + f"; probe {_fmt(pt['probe'], 2)}")
    lines.append(f"  unsteered by domain at resid[{d['monitor'][0]}] (turn 0 -> last): " + "; ".join(
        f"{dom} {_fmt(v[0], 1)} -> {_fmt(v[-1], 1)}" for dom, v in d["by_domain"].items() if v))
    u = d["assistant_only_cap_user_tokens"]
    lines += [f"assistant-only capping, user tokens (teacher-forced): {u['user_tokens_changed']}/{u['user_tokens']} changed "
              f"at resid{u['layers']}, max relative change {u['max_relative_change']:.2e}",
              f"KV-cache edit (coeff {d['edit']['coeff']} x residual norm at resid{d['edit']['layers']} on past assistant "
              f"tokens): changed {d['kv_edit_changed_probe_answers']}/{d['probe_answers_total']} probe answers",
              "", "wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["wall_s"].items())]
    return "\n".join(lines) + "\n"
