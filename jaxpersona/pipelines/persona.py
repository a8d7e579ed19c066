"""The persona-vector pipeline of Chen et al. 2025, batched in JAX, resumable.

``run_extract(model, trait, judge, config, out_dir)`` runs, for one trait (``run_extract_all``: for
every trait, with one batched steering sweep):

1. **generate** a response for every (instruction pair side x question x sample) under the system
   prompts "You are a/an {trait} assistant. {pos instruction}" / "You are a helpful assistant. {neg
   instruction}" (the negative side never names the trait), plus pos/neg answers to the held-out
   evaluation questions (batched, seeded sampling);
2. **check the judge** on the trait's anchor answers (AUROC trait vs not, coherent vs broken); a
   judge below the bar (a 135M model is at chance) is not trusted and drives nothing;
3. **judge + filter** aligned pairs when the judge is trusted (pos trait >= t, neg < t, coherence >=
   c), else keep every pair with two different answers; fewer than ``min_pairs`` is an error;
4. **extract** per resid point ``0..L``: ``mean(pos) - mean(neg)`` of the response-mean, prompt-mean
   and last-prompt-token activations, and the mean residual norm -> a :class:`~jaxpersona.artifacts.bank.VectorBank`;
5. **steering sweep** (judge-free), coefficients relative to the residual norm: the contrastive
   likelihood of the evaluation answers (teacher-forced) and greedy generations, every (trait,
   layer, coefficient) in one vmapped, shared-prefix computation;
6. **choose the layer**: largest trait-score gain among coefficients whose generations stay coherent
   (NLL under the unsteered model, distinct-2, repeats; thresholds calibrated on unsteered answers);
   the coefficient where coherence breaks; Spearman rho below it;
7. **monitor**: projection of the last prompt token vs the judge-free trait score of the answer
   (Pearson r per layer with a Fisher interval; the judged r beside it when the judge is trusted).

Every unit of work is appended to a JSONL file in the run directory as it finishes, keyed by a
hash of what determines it, so a killed run resumes without redoing finished generations or
judgements (and a changed config recomputes only what changed). Chunks of generation are fixed
by the job order and seeded by their index, so a resumed run produces the same text as an
uninterrupted one. The run directory is a :func:`~jaxpersona.runner.run.open_run` run (kind
``extract``; ``extract-all`` for several traits): its lock, ``run.json`` manifest and timed stages
``generate, judge_check, judge, extract, steer, choose, monitor, summary`` (prefixed ``<trait>/`` in an
``extract-all`` run, but for the shared ``steer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import tomllib
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts import plots
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.records import KeyedJsonl, digest
from jaxpersona.compute.activations import VARIANTS, iter_activations
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.compute.scoring import ScoringSet
from jaxpersona.compute.sweep import POSITIONS, Grid, run_sweep
from jaxpersona.data.configs import (
    check_positive,
    check_types,
    preset_config,
    replace_checked,
)
from jaxpersona.data.traits import coherence_prompt, list_traits, load_anchors
from jaxpersona.edit.directions import steering_vectors
from jaxpersona.measure.evaluate import (
    answer_trait_scores,
    choose_layer,
    coherence_stats,
    steering_table,
)
from jaxpersona.measure.judge_check import JudgeCheck, check_judge
from jaxpersona.measure.selection import (
    DEFAULT_HOW,
    cross_fit,
    dose_response,
    echo_rate,
    instruction_words,
    paired_gain,
    select,
    setting_json,
)
from jaxpersona.measure.stats import CoherenceThresholds, auroc_ci, pearson_ci
from jaxpersona.model.sharding import mesh_option
from jaxpersona.runner.run import Run, Stage, open_run
from jaxpersona.runner.stages import generate_cached, judge_cached


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Sizes, thresholds and units of one pipeline run. ``default()`` fits < 3 min on a 2-core CPU
    with the 135M default model; ``full()`` follows the paper's sizes.

    ``filter`` (which contrastive pairs are kept):
      * ``"auto"`` (default): if the judge passes its check on the trait's anchor answers, the paper's
        absolute cuts (pos trait >= ``trait_threshold``, neg < it, both coherences >=
        ``coherence_threshold``); otherwise every pair with two non-empty, different answers — an
        unchecked judge never drives the filter;
      * ``"absolute"`` / ``"relative"`` (thresholds read as percentiles of this run's scores): forced
        judge filters — a judge that fails its check is then an error unless ``trust_judge``;
      * ``"none"``: keep every pair, no judging.
    ``coeff_units``: ``"relative"`` — a steering coefficient c adds ``c * |resid[l]| * v̂[l]`` where
    ``|resid[l]|`` is the mean response-token norm on the extraction answers (recorded in the bank),
    so 0.5 means "half the residual norm" at any layer and in any model; ``"absolute"`` — ``c * v[l]``
    with the raw mean-difference vector (persona_vectors' units).
    """

    n_pairs: int = 5  # instruction pairs used (<= the trait's)
    n_questions: int = 10  # extraction questions used
    samples: int = 1  # responses per (pair side, question)
    max_new_tokens: int = 32
    temperature: float = 0.7  # the paper samples at 1.0 (full preset); a 135M model stays coherent at 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 40
    filter: str = "auto"  # "auto", "absolute", "relative" or "none"
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_pairs: int = 10  # fewer kept pairs is a FilterError, never a silent tiny-sample vector
    min_mass: float = 0.25
    judge_batch: int = 16
    judge_min_auroc: float = 0.8  # the judge check's bar (trait and coherence AUROC on the anchors)
    trust_judge: bool = False  # use the judge even if it fails (or lacks) its check; said in the summary
    # layer choice by steering (judge-free)
    coeff_units: str = "relative"  # "relative" (fraction of the residual norm) or "absolute"
    steer_layers: tuple[int, ...] = ()  # () -> evenly spaced over the middle of the model
    n_steer_layers: int = 4
    steer_coeffs: tuple[float, ...] = (-0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
    n_eval: int = 20  # evaluation questions (the shipped traits have 20); cross-fitted, see ``folds``
    steer_tokens: int = 24
    max_bad: float = 0.25  # a grid point is incoherent when more of its generations than this are
    # monitoring
    monitor_pairs: int = 1  # system prompts: none + pos_i + neg_i for i < monitor_pairs
    monitor_tokens: int = 32
    # how to steer (fields added in 0.7, after the older ones so config.json keeps its order): grid axes beside layer and coefficient (the default setting is the first of each)
    steer_positions: tuple[str, ...] = ("response", "all")  # "response", "all", "prompt"
    steer_variants: tuple[str, ...] = ("response_mean",)  # "response_mean", "prompt_mean", "prompt_last"
    folds: int = 2  # cross-fitting: the setting is chosen on the other folds' questions, its gain read on these
    n_random: int = 3  # random directions of the same norm run at the chosen setting (the control)

    @classmethod
    def default(cls) -> ExtractConfig:
        return cls()

    @classmethod
    def full(cls) -> ExtractConfig:
        """Chen et al.'s sizes: 5 pairs x all extraction questions x 10 samples, 20 eval questions."""
        return cls(temperature=1.0, top_p=1.0, n_questions=10_000, samples=10, max_new_tokens=256, n_eval=20,
                   steer_tokens=128, n_steer_layers=10, steer_coeffs=(-0.5, -0.25, 0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
                   steer_positions=("response", "all", "prompt"), steer_variants=VARIANTS,
                   monitor_pairs=2, monitor_tokens=128, batch_size=64)

    def replace(self, **kw: Any) -> ExtractConfig:
        return replace_checked(self, "extract", **kw)

    def validate(self, n_resid: int) -> None:
        check_types(self, "extract")
        check_positive(self, "extract", ("n_pairs", "n_questions", "samples", "max_new_tokens", "batch_size", "min_pairs",
                                         "judge_batch", "n_eval", "steer_tokens", "monitor_tokens",
                                         "n_steer_layers"))
        if self.filter not in FILTERS:
            raise errors.InputError(f"extract config filter must be one of {FILTERS}, got {self.filter!r}")
        if self.coeff_units not in ("relative", "absolute"):
            raise errors.InputError(f"extract config coeff_units must be 'relative' or 'absolute', got {self.coeff_units!r}")
        if not (0 <= self.trait_threshold <= 100 and 0 <= self.coherence_threshold <= 100):
            raise errors.InputError("the thresholds are in [0, 100]: judge scores (filter = 'absolute') or percentiles "
                                    f"(filter = 'relative'); got {self.trait_threshold}, {self.coherence_threshold}")
        if not 0.5 <= self.judge_min_auroc <= 1:
            raise errors.InputError(f"judge_min_auroc must be in [0.5, 1], got {self.judge_min_auroc}")
        if not 0 <= self.max_bad < 1:
            raise errors.InputError(f"max_bad must be in [0, 1), got {self.max_bad}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise errors.InputError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        bad = [l for l in self.steer_layers if not 0 <= l < n_resid]
        if bad:
            raise errors.InputError(f"steer_layers {bad} outside resid[0..{n_resid - 1}]")
        if not self.steer_coeffs or not all(math.isfinite(c) for c in self.steer_coeffs):
            raise errors.InputError(f"steer_coeffs must be finite and non-empty, got {self.steer_coeffs}")
        for key, allowed in (("steer_positions", POSITIONS), ("steer_variants", VARIANTS)):
            got = getattr(self, key)
            if not got or len(set(got)) != len(got) or not set(got) <= set(allowed):
                raise errors.InputError(f"{key} must be distinct values among {list(allowed)}, got {list(got)}")
        if self.folds < 2 or self.folds > self.n_eval:
            raise errors.InputError(f"folds must be in [2, n_eval = {self.n_eval}] (cross-fitting), got {self.folds}")
        if self.n_random < 1:
            raise errors.InputError(f"n_random must be >= 1 (the random-direction control), got {self.n_random}")
        if 0.0 not in self.steer_coeffs or not any(c > 0 for c in self.steer_coeffs):
            raise errors.InputError(f"steer_coeffs must contain 0 (the unsteered baseline) and a positive coefficient, "
                                    f"got {self.steer_coeffs}")

    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        """Steering layers: given, or ``n_steer_layers`` evenly spaced over resid[L/4 .. 3L/4]."""
        if self.steer_layers:
            return tuple(sorted(set(self.steer_layers)))
        lo, hi = max(1, n_layers // 4), max(1, (3 * n_layers) // 4)
        return tuple(sorted(set(int(round(x)) for x in np.linspace(lo, hi, self.n_steer_layers))))


FILTERS = ("auto", "absolute", "relative", "none")

# Keys of the [extract] table that no longer do anything, with the value every config.json records for them
# (so a config.json, and the config digest in run.json, stay what they were before the key was retired).
RETIRED = {"steer_points_per_chunk": 8}  # the sweep chunks by layer and memory budget


@dataclasses.dataclass(frozen=True)
class _ExtractTable(ExtractConfig):
    """An ``[extract]`` table as read: :class:`ExtractConfig` plus the retired keys old config files may still
    set (accepted, then dropped)."""

    steer_points_per_chunk: int = RETIRED["steer_points_per_chunk"]


def load_extract_config(path: str | Path | None, full: bool = False) -> ExtractConfig:
    """Preset (``default`` or ``full``) overridden by the ``[extract]`` table of a TOML file."""
    presets = {"default": _ExtractTable.default(), "full": _ExtractTable.full()}
    table = preset_config(path, "extract", presets, "full" if full else "default",
                          'use preset = "full", traits = [...] and an [extract] table', {"traits"})
    return ExtractConfig(**{f.name: getattr(table, f.name) for f in dataclasses.fields(ExtractConfig)})


def config_record(trait: str, model: str | None, judge_id: str, config: ExtractConfig) -> dict[str, Any]:
    """What a trait's ``config.json`` holds: trait, model, judge and every config field (the retired keys
    at their place, with the value they always had)."""
    out: dict[str, Any] = {"trait": trait, "model": model, "judge": judge_id}
    for k, v in dataclasses.asdict(config).items():
        out[k] = v
        if k == "steer_tokens":
            out.update(RETIRED)
    return out


def load_run_traits(path: str | Path | None) -> list[str]:
    """The config file's top-level ``traits``: a list of trait names/files, or ``"all"`` (every shipped
    trait); [] without a file or key."""
    if path is None or not Path(path).exists():
        return []
    value = tomllib.loads(Path(path).read_text()).get("traits", [])
    if value == "all":
        return list_traits()
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise errors.InputError(f"{path}: traits must be \"all\" or a list of trait names/files, got {value!r}")
    return value




def _mean(xs: Sequence[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return float(np.mean(got)) if got else None


# --- the pipeline -----------------------------------------------------------------------------
@dataclasses.dataclass
class ExtractResult:
    """What the pipeline found for one trait; also written to ``summary.json``.

    Every number says which measure produced it: ``steering`` cells are judge-free (contrastive
    likelihood, with bootstrap intervals; coherence from NLL/distinct-2/repeats), ``steering_judged``
    holds judge scores only when the judge passed its check; ``decisions`` names the measure that
    drove the filter and the layer choice."""

    trait: str
    model: str
    judge: str
    judge_check: dict[str, Any]
    decisions: dict[str, str]
    n_generated: int
    n_pairs_total: int
    n_pairs_kept: int
    filter: str
    coeff_units: str
    resid_norm: dict[str, float]  # layer -> the norm a relative coefficient of 1 adds (steering layers)
    best_layer: int | None
    choice: dict[str, Any]  # gain, cliff, rho, per_layer (evaluate.choose_layer)
    baseline_score: float
    steering: dict[str, dict[str, dict[str, Any]]]  # layer -> coeff -> judge-free cell
    steering_judged: dict[str, dict[str, dict[str, float | None]]] | None
    coherence_thresholds: dict[str, float]
    monitor: dict[str, dict[str, Any]]  # layer -> {r, lo, hi, n}: projection vs judge-free answer score
    monitor_judged: dict[str, dict[str, Any]] | None  # layer -> {r, lo, hi, n} vs the judge (if trusted)
    wall_s: dict[str, float]
    out_dir: str
    setting: dict[str, Any] | None = None  # the shipped {positions, variant, layer, coeff} (selection.setting_json)
    selection: dict[str, Any] | None = None  # selection.select on all questions (per positions/variant: its best)
    heldout: dict[str, Any] | None = None  # selection.cross_fit: the procedure's held-out gain, fold choices
    control: dict[str, Any] | None = None  # random directions at the setting: selection.paired_gain
    dose: dict[str, Any] | None = None  # selection.dose_response at the setting's layer
    lexical: dict[str, Any] | None = None  # distinct-2 and instruction-word echo, steered vs unsteered
    steering_by_how: dict[str, Any] | None = None  # "positions/variant" -> judge-free table
    measures: list[dict[str, str]] | None = None  # per measure: what it decided in this run (measure_uses)

    @property
    def reliable(self) -> bool:
        """The held-out gain's interval is above 0."""
        h = self.heldout
        return bool(h and h.get("lo") is not None and math.isfinite(h["lo"]) and h["lo"] > 0)

    def table(self) -> str:
        coeffs = sorted({c for v in self.steering.values() for c in v}, key=float)
        units = "x residual norm" if self.coeff_units == "relative" else "x raw vector"
        lines = [f"trait {self.trait} on {self.model}",
                 self.judge_check.get("describe", ""),
                 self._own_check_line(),
                 f"pairs kept {self.n_pairs_kept}/{self.n_pairs_total} ({self.n_generated} responses generated); "
                 f"filter: {self.decisions['filter']}",
                 f"steering (judge-free): change in contrastive log-likelihood lp(pos answer) - lp(neg answer) vs "
                 f"unsteered ({self.baseline_score:+.3f}), per layer x coefficient ({units}); * = incoherent "
                 "generations (judge-free)",
                 "layer  " + "  ".join(f"{float(c):>+8g}" for c in coeffs)]
        for layer, row in self.steering.items():
            cells = [f"{row[c]['delta']:>+7.3f}{'*' if not row[c]['coherent'] else ' '}" for c in coeffs]
            per = self.choice["per_layer"].get(layer, {})
            cliff = per.get("cliff")
            lines.append(f"{layer:>5}  " + "  ".join(cells) + f"   cliff {'>' + format(max(map(float, coeffs)), 'g') if cliff is None else format(cliff, 'g')}"
                         f", rho {_fmt(per.get('rho'), 2)}")
        if self.best_layer is None:
            lines.append(f"best layer: none ({self.choice['reason']})")
        else:
            b = self.steering[str(self.best_layer)]
            bc = self.choice.get("best_coeff")
            cell = b[f"{bc:g}"] if bc is not None else None
            ci = f" [{cell['delta_lo']:+.3f}, {cell['delta_hi']:+.3f}]" if cell else ""
            lines.append(f"best layer: {self.best_layer} (gain {_fmt(self.choice['gain'], 3)}{ci} at c={bc:g}; "
                         f"coherence breaks at c={_fmt(self.choice['cliff'], 3) if self.choice['cliff'] is not None else 'none in grid'}; "
                         f"Spearman rho(coeff, trait score) below the cliff = {_fmt(self.choice['rho'], 2)}) — "
                         f"chosen by {self.decisions['layer']}")
        lines += self._evidence_lines()
        m = self.monitor.get(str(self.best_layer)) if self.best_layer is not None else None
        if m:
            lines.append(f"monitoring (judge-free): Pearson r(last-prompt projection, answer trait score) at layer "
                         f"{self.best_layer} = {_fmt(m['r'], 3)} [{_fmt(m['lo'], 2)}, {_fmt(m['hi'], 2)}], n={m['n']}")
        if self.monitor_judged and self.best_layer is not None:
            mj = self.monitor_judged.get(str(self.best_layer), {})
            lines.append(f"monitoring (judged): r = {_fmt(mj.get('r'), 3)} [{_fmt(mj.get('lo'), 2)}, {_fmt(mj.get('hi'), 2)}]")
        if self.measures:
            lines.append("what each measure decided in this run:")
            lines += [f"  - {m['measure']}: {m['decided']}" for m in self.measures]
        lines.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.wall_s.items()))
        return "\n".join(line for line in lines if line)


    def _own_check_line(self) -> str:
        own = self.judge_check.get("own_answers")
        if not own:
            return ""
        return (f"judge on this run's own answers (pos vs neg system prompt): AUROC {_fmt(own['auroc'], 2)} "
                f"[{_fmt(own['lo'], 2)}, {_fmt(own['hi'], 2)}] — "
                + ("passed" if own["passed"] else "below the bar: not trusted for this trait"))

    def _evidence_lines(self) -> list[str]:
        """The setting, its held-out gain, the random control, the slope and the lexical checks."""
        lines = []
        if self.setting is not None and self.selection is not None:
            st = self.setting
            others = "; ".join(f"{h}: layer {v['setting'][2]}, c={v['setting'][3]:g}, gain {v['gain']:+.3f}"
                               for h, v in self.selection.get("per_how", {}).items())
            lines.append(f"setting: {st['positions']} positions, {st['variant']} vector, layer {st['layer']}, "
                         f"c={st['coeff']:g} ({self.selection['reason']}); searched: {others}")
        h = self.heldout
        if h is not None:
            folds = ", ".join("none" if f["setting"] is None else f"{f['setting'][0]}/{f['setting'][1]} "
                              f"L{f['setting'][2]} c={f['setting'][3]:g}" for f in h["folds"])
            lines.append(f"held-out gain ({len(h['folds'])}-fold cross-fitting, n={h['n']} questions): "
                         f"{_fmt(h['gain'], 3)} [{_fmt(h['lo'], 3)}, {_fmt(h['hi'], 3)}]; questions with a positive "
                         f"gain {_fmt(100 * h['share_positive'] if h['share_positive'] is not None else None, 0)}%; "
                         f"folds chose {folds}" + ("" if h["stable"] else " — selection unstable"))
        c = self.control
        if c is not None:
            lines.append(f"random-direction control ({c['n_random']} directions, same norm, same setting): gain "
                         f"{_fmt(c['control'], 3)} [{_fmt(c['control_lo'], 3)}, {_fmt(c['control_hi'], 3)}]; trait - "
                         f"random {_fmt(c['diff'], 3)} [{_fmt(c['diff_lo'], 3)}, {_fmt(c['diff_hi'], 3)}]"
                         + ("" if c["beats"] else " — does not beat the random direction"))
        d = self.dose
        if d is not None:
            lines.append(f"dose-response slope over c in {d['coeffs']} (below the cliff): "
                         + (f"{_fmt(d['slope'], 3)} [{_fmt(d['lo'], 3)}, {_fmt(d['hi'], 3)}] per unit c, n={d['n']}"
                            if d["slope"] is not None else d.get("reason", "-")))
        x = self.lexical
        if x is not None:
            pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
            lines.append(f"lexical: distinct-2 {_fmt(x['distinct2_steered'], 2)} steered vs "
                         f"{_fmt(x['distinct2_unsteered'], 2)} unsteered; the instruction's own words "
                         f"({', '.join(x['words'][:6]) or 'none'}) echoed in {pct(x['echo_steered'])} of steered vs "
                         f"{pct(x['echo_unsteered'])} of unsteered answers")
        if h is not None and not self.reliable:
            lines.append("no reliable steering on this model: the held-out gain's interval includes 0")
        return lines


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


@dataclasses.dataclass
class _TraitState:
    """One trait's run between stages: its folder inside the run directory (``sub``: ``""`` or
    ``"<trait>/"``, also the prefix of its stage names), its judgement store, and what each stage found."""

    trait: Any
    sub: str
    out: Path  # run.out / sub
    judged: KeyedJsonl
    log: Callable[[str], None]
    wall: dict[str, float] = dataclasses.field(default_factory=dict)  # stage -> seconds (the summary's wall_s)
    check: Any = None  # JudgeCheck
    trusted: bool = False
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_items: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (question, pos, neg answer)
    pairs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    kept: list[tuple[dict[str, Any], dict[str, Any]]] = dataclasses.field(default_factory=list)
    filter_desc: str = ""
    filter_decision: str = ""
    vecs: Any = None  # [V, L+1, D] float32
    norms: Any = None  # [L+1] float32
    bank: Any = None  # VectorBank
    own_check: dict[str, Any] | None = None  # the judge's AUROC on this run's pos vs neg answers (when judged)
    judge_filtered: bool = False  # the judge's scores filtered the extraction pairs


@contextlib.contextmanager
def _stage(run: Run, st: _TraitState, name: str) -> Iterator[Stage]:
    """``run.stage`` of one trait (named ``st.sub + name``); its wall seconds go to ``st.wall[name]``."""
    with run.stage(st.sub + name) as stage:
        yield stage
    st.wall[name] = run.wall()[st.sub + name]


def _tagged(log: Callable[[str], None], tag: str) -> Callable[[str], None]:
    return lambda message: log(tag + message)


def _check_inputs(model: Model, traits: Sequence[Any], config: ExtractConfig) -> None:
    config.validate(model.cfg.n_resid)
    if len({t.name for t in traits}) != len(traits):
        raise errors.InputError("each trait may appear once per run")


def run_extract(
    model: Model,
    trait: Any,
    judge: Any,
    config: ExtractConfig,
    out_dir: str | Path,
    *,
    judge_id: str,
    anchors: Any = "shipped",
    progress: bool = True,
    log: Callable[[str], None] = print,
    mesh: str | None = None,
) -> ExtractResult:
    """The whole pipeline for one trait (see the module docstring).

    ``anchors``: a :class:`~jaxpersona.data.traits.Anchors`, ``"shipped"`` (the trait's shipped anchors,
    if any) or None (the judge is unchecked). Run directory ``out_dir`` (a run of kind ``extract``):
    ``responses.jsonl``, ``judgements.jsonl``, ``monitor.jsonl`` (resumable caches), ``steering/`` (the
    sweep's resumable rows), ``config.json``, ``run.json``, ``judge_check.json``, ``pairs.jsonl``,
    ``vectors/`` (Orbax bank with the residual norms), ``vectors.npy``, ``steering_scored.jsonl``,
    ``monitor_scored.jsonl``, ``summary.json``/``.txt``, ``steering.png``, ``monitor.png``.
    A second process on the same directory gets :class:`~jaxpersona.errors.RunLockedError`. ``mesh``
    (``"DATAxMODEL"``): the steering sweep and the random control run sharded on it (grid points over ``data``,
    weights over ``model``); the other stages run on one device.
    """
    _check_inputs(model, [trait], config)
    device_mesh = mesh_option(mesh)
    with open_run(out_dir, "extract", config_record(trait.name, model.name, judge_id, config), model=model,
                  seeds={"seed": config.seed}, log=log, progress=progress) as run:
        return run_extract_many(run, model, [trait], judge, config, judge_id=judge_id, anchors=[anchors],
                                mesh=device_mesh)[0]


def run_extract_many(
    run: Run,
    model: Model,
    traits: Sequence[Any],
    judge: Any,
    config: ExtractConfig,
    *,
    judge_id: str,
    subdirs: Sequence[str] | None = None,
    anchors: Sequence[Any] | None = None,
    sweep_dir: str = "steering",
    mesh: Any = None,
) -> list[ExtractResult]:
    """Stages 1-4 per trait, then **one** steering sweep over traits x layers x coefficients (one
    compile, chunked by the memory budget; ``sweep_dir`` inside the run holds its resumable rows),
    then layer choice and monitoring per trait, all in the open ``run``.

    ``subdirs``: each trait's folder inside the run directory, ``""`` or ending in ``/`` (default: ``""``
    for one trait, ``"<trait>/"`` for several); a trait in a folder gets its own ``config.json`` there."""
    _check_inputs(model, traits, config)
    if subdirs is None:
        subdirs = [""] if len(traits) == 1 else [f"{t.name}/" for t in traits]
    if len(subdirs) != len(traits) or any(s and not s.endswith("/") for s in subdirs):
        raise errors.InputError(f"one folder ('' or ending in '/') per trait, got {list(subdirs)} for "
                                f"{len(traits)} trait(s)")
    anchors = list(anchors) if anchors is not None else ["shipped"] * len(traits)
    states = []
    for trait, sub, anc in zip(traits, subdirs, anchors):
        anc = load_anchors(trait) if isinstance(anc, str) and anc == "shipped" else anc
        tag = f"[{trait.name}] " if len(traits) > 1 else ""
        if sub:
            run.write_json(sub + "config.json", config_record(trait.name, model.name, judge_id, config))
        st = _TraitState(trait, sub, run.out / sub, run.records(sub + "judgements.jsonl"), _tagged(run.log, tag))
        _prepare_trait(run, model, st, judge, config, judge_id=judge_id, anchors=anc)
        states.append(st)
    sweep = _steer_traits(run, model, states, config, sweep_dir, mesh)
    share = run.wall()["steer"] / len(states)
    results = []
    for st in states:
        st.wall["steer"] = share
        results.append(_finish_trait(run, model, st, sweep[st.trait.name], judge, config, judge_id=judge_id,
                                     mesh=mesh))
    return results


def _judge_rows(judge: Any, judge_id: str, st: _TraitState, rows: list[dict[str, Any]], config: ExtractConfig,
                desc: str, progress: bool, stage: Stage | None, coherence: bool = True) -> None:
    """Adds ``trait`` and ``coherence`` judge scores to rows with ``question``/``response`` (None for an
    empty response, or where the judge's integer mass is below ``min_mass``)."""
    live = [r for r in rows if r["response"]]
    prompts = [st.trait.judge_prompt(r["question"], r["response"]) for r in live]
    if coherence:
        prompts += [coherence_prompt(r["question"], r["response"]) for r in live]
    scores = _judge_scores(judge, judge_id, st, prompts, config, desc, progress, stage)
    for r in rows:
        r["trait"] = r["coherence"] = None
    for i, r in enumerate(live):
        r["trait"] = scores[i]
        r["coherence"] = scores[len(live) + i] if coherence else None


def _judge_scores(judge: Any, judge_id: str, st: _TraitState, prompts: list[str], config: ExtractConfig,
                  desc: str, progress: bool, stage: Stage | None) -> list[float | None]:
    try:
        return judge_cached(judge, judge_id, st.judged, prompts, batch=config.judge_batch, min_mass=config.min_mass,
                            desc=desc, progress=progress, stage=stage)
    except errors.EndpointError as e:
        raise errors.EndpointError(f"{e} Finished generations and judgements are kept in {st.out}; "
                                   "rerun the same command to resume.") from e


def _prepare_trait(run: Run, model: Model, st: _TraitState, judge: Any, config: ExtractConfig, *, judge_id: str,
                   anchors: Any) -> None:
    """Stages 1-4: generate, check the judge, judge + filter, extract (vectors and residual norms)."""
    _generate(run, model, st, config)
    _check_the_judge(run, st, judge, config, judge_id=judge_id, anchors=anchors)
    _judge_and_filter(run, st, judge, config, judge_id=judge_id)
    _extract(run, model, st, config, judge_id=judge_id)


def _generate(run: Run, model: Model, st: _TraitState, config: ExtractConfig) -> None:
    """Stage 1: the extraction answers + the evaluation answers the trait score is measured on."""
    trait, out = st.trait, st.out
    with _stage(run, st, "generate") as stage:
        mid = model_fingerprint(model)
        n_pairs = min(config.n_pairs, len(trait.pairs))
        questions = list(trait.questions[: config.n_questions])
        eval_qs = list(trait.eval_questions[: config.n_eval])
        if not eval_qs:
            raise errors.InputError(f"trait {trait.name!r} has no evaluation questions: the judge-free trait score "
                                    "needs held-out questions (add 'eval_questions' to the trait file)")
        jobs = []

        def job(kind: str, side: str, i: int, q: str, s: int, extra: dict[str, Any]) -> None:
            system = trait.system_prompt(side, i)
            conv = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            key = digest(kind, mid, side, system, q, s, config.max_new_tokens, config.temperature, config.top_p,
                         config.seed)
            jobs.append((key, conv, {"side": side, "pair": i, "question": q, "sample": s, **extra}))

        for i in range(n_pairs):
            for q in questions:
                for s in range(config.samples):
                    for side in ("pos", "neg"):
                        job("extract", side, i, q, s, {})
        n_extract = len(jobs)
        for qi, q in enumerate(eval_qs):
            for side in ("pos", "neg"):
                job("eval", side, qi % n_pairs, q, 0, {"eval": True})
        st.log(f"[1/7] generating {n_extract} extraction responses ({n_pairs} pairs x {len(questions)} questions x "
               f"{config.samples} samples x 2 sides) + {len(jobs) - n_extract} evaluation answers, "
               f"{config.max_new_tokens} new tokens")
        recs = generate_cached(model, run.records(st.sub + "responses.jsonl"), jobs,
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               top_p=config.top_p, seed=config.seed, batch_size=config.batch_size, desc="generate",
                               progress=run.progress, stage=stage)
        st.rows = [{**recs[k], "key": k} for k, _, _ in jobs[:n_extract]]
        ev = [recs[k] for k, _, _ in jobs[n_extract:]]
        items = [(ev[2 * j]["question"], ev[2 * j]["response"], ev[2 * j + 1]["response"]) for j in range(len(eval_qs))]
        same = [q for q, p, n in items if not p or not n or p == n]
        st.eval_items = [(q, p, n) for q, p, n in items if q not in same]
        if same:
            st.log(f"      warning: {len(same)} evaluation question(s) dropped: empty or identical pos/neg answers")
        if not st.eval_items:
            raise errors.InputError(f"every evaluation question got empty or identical pos and neg answers ({out}/"
                                    "responses.jsonl): the contrastive trait score has nothing to compare; raise "
                                    "max_new_tokens or the temperature")


def _check_the_judge(run: Run, st: _TraitState, judge: Any, config: ExtractConfig, *, judge_id: str,
                     anchors: Any) -> None:
    """Stage 2: the judge on the trait's anchor answers; decides whether it may drive anything."""
    with _stage(run, st, "judge_check") as stage:
        if config.filter == "none" and not config.trust_judge:
            check = JudgeCheck(judge_id, None, None, config.judge_min_auroc, {}, 0.0, False)
            st.log("[2/7] judge not used (filter = 'none')")
        else:
            check = check_judge(lambda ps: _judge_scores(judge, judge_id, st, ps, config, "judge check", run.progress,
                                                         stage),
                                st.trait, anchors, judge_id, config.judge_min_auroc)
            st.log(f"[2/7] {check.describe()}")
        run.write_json(st.sub + "judge_check.json", {**check.to_json(), "describe": check.describe()})
        st.check, st.trusted = check, check.passed or config.trust_judge
        if config.filter in ("absolute", "relative") and not st.trusted:
            raise errors.JudgeCheckError(
                f"{check.describe()}, but filter = {config.filter!r} relies on it. Use a judge that passes (--judge "
                "NAME, --judge-url), filter = 'auto' (judge-free when the judge fails), or trust_judge = true to use "
                f"it anyway. Generations so far are kept in {st.out}.")
        if config.trust_judge and not check.passed:
            st.log("      warning: trust_judge = true: using a judge that did not pass its check")


def _judge_and_filter(run: Run, st: _TraitState, judge: Any, config: ExtractConfig, *, judge_id: str) -> None:
    """Stage 3: judge the extraction answers (when the judge is trusted) and keep the aligned pairs."""
    rows, check = st.rows, st.check
    with _stage(run, st, "judge") as stage:
        use_judge = st.trusted and config.filter != "none"
        if use_judge:
            st.log(f"[3/7] judging {len(rows)} responses for {st.trait.name} and coherence with {judge_id}")
            _judge_rows(judge, judge_id, st, rows, config, "judge responses", run.progress, stage)
            # trusted per use: the judge must also tell this run's own pos answers from its neg answers
            a, lo, hi = auroc_ci([r["trait"] for r in rows if r["side"] == "pos" and r["trait"] is not None],
                                 [r["trait"] for r in rows if r["side"] == "neg" and r["trait"] is not None],
                                 seed=config.seed)
            st.own_check = {"auroc": a, "lo": lo, "hi": hi, "min_auroc": config.judge_min_auroc,
                            "passed": a is not None and a >= config.judge_min_auroc}
            st.log(f"      judge on this run's own answers (pos vs neg system prompt): AUROC {_fmt(a, 2)} "
                   f"[{_fmt(lo, 2)}, {_fmt(hi, 2)}]" + ("" if st.own_check["passed"] else " — below the bar"))
            if not st.own_check["passed"] and not config.trust_judge:
                if config.filter in ("absolute", "relative"):
                    raise errors.JudgeCheckError(
                        f"judge {judge_id} passed its anchor check but does not tell this run's pos answers from its "
                        f"neg answers (AUROC {_fmt(a, 2)} < {config.judge_min_auroc:g}); filter = {config.filter!r} "
                        f"relies on it. Use filter = 'auto' or trust_judge = true. Work so far is kept in {st.out}.")
                st.trusted = use_judge = False
        else:
            for r in rows:
                r["trait"] = r["coherence"] = None
        by_slot: dict[tuple, dict[str, dict[str, Any]]] = {}
        for r in rows:
            by_slot.setdefault((r["pair"], r["question"], r["sample"]), {})[r["side"]] = r
        st.judge_filtered = use_judge
        if use_judge:
            mode = "absolute" if config.filter == "auto" else config.filter
            t_cut, c_cut = filter_thresholds(rows, dataclasses.replace(config, filter=mode))
            how = "" if mode == "absolute" else (f" = percentiles {config.trait_threshold:g}/"
                                                 f"{config.coherence_threshold:g} of this run's scores")
            st.filter_desc = (f"{mode}: pos trait >= {t_cut:.2f}, neg trait < {t_cut:.2f}, coherence >= "
                              f"{c_cut:.2f}{how}")
            st.filter_decision = (f"judge {judge_id} ({'passed its check' if check.passed else 'trusted without passing: trust_judge'}); "
                                  f"{st.filter_desc}")
        else:
            st.filter_desc = "none: every pair with two non-empty, different answers"
            why = ("filter = 'none'" if config.filter == "none" else "the judge did not pass its check"
                   + (" on this run's own answers" if st.own_check and not st.own_check["passed"] else ""))
            st.filter_decision = f"judge-free: kept every pair with two non-empty, different answers ({why})"
        pairs, kept = [], []
        for slot, sides in by_slot.items():
            p, n = sides["pos"], sides["neg"]
            if use_judge:
                ok = (p["trait"] is not None and n["trait"] is not None and p["coherence"] is not None
                      and n["coherence"] is not None and p["trait"] >= t_cut and n["trait"] < t_cut
                      and p["coherence"] >= c_cut and n["coherence"] >= c_cut)
            else:
                ok = bool(p["response"]) and bool(n["response"]) and p["response"] != n["response"]
            pairs.append({"pair": slot[0], "question": slot[1], "sample": slot[2], "kept": ok,
                          "pos_trait": p["trait"], "neg_trait": n["trait"], "pos_coherence": p["coherence"],
                          "neg_coherence": n["coherence"], "pos_response": p["response"], "neg_response": n["response"]})
            if ok:
                kept.append((p, n))
        run.write_jsonl(st.sub + "pairs.jsonl", pairs)
        st.pairs, st.kept = pairs, kept
        st.log(f"[3/7] {len(kept)}/{len(pairs)} pairs kept ({st.filter_desc})")
        if len(kept) < config.min_pairs:
            raise errors.FilterError(_filter_message(pairs, config, judge_id, st.out, use_judge))


def _extract(run: Run, model: Model, st: _TraitState, config: ExtractConfig, *, judge_id: str) -> None:
    """Stage 4: the vectors and the residual norm a relative coefficient refers to."""
    cfg, trait, kept, check = model.cfg, st.trait, st.kept, st.check
    with _stage(run, st, "extract"):
        st.log(f"[4/7] extracting {', '.join(VARIANTS)} vectors at resid[0..{cfg.n_layers}] and residual norms")
        sums = np.zeros((2, len(VARIANTS), cfg.n_resid, cfg.d_model), np.float64)
        norm_sum = np.zeros(cfg.n_resid, np.float64)
        for side_i, side_rows in enumerate(([p for p, _ in kept], [n for _, n in kept])):
            for _, (acts, norms) in iter_activations(model, [r["messages"] for r in side_rows],
                                                     [r["response"] for r in side_rows], config.batch_size,
                                                     with_norms=True):
                sums[side_i] += acts.sum(axis=2)
                norm_sum += norms[VARIANTS.index("response_mean")].sum(axis=1)
        vecs = ((sums[0] - sums[1]) / len(kept)).astype(np.float32)  # [V, L+1, D]
        resid_norm = (norm_sum / (2 * len(kept))).astype(np.float32)  # [L+1]
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        counts = {"pairs_kept": len(kept), "pairs_total": len(st.pairs), "responses": len(st.rows)}
        meta = {"judge": judge_id,
                "judge_check": "passed" if check.passed else ("unchecked" if not check.checked else "failed"),
                "filter": st.filter_desc, **counts, "date": now, "contrast": CONTRAST_VERSION,
                "resid_norm": [round(float(x), 5) for x in resid_norm],
                "resid_norm_of": "mean token norm of resid[l] over the kept extraction answers (response tokens)"}
        bank = VectorBank(
            vectors=vecs, names=tuple(trait.name if v == "response_mean" else f"{trait.name}.{v}" for v in VARIANTS),
            model=model.name or cfg.family, meta=tuple({"trait": trait.name, "variant": v, **meta} for v in VARIANTS),
            created=now,
        )
        bank.save(st.out / "vectors", overwrite=True)
        run.artifact(st.out / "vectors")
        run.save_npy(st.sub + "vectors.npy", vecs[0])
        st.vecs, st.norms, st.bank = vecs, resid_norm, bank


CONTRAST_VERSION = 2  # 2: the negative system prompt no longer names the trait (banks before differ)


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _eval_set(st: _TraitState) -> ScoringSet:
    """The trait's evaluation answers as a scoring set: rows ``0..n-1`` the positive answers, ``n..2n-1`` the
    negative ones, each after its question alone."""
    return ScoringSet(tuple(q for q, _, _ in st.eval_items) * 2,
                      tuple(p for _, p, _ in st.eval_items) + tuple(n for _, _, n in st.eval_items))


def vector_name(trait: str, variant: str) -> str:
    """A bank entry's name: the trait for its response-mean vector, ``trait.variant`` for the others."""
    return trait if variant == "response_mean" else f"{trait}.{variant}"


def _steer_traits(run: Run, model: Model, states: list[_TraitState], config: ExtractConfig,
                  sweep_dir: str, mesh: Any = None) -> dict[str, dict[str, Any]]:
    """Stage 5 (``steer``): one batched steering sweep per token-position setting over traits x vector
    variants x layers x coefficients: teacher-forced contrastive likelihood of each trait's evaluation
    answers + greedy generations (for coherence). Its cache hits are the sweep rows served from
    ``sweep_dir``.

    Returns per trait ``{rows, steer_rows, tables, deltas, bad, thresholds, layers, coeffs, hows}``: ``tables``
    per ``"positions/variant"`` the judge-free table (:func:`steering_table`); ``deltas``/``bad`` per setting
    ``(positions, variant, layer, coeff)`` the per-question gain ``[n_q]`` and incoherent generations ``[n_q]``
    (coefficient 0 at every layer: zeros and the unsteered generations)."""
    cfg = model.cfg
    layers = config.layers_for(cfg.n_layers)
    coeffs = tuple(sorted(float(c) for c in config.steer_coeffs))
    variants = config.steer_variants
    with run.stage("steer") as stage:
        # one resumable store per position setting: the default's in sweep_dir, the others' in sweep_dir/<positions>
        dirs = {p: run.path(sweep_dir if i == 0 else f"{sweep_dir}/{p}") for i, p in enumerate(config.steer_positions)}
        before = sum(_count_lines(d / "results.jsonl") for d in dirs.values())
        vectors = np.stack([steering_vectors(st.vecs[VARIANTS.index(v)], st.norms, config.coeff_units)
                            for st in states for v in variants])
        names = tuple(vector_name(st.trait.name, v) for st in states for v in variants)
        sets = [_eval_set(st) for st in states for _ in variants]
        n_points = len(config.steer_positions) * len(Grid("steer", vectors, names, layers, coeffs,
                                                          baseline_once=True).points())
        run.log(f"[5/7] steering sweep: {len(states)} trait(s) x positions {list(config.steer_positions)} x vectors "
                f"{list(variants)} x {len(layers)} layers x {len(coeffs)} coefficients ({config.coeff_units}; "
                f"{n_points} points) on {len(states[0].eval_items)} evaluation questions: contrastive likelihood "
                f"(teacher-forced) + {config.steer_tokens} greedy tokens, batched")
        rows: list[dict[str, Any]] = []
        for positions in config.steer_positions:
            grid = Grid("steer", vectors, names, layers, coeffs, positions=positions, baseline_once=True)
            got = run_sweep(model, grid, sets, out_dir=dirs[positions], progress=run.progress,
                            generate_tokens=config.steer_tokens, mesh=mesh)
            rows += [{**r, "positions": positions} for r in got]
        stage.hit(max(0, len(rows) - (sum(_count_lines(d / "results.jsonl") for d in dirs.values()) - before)))

        # coherence of every generation (NLL under the unsteered model), calibrated per trait on unsteered answers;
        # rows i and i + n_q of a set share question i: its generation is taken once
        qs = {st.trait.name: [q for q, _, _ in st.eval_items] for st in states}
        of = {vector_name(st.trait.name, v): (st.trait.name, v) for st in states for v in variants}
        texts = [(r["positions"], r["vector"], r["layer"], r["coeff"], r["prompt"], r["text"]) for r in rows
                 if r["prompt"] < len(qs[of[r["vector"]][0]])]
        refs = [(st.trait.name, q, a) for st in states for q, p, n in st.eval_items for a in (p, n)]
        stats = coherence_stats(model, [qs[of[v][0]][i] for _, v, _, _, i, _ in texts] + [q for _, q, _ in refs],
                                [x for *_, x in texts] + [a for _, _, a in refs], batch_size=config.batch_size)
        text_stats, ref_stats = stats[: len(texts)], stats[len(texts):]
        out: dict[str, dict[str, Any]] = {}
        first = config.steer_positions[0]
        for st in states:
            name, n_q = st.trait.name, len(st.eval_items)
            mine = [(t, s) for t, s in zip(texts, text_stats) if of[t[1]][0] == name]
            base_gen = {t[4]: s for t, s in mine if t[3] == 0.0 and t[0] == first and t[1] == vector_name(name, variants[0])}
            ref = [s for (t, _, _), s in zip(refs, ref_stats) if t == name] + list(base_gen.values())
            thr = CoherenceThresholds.calibrate(ref, max_bad=config.max_bad)
            by_point: dict[tuple[str, str, int, float], dict[int, dict[str, float]]] = {}
            for (p, v, l, c, i, _), s in mine:
                by_point.setdefault((p, of[v][1], l, c), {})[i] = s
            logp: dict[tuple[str, str, int, float], np.ndarray] = {}
            for r in rows:
                if of[r["vector"]][0] == name:
                    key = (r["positions"], of[r["vector"]][1], r["layer"], r["coeff"])
                    logp.setdefault(key, np.full(2 * n_q, np.nan))[r["prompt"]] = r["logprob"]
            diffs = {k: v[:n_q] - v[n_q:] for k, v in logp.items()}
            base_bad = np.asarray([thr.bad(base_gen[i]) for i in range(n_q)])
            deltas: dict[tuple[str, str, int, float], np.ndarray] = {}
            bad: dict[tuple[str, str, int, float], np.ndarray] = {}
            tables: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
            for p in config.steer_positions:
                for v in variants:
                    for l in layers:
                        for c in coeffs:
                            k = (p, v, int(l), float(c))
                            if c == 0.0:
                                deltas[k], bad[k] = np.zeros(n_q), base_bad
                            else:
                                deltas[k] = diffs[k] - diffs[(p, v, min(layers), 0.0)]  # the same sweep's zero
                                bad[k] = np.asarray([thr.bad(by_point[k][i]) for i in range(n_q)])
                    vrows = [r for r in rows if r["positions"] == p and r["vector"] == vector_name(name, v)]
                    coherence = {(l, c): thr.point(list(pts.values())) for (pp, vv, l, c), pts in by_point.items()
                                 if pp == p and vv == v}
                    tables[f"{p}/{v}"] = steering_table(vrows, n_q, coherence, layers, coeffs, seed=config.seed)
            steer_rows = [{"positions": p, "variant": of[v][1], "layer": l, "coeff": c, "question": qs[name][i],
                           "response": x, **s} for (p, v, l, c, i, x), s in mine]
            base = {(p, v): diffs[(p, v, min(layers), 0.0)] for p in config.steer_positions for v in variants}
            out[name] = {"rows": [r for r in rows if of[r["vector"]][0] == name], "tables": tables, "deltas": deltas,
                         "bad": bad, "base": base, "thresholds": thr, "steer_rows": steer_rows, "layers": layers, "coeffs": coeffs,
                         "hows": [(p, v) for p in config.steer_positions for v in variants]}
    return out


@dataclasses.dataclass
class _Choice:
    """What the ``choose`` stage decided for one trait (the shipped setting is selected on all questions)."""

    table: dict[str, Any]  # the shipped (positions, variant)'s judge-free table
    choice: dict[str, Any]  # evaluate.choose_layer of that table, with the selected layer/coefficient
    baseline: float
    judged_table: dict[str, Any] | None
    setting: tuple[str, str, int, float] | None
    selection: dict[str, Any]  # selection.select on all questions
    heldout: dict[str, Any] | None  # selection.cross_fit
    dose: dict[str, Any] | None
    lexical: dict[str, Any] | None


def _choose(run: Run, st: _TraitState, sw: dict[str, Any], judge: Any, config: ExtractConfig, *,
            judge_id: str) -> _Choice:
    """Stage 6 (``choose``): the steering setting (positions, vector variant, layer, coefficient) selected on
    all evaluation questions, the procedure's held-out gain by cross-fitting, the dose-response slope and the
    lexical checks at the selected setting; the judged table when the judge is trusted (coherent rows only).
    Records the setting in the bank."""
    with _stage(run, st, "choose") as stage:
        n_q = len(st.eval_items)
        default = DEFAULT_HOW if DEFAULT_HOW in sw["hows"] else sw["hows"][0]
        sel = select(sw["deltas"], sw["bad"], None, max_bad=config.max_bad, default=default)
        folds = min(config.folds, n_q)
        heldout = (cross_fit(sw["deltas"], sw["bad"], folds=folds, max_bad=config.max_bad, seed=config.seed,
                             default=default) if n_q >= 2 else None)
        s = sel["setting"]
        how = (s[0], s[1]) if s is not None else default
        table = sw["tables"]["/".join(how)]
        choice = choose_layer(table)
        if s is not None:
            per = choice["per_layer"][str(s[2])]
            choice.update(best_layer=int(s[2]), best_coeff=float(s[3]), gain=sel["gain"], cliff=sel["cliff"],
                          rho=per["rho"])
        choice.update(positions=how[0], variant=how[1], reason=sel["reason"])
        baseline = table[str(sw["layers"][0])]["0"]["score"]
        dose = lexical = None
        steer_rows = sw["steer_rows"]
        unsteered = [r for r in steer_rows if r["coeff"] == 0.0 and (r["positions"], r["variant"]) == how]
        if s is not None:
            dose = dose_response({c: sw["deltas"][(how[0], how[1], s[2], c)] for c in sw["coeffs"]}, sel["cliff"],
                                 seed=config.seed)
            trait = st.trait
            words = instruction_words([trait.system_prompt("pos", i) for i in range(len(trait.pairs))],
                                      [trait.system_prompt("neg", i) for i in range(len(trait.pairs))])
            steered = [r for r in steer_rows if (r["positions"], r["variant"], r["layer"], r["coeff"]) == s]
            lexical = {"words": words, "echo_steered": echo_rate([r["response"] for r in steered], words),
                       "echo_unsteered": echo_rate([r["response"] for r in unsteered], words),
                       "distinct2_steered": _mean([r["distinct2"] for r in steered]),
                       "distinct2_unsteered": _mean([r["distinct2"] for r in unsteered]), "n": len(steered)}
        judged_table: dict[str, dict[str, dict[str, float | None]]] | None = None
        thr = sw["thresholds"]
        shipped_rows = [r for r in steer_rows if (r["positions"], r["variant"]) == how]
        if st.trusted:  # judged scores only on generations that pass the judge-free coherence check
            coherent = [r for r in shipped_rows if not thr.bad(r)]
            _judge_rows(judge, judge_id, st, coherent, config, "judge steering", run.progress, stage)
            judged_table = {}
            for l in sw["layers"]:
                judged_table[str(l)] = {}
                for c in sw["coeffs"]:
                    sel_rows = [r for r in coherent if r["coeff"] == c and (r["layer"] == l or c == 0.0)]
                    judged_table[str(l)][f"{c:g}"] = {"trait": _mean([r["trait"] for r in sel_rows]),
                                                      "coherence": _mean([r["coherence"] for r in sel_rows]),
                                                      "n": len(sel_rows)}
        run.write_jsonl(st.sub + "steering_scored.jsonl", steer_rows)
        best = choice["best_layer"]
        st.log(f"[6/7] steering setting (judge-free, chosen on all {n_q} questions): "
               + (f"{how[0]} positions, {how[1]} vector, layer {best}, c={choice['best_coeff']:g}"
                  if s is not None else "none") + f" — {sel['reason']}")
        if heldout is not None:
            st.log(f"      held-out gain ({folds}-fold cross-fitting, n={heldout['n']}): {_fmt(heldout['gain'], 3)} "
                   f"[{_fmt(heldout['lo'], 3)}, {_fmt(heldout['hi'], 3)}]"
                   + ("" if heldout["stable"] else "; selection unstable (the folds chose different settings)"))
        extra = {"best_layer": best, "cliff": choice["cliff"], "coeff_units": config.coeff_units,
                 "best_coeff": choice.get("best_coeff"), "positions": how[0],
                 "steer_vector": vector_name(st.trait.name, how[1])}
        st.bank = dataclasses.replace(st.bank, meta=tuple({**m, **extra} for m in st.bank.meta))
        st.bank.save(st.out / "vectors", overwrite=True)
        run.artifact(st.out / "vectors")
    return _Choice(table, choice, baseline, judged_table, s, sel, heldout, dose, lexical)


def random_directions(like: np.ndarray, n: int, seed: int, name: str) -> np.ndarray:
    """``[n, L+1, D]`` random directions with the per-layer norms of ``like [L+1, D]``, seeded by
    ``(seed, name)``."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    r = rng.standard_normal((n, *like.shape))
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
    return (r * np.linalg.norm(like, axis=-1, keepdims=True)[None]).astype(np.float32)


def _control(run: Run, model: Model, st: _TraitState, sw: dict[str, Any], ch: _Choice,
             config: ExtractConfig, mesh: Any = None) -> dict[str, Any] | None:
    """Stage ``control``: ``n_random`` random directions with the chosen vector's per-layer norms, run at the
    chosen setting (same positions, layer, coefficient, units) on the same questions. Returns the random gain
    and the trait's gain minus it per question (intervals over questions); None without a chosen setting."""
    if ch.setting is None:
        return None
    p, v, layer, c = ch.setting
    with _stage(run, st, "control"):
        name = st.trait.name
        rand = random_directions(st.vecs[VARIANTS.index(v)], config.n_random, config.seed, name)
        vectors = np.stack([steering_vectors(r, st.norms, config.coeff_units) for r in rand])
        n_q = len(st.eval_items)
        data = _eval_set(st)
        names = tuple(f"{name}~random{k}" for k in range(config.n_random))
        grid = Grid("steer", vectors, names, (int(layer),), (float(c),), positions=p)
        st.log(f"      control: {config.n_random} random direction(s) of the same norm at {p} positions, layer {layer}, "
               f"c={c:g}")
        # one scoring set for every direction: the points share one trunk and run as one chunk
        rows = run_sweep(model, grid, data, out_dir=run.path(st.sub + "control"), progress=run.progress, mesh=mesh)
        lp = np.full((config.n_random, 2 * n_q), np.nan)
        for r in rows:
            lp[names.index(r["vector"]), r["prompt"]] = r["logprob"]
        random_gain = (lp[:, :n_q] - lp[:, n_q:]).mean(axis=0) - sw["base"][(p, v)]
        out = paired_gain(sw["deltas"][ch.setting], random_gain, seed=config.seed)
        out.update(n_random=config.n_random, setting=setting_json(ch.setting),
                   per_question=[float(x) for x in random_gain])
    return out


def _monitor(run: Run, model: Model, st: _TraitState, judge: Any, config: ExtractConfig, show: int, *,
             judge_id: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """Stage 7 (``monitor``): projection of the last prompt token vs the judge-free trait score of the
    answer (and vs the judge when trusted). ``show``: the layer whose projection the rows carry.
    Returns ``(rows, monitor, monitor_judged)``."""
    cfg, trait = model.cfg, st.trait
    with _stage(run, st, "monitor") as stage:
        mid = model_fingerprint(model)
        eval_qs = [q for q, _, _ in st.eval_items]
        n_mon = min(config.monitor_pairs, len(trait.pairs))
        systems: list[tuple[str, str | None]] = [("none", None)]
        for i in range(n_mon):
            systems += [(f"pos{i}", trait.system_prompt("pos", i)), (f"neg{i}", trait.system_prompt("neg", i))]
        mjobs = []
        for label, system in systems:
            for q in eval_qs:
                conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                mjobs.append((digest("monitor", mid, system, q, config.monitor_tokens, config.temperature,
                                     config.top_p, config.seed), conv, {"system_label": label, "question": q}))
        st.log(f"[7/7] monitoring: {len(mjobs)} responses under {len(systems)} system prompts")
        mrecs = generate_cached(model, run.records(st.sub + "monitor.jsonl"), mjobs,
                                max_new_tokens=config.monitor_tokens, temperature=config.temperature,
                                top_p=config.top_p, seed=config.seed, batch_size=config.batch_size,
                                desc="monitor generate", progress=run.progress, stage=stage)
        mrows = [{**mrecs[k]} for k, _, _ in mjobs]
        # judge-free answer score, from instruction pairs that did not generate the monitored answers
        score_pairs = [i for i in range(len(trait.pairs)) if i >= n_mon][:1] or [0]
        free = answer_trait_scores(model, trait, [r["question"] for r in mrows], [r["response"] for r in mrows],
                                   score_pairs, batch_size=config.batch_size)
        for r, f in zip(mrows, free):
            r["score_free"] = None if not np.isfinite(f) else float(f)
        if st.trusted:
            _judge_rows(judge, judge_id, st, mrows, config, "judge monitor", run.progress, stage, coherence=False)
        proj = np.zeros((cfg.n_resid, len(mrows)), np.float32)
        units = st.vecs[0] / np.maximum(np.linalg.norm(st.vecs[0], axis=-1, keepdims=True), 1e-12)  # [L+1, D]
        for idx, acts in iter_activations(model, [r["messages"] for r in mrows], [r["response"] for r in mrows],
                                          config.batch_size):
            proj[:, idx] = np.einsum("lbd,ld->lb", acts[VARIANTS.index("prompt_last")], units)
        ok = [j for j, r in enumerate(mrows) if r["score_free"] is not None]
        monitor = {str(l): pearson_ci(proj[l, ok], [mrows[j]["score_free"] for j in ok]) for l in range(cfg.n_resid)}
        monitor_judged = None
        if st.trusted:
            sj = [j for j, r in enumerate(mrows) if r.get("trait") is not None]
            monitor_judged = {str(l): pearson_ci(proj[l, sj], [mrows[j]["trait"] for j in sj])
                              for l in range(cfg.n_resid)}
        for j, r in enumerate(mrows):
            r["projection"] = float(proj[show, j])
        run.write_jsonl(st.sub + "monitor_scored.jsonl", mrows)
    return mrows, monitor, monitor_judged


def _untrusted_why(st: _TraitState, config: ExtractConfig) -> str:
    """Why the judge drove nothing for this trait (empty when it is trusted)."""
    if st.trusted:
        return ""
    if config.filter == "none":
        return "filter = 'none': the judge was not used"
    own = st.own_check
    if own and not own["passed"]:
        return f"it passed the anchors but scored this run's own pos vs neg answers at AUROC {_fmt(own['auroc'], 2)}"
    return "it failed its check on the anchors" if st.check is not None else "no judge check"


def measure_uses(judge_id: str, trusted: bool, filtered: bool, why_not: str) -> list[dict[str, str]]:
    """Each measure of an extract run and the decisions it drove (the summary's "what each measure decided").
    ``trusted``: the judge passed its checks (anchors and this run's own answers) or was trusted by config;
    ``filtered``: its scores filtered the extraction pairs; ``why_not``: why the judge drove nothing."""
    judge_trait = ("the pair filter (pos answer's trait score >= the cut, neg's below); the judged steering table "
                   "and judged monitoring r, shown beside the judge-free ones, choose nothing" if filtered else
                   "no decision: judged tables shown beside the judge-free ones" if trusted else
                   f"nothing ({why_not}); no judged scores are reported")
    judge_coherence = ("the pair filter's coherence bar" if filtered else
                       f"nothing ({why_not})" if not trusted else "no decision")
    return [
        {"measure": "contrastive likelihood of the trait's evaluation answers, pos minus neg (judge-free)",
         "decided": "the steering setting (positions, vector, layer, coefficient); its held-out gain by "
                    "cross-fitting, the random-direction control and the dose-response slope"},
        {"measure": "coherence of the steered generations: NLL under the unsteered model, distinct-2, longest "
                    "repeat (judge-free, thresholds calibrated on unsteered answers)",
         "decided": "the coherence cliff: no coefficient at or past it is chosen"},
        {"measure": "answer score: log-likelihood ratio of the answer under held-out pos vs neg system prompts "
                    "(judge-free)",
         "decided": "the monitoring target: r against the last-prompt projection at the chosen layer (fixed in "
                    "advance, not chosen by r)"},
        {"measure": f"judge {judge_id}: trait score", "decided": judge_trait},
        {"measure": f"judge {judge_id}: coherence score", "decided": judge_coherence},
    ]


def _finish_trait(run: Run, model: Model, st: _TraitState, sw: dict[str, Any], judge: Any, config: ExtractConfig, *,
                  judge_id: str, mesh: Any = None) -> ExtractResult:
    """Stages 6-7 for one trait (layer choice, monitoring), then its ``summary`` stage: summary and plots."""
    cfg, trait = model.cfg, st.trait
    ch = _choose(run, st, sw, judge, config, judge_id=judge_id)
    control = _control(run, model, st, sw, ch, config, mesh)
    table, choice, baseline, judged_table = ch.table, ch.choice, ch.baseline, ch.judged_table
    best = choice["best_layer"]
    show = best if best is not None else sw["layers"][len(sw["layers"]) // 2]
    mrows, monitor, monitor_judged = _monitor(run, model, st, judge, config, show, judge_id=judge_id)
    st.wall["total"] = sum(st.wall.values())

    decisions = {
        "filter": st.filter_decision,
        "layer": "judge-free measures (contrastive likelihood of the evaluation answers; coherence from NLL under "
                 "the unsteered model, distinct-2 and longest repeated span): the setting (positions, vector, layer, "
                 "coefficient) is selected on all evaluation questions; the reported gain is the held-out gain of "
                 f"that procedure by {config.folds}-fold cross-fitting",
        "monitor": "judge-free answer score (log-likelihood ratio of the answer under held-out pos vs neg system "
                   "prompts)" + ("; judged r beside it" if st.trusted else "; no judged r (judge not trusted)"),
    }
    check = {**st.check.to_json(), "describe": st.check.describe(), "own_answers": st.own_check}
    steering_layers = [str(l) for l in sw["layers"]]
    result = ExtractResult(
        trait.name, model.name or cfg.family, judge_id, check, decisions, len(st.rows), len(st.pairs), len(st.kept),
        st.filter_desc, config.coeff_units, {l: float(st.norms[int(l)]) for l in steering_layers}, best, choice,
        baseline, table, judged_table, dataclasses.asdict(sw["thresholds"]), monitor, monitor_judged, dict(st.wall),
        str(st.out), setting=setting_json(ch.setting), selection=ch.selection, heldout=ch.heldout, control=control,
        dose=ch.dose, lexical=ch.lexical, steering_by_how=sw["tables"],
        measures=measure_uses(judge_id, st.trusted, st.judge_filtered, _untrusted_why(st, config)))
    with run.stage(st.sub + "summary"):
        run.write_json(st.sub + "summary.json", dataclasses.asdict(result), indent=2)
        run.write_text(st.sub + "summary.txt", result.table() + "\n")
        plots.steering_judge_free({trait.name: {"table": table, "choice": choice}}, st.out / "steering.png",
                                  title=f"{trait.name}: judge-free steering on {result.model} ({config.coeff_units} "
                                        "units)")
        plots.monitor_scatter([r["projection"] for r in mrows], [r["score_free"] for r in mrows],
                              [r["system_label"] for r in mrows], st.out / "monitor.png",
                              title=f"{trait.name}: last-prompt projection @ resid[{show}] vs judge-free answer score",
                              r=monitor[str(show)]["r"], ylabel="answer score: lp(pos prompts) - lp(neg prompts)")
        run.artifact(st.out / "steering.png")
        run.artifact(st.out / "monitor.png")
    return result


def filter_thresholds(rows: list[dict[str, Any]], config: ExtractConfig) -> tuple[float, float]:
    """(trait cut, coherence cut): the config's values, or with ``filter = "relative"`` those
    percentiles of the scored rows' trait and coherence scores."""
    if config.filter != "relative":
        return config.trait_threshold, config.coherence_threshold
    ts = [r["trait"] for r in rows if r["trait"] is not None]
    cs = [r["coherence"] for r in rows if r["coherence"] is not None]
    t_cut = float(np.percentile(ts, config.trait_threshold)) if ts else math.inf
    c_cut = float(np.percentile(cs, config.coherence_threshold)) if cs else math.inf
    return t_cut, c_cut


def _filter_message(pairs: list[dict[str, Any]], config: ExtractConfig, judge_id: str, out: Path, judged: bool) -> str:
    def stat(key: str) -> str:
        xs = [p[key] for p in pairs if p[key] is not None]
        return f"{key} mean {np.mean(xs):.1f} (n={len(xs)})" if xs else f"{key}: no scores"

    kept = sum(p["kept"] for p in pairs)
    if not judged:
        return (f"only {kept} of {len(pairs)} pairs have two non-empty, different answers (need min_pairs = "
                f"{config.min_pairs}); inspect {out / 'pairs.jsonl'}; use more questions/samples or more new tokens. "
                "Generations so far are kept; a rerun resumes.")
    return (
        f"only {kept} of {len(pairs)} pairs survived the judge filter (need min_pairs = {config.min_pairs}): "
        + "; ".join(stat(k) for k in ("pos_trait", "neg_trait", "pos_coherence", "neg_coherence"))
        + f". Judge: {judge_id}. Inspect {out / 'pairs.jsonl'}; try more samples/questions, lower "
        "trait_threshold/coherence_threshold in a [extract] config, or a stronger judge (--judge NAME or "
        "--judge-url). Generations and judgements so far are kept; a rerun resumes."
    )


@dataclasses.dataclass
class AllTraitsResult:
    """``--all-traits``: one result per trait plus the shared sweep's wall time."""

    results: list[ExtractResult]
    out_dir: str

    def table(self) -> str:
        lines = [f"{'trait':<14} {'setting':<24} {'held-out gain':>24} {'- random':>8} {'slope':>7} {'cliff':>6} "
                 f"{'monitor r':>10} judge check"]
        for r in self.results:
            st = r.setting
            where = f"{st['positions']}/{st['variant'].split('_')[0]} L{st['layer']} c={st['coeff']:g}" if st else "none"
            h = r.heldout or {}
            ci = (f"{_fmt(h.get('gain'), 3)} [{_fmt(h.get('lo'), 3)},{_fmt(h.get('hi'), 3)}]"
                  + ("" if h.get("stable", True) else "~"))
            m = r.monitor.get(str(r.best_layer), {}) if r.best_layer is not None else {}
            lines.append(f"{r.trait:<14} {where:<24} {ci:>24} {_fmt((r.control or {}).get('diff'), 3):>8} "
                         f"{_fmt((r.dose or {}).get('slope'), 3):>7} {_fmt(r.choice.get('cliff'), 3):>6} "
                         f"{_fmt(m.get('r'), 3):>10} {'passed' if r.judge_check.get('passed') else 'failed/unchecked'}"
                         + ("" if r.reliable else "  (no reliable steering)"))
        lines.append("judge-free throughout. setting: positions/vector, layer, coefficient chosen on all evaluation "
                     "questions; held-out gain: contrastive log-likelihood change under the setting each question's "
                     "fold did not choose (cross-fitting, 95% bootstrap over questions; ~ = the folds chose "
                     "differently); - random: trait gain minus a random direction's of the same norm; slope: gain per "
                     "unit coefficient below the cliff; cliff: smallest coefficient whose generations are incoherent "
                     "(- = none in the grid); monitor r: last-prompt projection vs the judge-free answer score")
        return "\n".join(lines)


def run_extract_all(model: Model, traits: Sequence[Any], judge: Any, config: ExtractConfig, out_dir: str | Path, *,
                    judge_id: str, progress: bool = True, log: Callable[[str], None] = print,
                    mesh: str | None = None) -> AllTraitsResult:
    """Every trait in one run directory (a run of kind ``extract-all``) ``out_dir/<trait>/``; the steering
    sweep of all traits is one batched computation (``out_dir/steering/``). Writes ``summary.json``/``.txt``
    and a per-trait ``steering.png`` grid in ``out_dir``; each trait's ``config.json`` is in its folder (the
    run's config, recorded by digest in ``run.json``, is not written as a file)."""
    _check_inputs(model, traits, config)
    device_mesh = mesh_option(mesh)
    out = Path(out_dir)
    record = config_record(traits[0].name, model.name, judge_id, config) if traits else {}
    mapping = {"traits": [t.name for t in traits], **{k: v for k, v in record.items() if k != "trait"}}
    with open_run(out, "extract-all", mapping, model=model, seeds={"seed": config.seed}, log=log, progress=progress,
                  write_config=False) as run:
        results = run_extract_many(run, model, traits, judge, config, judge_id=judge_id,
                                   subdirs=[f"{t.name}/" for t in traits], mesh=device_mesh)
        res = AllTraitsResult(results, str(out))
        with run.stage("summary"):
            run.write_json("summary.json", [dataclasses.asdict(r) for r in results], indent=2)
            run.write_text("summary.txt", res.table() + "\n")
            plots.steering_judge_free({r.trait: {"table": r.steering, "choice": r.choice} for r in results},
                                      out / "steering.png", title=f"judge-free steering on {results[0].model} "
                                                                  f"({config.coeff_units} units)")
            run.artifact("steering.png")
    return res
