"""Run-to-run consistency of personas: is the variance across runs of one persona prompt smaller than
the variance across personas?

``run_consistency(model, config, out_dir, bank=None)``: K seeds x P personas (system prompts from the
shipped traits or roles) x Q shared questions, sampled at each temperature with **the seed axis
vmapped over PRNG keys** (one batched computation per chunk of prompts), then the answers'
response-mean activation at one resid point. For each measure —

* ``activation``: the whole activation vector (variances are traces of covariances, i.e. mean
  squared distances), and
* ``proj:<entry>``: the projection on each unit vector of a vector bank (persona vectors from
  ``extract``, the Assistant Axis / role vectors from ``space``) —

per question: within-persona variance (across seeds, averaged over personas), between-persona
variance (of the persona means), their ratio, and ICC(1) from the one-way ANOVA; aggregated over
questions with a bootstrap interval over questions. The reference finding to test: ratio >= 1.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts import plots
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.records import KeyedJsonl, digest
from jaxpersona.compute.activations import VARIANTS, iter_activations
from jaxpersona.compute.batching import BUCKET, pad_left, round_up
from jaxpersona.compute.drift import VARIANTS as DRIFT_VARIANTS
from jaxpersona.compute.drift import DriftSpec, run_drift
from jaxpersona.compute.generate import GenerateOutput, generate_loop
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.compute.progress import progress_bar
from jaxpersona.compute.scoring import mean_logprobs
from jaxpersona.data.chat import Message, conversation
from jaxpersona.data.configs import (
    check_positive,
    check_types,
    preset_config,
    replace_checked,
    resid_point,
)
from jaxpersona.data.roles import Script, load_conversations, load_roles
from jaxpersona.data.traits import list_traits, load_trait
from jaxpersona.edit.capping import CapConfig
from jaxpersona.edit.directions import bank_resid_norm, unit
from jaxpersona.measure import stats
from jaxpersona.measure.evaluate import answer_trait_scores
from jaxpersona.measure.mixture import compare_mixtures
from jaxpersona.model.transformer import Capture
from jaxpersona.runner.run import Run, open_run


@dataclasses.dataclass(frozen=True)
class ConsistencyConfig:
    """Sizes of a consistency run: personas, questions, seeds (K runs per persona), temperatures, turns, mixtures."""

    personas: str = "traits"  # "traits": each shipped trait's positive prompt; "roles": the first roles of the set
    n_personas: int = 7
    prompt_index: int = 0  # which of each persona's system prompts
    n_questions: int = 8  # shared questions (the role set's)
    seeds: int = 8  # K runs of every (persona, question)
    temperatures: tuple[float, ...] = (0.3, 0.7, 1.0)
    top_p: float = 1.0
    max_new_tokens: int = 24
    layer: int = -1  # resid point of the measures; -1: the middle (resid[L//2 + 1])
    batch_size: int = 16  # prompts per chunk; each chunk runs all K seeds at once (K x batch rows)
    seed: int = 0
    n_boot: int = 2000
    score_traits: str = "evil"  # comma-separated traits whose judge-free score of every answer is a measure too ("" = none)
    # consistency over turns (needs a `jaxpersona space` run: --space DIR)
    turn_scripts: int = 2  # the first n conversation scripts, played under every persona (0 = skip)
    turn_tokens: int = 32
    edit_coeff: float = 0.5
    # persona mixtures (trait personas): the run's persona vectors as a bank, on each trait's held-out questions
    mix_questions: int = 4  # 0 = skip
    mix_alpha: float = 0.15  # fraction of the residual norm (0.5 breaks SmolLM2's text)
    mix_tau: float = 1.0

    @classmethod
    def default(cls) -> ConsistencyConfig:
        return cls()

    def replace(self, **kw: Any) -> ConsistencyConfig:
        return replace_checked(self, "consistency", **kw)

    def validate(self, cfg: Any) -> None:
        check_types(self, "consistency")
        check_positive(self, "consistency", ("n_personas", "n_questions", "max_new_tokens", "batch_size", "n_boot"))
        if self.seeds < 2:
            raise errors.InputError(f"a within-persona variance needs >= 2 seeds, got seeds = {self.seeds}")
        if self.n_personas < 2:
            raise errors.InputError(f"a between-persona variance needs >= 2 personas, got n_personas = {self.n_personas}")
        if self.personas not in ("traits", "roles"):
            raise errors.InputError(f"personas must be 'traits' or 'roles', got {self.personas!r}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise errors.InputError(f"temperatures must be > 0 (sampling), got {self.temperatures}")
        if not 0 < self.top_p <= 1:
            raise errors.InputError(f"top_p must be in (0, 1], got {self.top_p}")
        self.resid(cfg.n_layers)

    def resid(self, n_layers: int) -> int:
        return resid_point(n_layers, self.layer, "layer")


def load_consistency_config(path: str | Path | None) -> ConsistencyConfig:
    return preset_config(path, "consistency", {"default": ConsistencyConfig.default()}, "default",
                         "use a [consistency] table")


# --- the statistics ---------------------------------------------------------------------------------
def variance_components(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per question, from ``x [K, P, Q]`` (scalar measure) or ``[K, P, Q, D]`` (vector measure: squared
    distances summed over D): ``within`` (mean over personas of the across-seed variance),
    ``between`` (variance of the persona means over personas), and ``icc`` = ICC(1) of the one-way
    ANOVA ``(MSB - MSW) / (MSB + (K-1) MSW)`` with ``MSB = K * between``, ``MSW = within``."""
    x = np.asarray(x, np.float64)
    if x.ndim == 3:
        x = x[..., None]
    k, p = x.shape[:2]
    if k < 2 or p < 2:
        raise errors.InputError(f"variance components need >= 2 seeds and >= 2 personas, got {k} and {p}")
    means = x.mean(axis=0)  # [P, Q, D]
    within = (((x - means) ** 2).sum(axis=0) / (k - 1)).sum(-1).mean(axis=0)  # [Q]
    between = (((means - means.mean(axis=0)) ** 2).sum(axis=0) / (p - 1)).sum(-1)  # [Q]
    msb, msw = k * between, within
    icc = (msb - msw) / np.maximum(msb + (k - 1) * msw, 1e-30)
    return {"within": within, "between": between, "icc": icc}


def ratio_with_interval(comp: dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``within / between`` of the question-averaged components, and mean ICC, each with a percentile
    bootstrap interval over questions."""
    w, b, icc = comp["within"], comp["between"], comp["icc"]
    q = len(w)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, q, size=(n_boot, q))
    ratios = w[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-30)
    iccs = icc[idx].mean(1)
    return {"ratio": float(w.mean() / max(b.mean(), 1e-30)), "ratio_lo": float(np.quantile(ratios, 0.025)),
            "ratio_hi": float(np.quantile(ratios, 0.975)), "icc": float(icc.mean()),
            "icc_lo": float(np.quantile(iccs, 0.025)), "icc_hi": float(np.quantile(iccs, 0.975)),
            "within": float(w.mean()), "between": float(b.mean()), "questions": q}


# --- sampling: the seed axis vmapped -----------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id"))
def sample_seeds(params: Any, cfg: Any, tokens: jax.Array, valid: jax.Array, keys: jax.Array, temperature: jax.Array,
                 top_p: jax.Array, *, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int) -> Any:
    """``K`` samples of every prompt row in one computation: :func:`~jaxpersona.compute.generate.generate_loop`
    vmapped over ``keys [K]`` -> tokens/logprobs ``[K, B, N]``, lengths ``[K, B]``."""
    def one(key: jax.Array) -> Any:
        return generate_loop(params, cfg, tokens, valid, key, temperature, top_p, None, max_new_tokens=max_new_tokens,
                             greedy=False, eos_ids=eos_ids, pad_id=pad_id, early_exit=False)

    return jax.vmap(one)(keys)


def personas_of(kind: str, n: int, prompt_index: int) -> list[tuple[str, str]]:
    """``[(name, system prompt)]`` from the shipped traits (positive prompt) or roles."""
    if kind == "traits":
        traits = [load_trait(t) for t in list_traits()[:n]]
        return [(t.name, t.system_prompt("pos", min(prompt_index, len(t.pairs) - 1))) for t in traits]

    roles = load_roles().roles[:n]
    return [(r.name, r.prompts[min(prompt_index, len(r.prompts) - 1)]) for r in roles]


def generate_seeds(model: Model, convs: list[list[dict[str, str]]], config: ConsistencyConfig, temperature: float,
                   store: KeyedJsonl, *, progress: bool = True) -> list[list[str]]:
    """``[K][N]`` answer texts: chunks of ``batch_size`` prompts, each sampled under all K keys at once;
    every finished chunk is stored (resume)."""
    mid = model_fingerprint(model)
    ids = model.chat_ids(convs)
    width = round_up(max(len(x) for x in ids), BUCKET)
    rows = min(config.batch_size, len(convs))
    out: list[list[str]] = [[""] * len(convs) for _ in range(config.seeds)]
    bar = progress_bar(len(convs), f"generate T={temperature:g} x {config.seeds} seeds", progress)
    for c, s in enumerate(range(0, len(convs), rows)):
        part = ids[s: s + rows]
        key = digest("consistency", mid, temperature, config.top_p, config.seed, config.seeds, config.max_new_tokens,
                     part)
        if key not in store:
            seqs = part + [part[-1]] * (rows - len(part))
            batch = pad_left(seqs, model.pad_id, bucket=width)
            model.check_length(batch, config.max_new_tokens)
            base = jax.random.fold_in(jax.random.key(config.seed), c)
            keys = jax.random.split(base, config.seeds)
            res = sample_seeds(model.params, model.cfg, jnp.asarray(batch.tokens), jnp.asarray(batch.valid), keys,
                               jnp.float32(temperature), jnp.float32(config.top_p),
                               max_new_tokens=config.max_new_tokens, eos_ids=model.eos_ids, pad_id=model.pad_id)

            texts = [model.decode(GenerateOutput(res.tokens[k], res.logprobs[k], res.lengths[k]))[: len(part)]
                     for k in range(config.seeds)]
            store.put([{"key": key, "texts": [[t.strip() for t in tk] for tk in texts]}])
        for k, tk in enumerate(store[key]["texts"]):
            out[k][s: s + len(part)] = tk
        bar.update(len(part))
    bar.close()
    return out


def run_consistency(model: Model, config: ConsistencyConfig, out_dir: str | Path, *, bank: Any = None,
                    space_dir: str | Path | None = None, scripts: list[Any] | None = None, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole run (see the module docstring); writes ``summary.json``/``.txt`` and ``answers.jsonl``.
    With ``space_dir`` (a ``jaxpersona space`` run) also consistency over turns (:func:`turn_consistency`),
    each persona's own vector being its mean activation minus the mean over personas (first
    temperature).

    A ``consistency`` run (:func:`~jaxpersona.runner.run.open_run`): one stage per temperature
    (``T=<t>``), then ``turns`` and ``mixtures`` when they run, and ``summary``."""
    cfg = model.cfg
    config.validate(cfg)
    if bank is not None:
        bank.check_model(cfg)
    if space_dir is not None and config.turn_scripts and not (Path(space_dir) / "capping.json").is_file():
        # checked before the temperature stages, not at the turns stage after them
        raise errors.InputError(f"--space {space_dir}: no capping.json there; give a `jaxpersona space` run directory")
    with open_run(out_dir, "consistency", {"model": model.name, **dataclasses.asdict(config)}, model=model,
                  seeds={"seed": config.seed}, log=log, progress=progress) as run:
        personas = personas_of(config.personas, config.n_personas, config.prompt_index)
        if len(personas) < 2:
            raise errors.InputError(f"only {len(personas)} persona(s) available; a between-persona variance needs 2")
        questions = list(load_roles().questions[: config.n_questions])
        layer = config.resid(cfg.n_layers)
        measures = _projections(model, layer, bank, space_dir)
        store = run.records("generations.jsonl")
        results: dict[str, Any] = {}
        answers_out: list[dict[str, Any]] = []
        for temp in config.temperatures:
            res, x, answers = _temperature_stage(run, model, config, personas, questions, temp, layer, store, measures)
            results[f"{temp:g}"] = res
            answers_out += answers
            if temp == config.temperatures[0]:
                pm = x.mean(axis=(0, 2))  # [P, D]
                persona_vecs = pm - pm.mean(axis=0)
        turns = None
        if space_dir is not None and config.turn_scripts:
            turns = _turns_stage(run, model, config, personas, persona_vecs, layer, space_dir, scripts)
        mix = None
        if config.personas == "traits" and config.mix_questions:
            mix = _mixtures_stage(run, model, config, personas, persona_vecs, layer)
        wall = run.wall()
        summary = {"model": model.name, "personas": [n for n, _ in personas], "questions": len(questions),
                   "seeds": config.seeds, "mixtures": mix, "layer": layer,
                   "bank": None if bank is None else list(bank.names), "results": results, "turns": turns,
                   "wall_s": {k: round(v, 1) for k, v in {**wall, "total": run.elapsed()}.items()}}
        with run.stage("summary"):
            run.write_jsonl("answers.jsonl", answers_out)
            run.write_json("summary.json", summary, indent=1)
            run.write_text("summary.txt", _text(summary))
            plots.ratio_by_temperature(results, run.path("ratio.png"),
                                       title=f"{model.name}: within / between persona variance")
    return summary


def _projections(model: Model, layer: int, bank: Any, space_dir: str | Path | None) -> dict[str, np.ndarray]:
    """The unit vectors answers are projected on at ``resid[layer]``: ``{measure name: [D]}`` — each bank
    entry (``proj:<entry>``, unit) and, with a space run that has ``pca.npz``, its first three PCs
    (``proj:space_pc<i>``)."""
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    if bank is not None:
        vec = bank.vectors[:, layer]
        units = vec / np.maximum(np.linalg.norm(vec, axis=-1, keepdims=True), 1e-12)
        out.update({f"proj:{name}": u for name, u in zip(bank.names, units)})
    if space_dir is not None and (Path(space_dir) / "pca.npz").exists():
        comp = _npz_entry(Path(space_dir) / "pca.npz", "components")
        if comp.shape[0] != cfg.n_resid or comp.shape[-1] != cfg.d_model:
            raise errors.ModelMismatchError(f"{space_dir}/pca.npz is from another model ({comp.shape})")
        out.update({f"proj:space_pc{i + 1}": pc for i, pc in enumerate(comp[layer, :3])})
    return out


def _npz_entry(path: Path, name: str) -> np.ndarray:
    """Entry ``name`` of the npz at ``path`` (an :class:`~jaxpersona.errors.InputError` when unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as got:
            return got[name]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise errors.InputError(f"{path} could not be read ({type(e).__name__}: {e}); re-run `jaxpersona space`") from None


def _temperature_stage(run: Run, model: Model, config: ConsistencyConfig, personas: list[tuple[str, str]],
                       questions: list[str], temp: float, layer: int, store: Any, projections: dict[str, np.ndarray]
                       ) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
    """One temperature: K seeds x P personas x Q questions sampled (cached per chunk in ``store``), the
    response-mean activations at ``resid[layer]``, every measure's variance components. Returns the
    temperature's results, the activations ``x [K, P, Q_ok, D]`` and the answers' rows."""
    cfg = model.cfg
    P, Q, K = len(personas), len(questions), config.seeds
    convs = [conversation(q, system) for _, system in personas for q in questions]
    with run.stage(f"T={temp:g}", f"T={temp:g}: {K} seeds x {P} personas x {Q} questions ({K * P * Q} answers), "
                                  "seeds vmapped") as st:
        before = len(store)
        texts = generate_seeds(model, convs, config, temp, store, progress=run.progress)
        st.hit(-(-len(convs) // min(config.batch_size, len(convs))) - (len(store) - before))  # chunks not resampled
        flat_c = [c for _ in range(K) for c in convs]
        flat_t = [t for tk in texts for t in tk]
        live = [i for i, t in enumerate(flat_t) if t]
        acts = np.zeros((len(flat_t), cfg.d_model), np.float32)
        rm = VARIANTS.index("response_mean")
        for idx, a in iter_activations(model, [flat_c[i] for i in live], [flat_t[i] for i in live], config.batch_size):
            acts[np.asarray(live)[idx]] = a[rm, layer]
        # a question counts only where every seed of every persona answered (an empty answer has no mean)
        ok_q = np.asarray([bool(t) for t in flat_t]).reshape(K, P, Q).all(axis=(0, 1))
        if not ok_q.any():
            raise errors.InputError(f"at T={temp:g} every question has an empty answer for some seed and persona; "
                                    "raise max_new_tokens")
        x = acts.reshape(K, P, Q, cfg.d_model)[:, :, ok_q]
        measures = {"activation": x, **{name: x @ u for name, u in projections.items()}}
        for tname in [t.strip() for t in config.score_traits.split(",") if t.strip()]:
            trait = load_trait(tname)
            sc = np.full(len(flat_t), np.nan)
            sc[live] = answer_trait_scores(model, trait, [flat_c[i][-1]["content"] for i in live],
                                           [flat_t[i] for i in live], [min(1, len(trait.pairs) - 1)], config.batch_size)
            measures[f"score:{tname}"] = sc.reshape(K, P, Q)[:, :, ok_q]
        res = {name: ratio_with_interval(variance_components(m), config.n_boot, config.seed)
               for name, m in measures.items()}
    answers = [{"temperature": temp, "seed": k, "persona": pname, "question": q, "answer": texts[k][pi * Q + qi]}
               for k in range(K) for pi, (pname, _) in enumerate(personas) for qi, q in enumerate(questions)]
    return {"measures": res, "questions_dropped": int((~ok_q).sum())}, x, answers


def _turns_stage(run: Run, model: Model, config: ConsistencyConfig, personas: list[tuple[str, str]],
                 persona_vecs: np.ndarray, layer: int, space_dir: str | Path, scripts: list[Any] | None
                 ) -> dict[str, Any]:
    """Consistency over turns (:func:`turn_consistency`), cached in ``turns.jsonl``."""
    scripts = list(scripts if scripts is not None else load_conversations())[: config.turn_scripts]
    key = digest("turns", model_fingerprint(model), config.turn_scripts, config.turn_tokens, config.edit_coeff, layer,
                 str(space_dir), persona_vecs.tobytes().hex()[:64], [dataclasses.asdict(x) for x in scripts])
    def compute() -> dict[str, Any]:
        run.log(f"over turns: {len(personas)} personas x {len(scripts)} scripts (+ the first question again) x 4 "
                "variants")
        return turn_consistency(model, personas, persona_vecs, layer, scripts, space_dir, edit_coeff=config.edit_coeff,
                                max_new_tokens=config.turn_tokens, progress=run.progress)

    with run.stage("turns"):
        rec = run.record("turns.jsonl", key, compute)
    return {k: v for k, v in rec.items() if k not in ("key", "records")}


def _mixtures_stage(run: Run, model: Model, config: ConsistencyConfig, personas: list[tuple[str, str]],
                    persona_vecs: np.ndarray, layer: int) -> dict[str, Any]:
    """Persona mixtures of the trait personas (:func:`~jaxpersona.measure.mixture.compare_mixtures`),
    cached in ``mixtures.jsonl``."""
    key = digest("mixtures", model_fingerprint(model), config.mix_questions, config.mix_alpha, config.mix_tau, layer,
                 config.max_new_tokens, config.seed, persona_vecs.tobytes().hex()[:64])
    def compute() -> dict[str, Any]:
        run.log(f"mixtures: {len(personas)} trait personas, {config.mix_questions} held-out questions each, "
                "4 conditions")
        return compare_mixtures(model, [load_trait(n) for n, _ in personas], persona_vecs, layer,
                                alpha=config.mix_alpha, tau=config.mix_tau, n_questions=config.mix_questions,
                                max_new_tokens=config.max_new_tokens, seed=config.seed, batch_size=config.batch_size)

    with run.stage("mixtures"):
        rec = run.record("mixtures.jsonl", key, compute)
    return {k: v for k, v in rec.items() if k not in ("key", "answers")}


def _text(s: dict[str, Any]) -> str:
    lines = [f"run-to-run consistency: {s['model']}, {len(s['personas'])} personas x {s['questions']} questions x "
             f"{s['seeds']} seeds, response-mean activation at resid[{s['layer']}]",
             "ratio = within-persona variance (across seeds) / between-persona variance (of persona means); "
             ">= 1: runs of one persona differ as much as personas do. ICC(1) from the one-way ANOVA. "
             "95% bootstrap intervals over questions.", ""]
    for temp, r in s["results"].items():
        lines.append(f"T = {temp}" + (f" ({r['questions_dropped']} question(s) dropped: an empty answer)"
                                      if r["questions_dropped"] else ""))
        for name, m in r["measures"].items():
            lines.append(f"  {name:28s} ratio {m['ratio']:.3f} [{m['ratio_lo']:.3f}, {m['ratio_hi']:.3f}]   "
                         f"ICC {m['icc']:.3f} [{m['icc_lo']:.3f}, {m['icc_hi']:.3f}]")
    t = s.get("turns")
    if t:
        lines += ["", f"over turns ({t['rows']} persona x script conversations, the first question asked again at the "
                  f"end; teacher-forced at resid[{t['layer']}] on each persona's own vector; 95% bootstrap intervals):"]
        for name, what in t["what"].items():
            lines.append(f"  {name}: {what}")
            for v, ms in t["variants"].items():
                m = ms[name]
                lines.append(f"    {v:17s} {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}]")
    m = s.get("mixtures")
    if m:
        lines += ["", f"persona mixtures at resid[{m['layer']}] (bank = the run's persona vectors, alpha {m['alpha']} x "
                  f"residual norm, tau {m['tau']}; {m['questions']} held-out trait questions, greedy; 95% bootstrap "
                  "intervals over questions):",
                  "  condition          intended-trait score          log-lik (unsteered)        distinct-2  "
                  "attribution = intended"]
        for c, r in m["conditions"].items():
            ts, ll = r["trait_score"], r["loglik"]
            lines.append(f"  {c:17s} {ts[0]:+.3f} [{ts[1]:+.3f}, {ts[2]:+.3f}]   {ll[0]:+.3f} [{ll[1]:+.3f}, "
                         f"{ll[2]:+.3f}]   {r['distinct2']:.2f}        {r['attribution_agrees']:.0%}")
        for ex in m["examples"]:
            lines.append(f"  example (conditional mix, intended {ex['intended']}): {ex['question']!r} -> "
                         f"{ex['answer'][:100]!r}; attribution {ex['weights']}, unexplained {ex['unexplained']}")
    lines.append("")
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["wall_s"].items()))
    return "\n".join(lines) + "\n"




# --- consistency over turns ----------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_projections(model: Model, conv: list[dict[str, str]], unit_vec: np.ndarray, layer: int) -> list[list[float]]:
    """Teacher-forced (no intervention): per assistant message of ``conv``, the mean projection of each
    of its sentences' tokens at ``resid[layer]`` on ``unit_vec [D]``. ``[[per sentence] per turn]``."""
    text, enc, located = model.content_spans(conv, add_generation_prompt=False)
    spans = []  # (turn, sentence, start, end) over the rendered text
    turn = 0
    for i, role, start, _ in located:
        if role == "assistant":
            off = start
            for si, sent in enumerate(_SENTENCE_END.split(conv[i]["content"])):
                a = text.find(sent, off)
                spans.append((turn, si, a, a + len(sent)))
                off = a + len(sent)
            turn += 1
    batch = pad_left([enc["input_ids"]], model.pad_id, bucket=16)
    h = model.run(batch, capture=Capture((layer,), "tokens"), logits=False).captured
    proj = np.asarray(h[0, 0], np.float32)[-len(enc["input_ids"]):] @ unit_vec
    out: list[list[float]] = [[] for _ in range(turn)]
    for t, _, a, b in spans:
        sel = [i for i, (x, y) in enumerate(enc["offset_mapping"]) if x < b and y > a]
        if sel:
            out[t].append(float(proj[sel].mean()))
    return out


def turn_consistency(model: Model, personas: list[tuple[str, str]], vectors: np.ndarray, layer: int, scripts: list[Any],
                     space_dir: str | Path, *, edit_coeff: float = 0.5, max_new_tokens: int = 32,
                     progress: bool = True) -> dict[str, Any]:
    """Consistency of each persona over a conversation, with and without the persona-space
    interventions (``space_dir``: a ``jaxpersona space`` run: its capping config and axis).

    Every (persona, script) plays the script under the persona's system prompt with the script's
    first question asked again as the last turn; the four drift variants (unsteered, capped,
    assistant-only capped, KV edit toward the Assistant before the last turn) run vmapped. Measures
    per variant, teacher-forced on the produced text at ``resid[layer]`` against the persona's own
    unit vector (``vectors [P, D]``): **prompt-to-line** (mean sentence projection), **line-to-line**
    (mean |difference| between consecutive sentences), **repeated question** (|turn-1 answer's mean
    projection - last answer's| and the change in log-likelihood of the turn-1 answer when asked
    again at the end), each with a bootstrap interval over (persona, script)."""
    cfg = model.cfg
    space = Path(space_dir)
    cap = CapConfig.load(space / "capping.json", cfg)
    bank = VectorBank.load(space / "vectors", cfg)
    axis = unit(bank.get("assistant_axis"))
    norms = bank_resid_norm(bank, "assistant_axis")
    if norms is None:
        raise errors.InputError(f"{space}/vectors lacks residual norms; re-run `jaxpersona space`")
    rows = [(p, s) for p in range(len(personas)) for s in scripts]
    plays = [Script(f"{personas[p][0]}|{s.id}", (*s.turns, s.turns[0]), s.domain, personas[p][1]) for p, s in rows]
    spec = DriftSpec((layer,), axis[[layer]], cap, axis * np.asarray(norms)[:, None], tuple(cap.layers), edit_coeff,
                     max_new_tokens, None)
    recs = run_drift(model, plays, spec, progress=progress)
    units = unit(np.asarray(vectors, np.float32))
    per: dict[str, dict[str, list[float]]] = {v: {"p2l": [], "l2l": [], "repeat_proj": [], "repeat_lp": []} for v in DRIFT_VARIANTS}
    lp_convs, lp_answers, lp_slots = [], [], []
    for v in DRIFT_VARIANTS:
        for (p, s), play in zip(rows, plays):
            rs = sorted((r for r in recs if r["variant"] == v and r["script"] == play.id), key=lambda r: r["turn"])
            conv: list[Message] = [{"role": "system", "content": personas[p][1]}]  # = play.system
            for r in rs:
                conv += [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["answer"] or "."}]
            sents = sentence_projections(model, conv, units[p], layer)
            flat = [x for t in sents for x in t]
            per[v]["p2l"].append(float(np.mean(flat)) if flat else np.nan)
            per[v]["l2l"].append(float(np.mean(np.abs(np.diff(flat)))) if len(flat) > 1 else np.nan)
            first, last = sents[0], sents[-1]
            per[v]["repeat_proj"].append(float(abs(np.mean(first) - np.mean(last))) if first and last else np.nan)
            if rs[0]["answer"]:
                lp_convs += [conv[:2], conv[:-1]]  # the question at turn 1, and asked again at the end
                lp_answers += [rs[0]["answer"]] * 2
                lp_slots.append((v, len(per[v]["repeat_lp"])))
            per[v]["repeat_lp"].append(np.nan)
    if lp_convs:
        lp = mean_logprobs(model, lp_convs, lp_answers).reshape(-1, 2)
        for (v, i), (a, b) in zip(lp_slots, lp):
            per[v]["repeat_lp"][i] = float(b - a)
    out: dict[str, Any] = {"layer": layer, "rows": len(rows), "variants": {}}
    for v, ms in per.items():
        out["variants"][v] = {}
        for name, xs in ms.items():
            mean, lo, hi = stats.bootstrap_ci(xs)
            out["variants"][v][name] = {"mean": mean, "lo": lo, "hi": hi}
    out["what"] = {"p2l": "mean sentence projection on the persona's own unit vector (higher = more in persona)",
                   "l2l": "mean |difference| between consecutive sentences' projections (lower = steadier)",
                   "repeat_proj": "|turn-1 answer projection - the same question's answer at the end| (lower = steadier)",
                   "repeat_lp": "log-lik of the turn-1 answer asked again at the end minus at turn 1 (per token)"}
    out["records"] = recs
    return out
