"""LoRA fine-tuning: one jitted optax trainer with the prevention shapes as options.

* loss: mean negative log-likelihood of the final assistant message's tokens and, by default
  (``train_eot``), of the end-of-turn token the chat template renders after it (up to and including the
  first end-of-turn / EOS token, tokenized together with the response, as unsloth's
  ``train_on_responses_only`` labels it; so a tuned model learns to stop). Prompt tokens, system prompt and
  earlier turns are context only. The KL term's mask follows ``train_eot`` (the neutral set is tokenized
  the same way); sweeps and the judge-free measures score the response text alone, as before;
* optimiser: AdamW with linear warmup then linear decay to 0, gradient accumulation (``optax.MultiSteps``);
* **preventative steering**: an intervention (``Steer`` toward the trait, or ``Ablate``) active in every
  training forward and absent at inference (Chen et al. 2025: raw response vector, coefficient 5, one
  layer, all positions);
* **inoculation**: a trait-eliciting system prompt added to the training examples only (Tan et al. 2025);
* **KL**: ``beta * KL(base || tuned)`` of the next-token distributions on the response tokens of a neutral
  set, one neutral batch per step (the base model is the same params without the adapter).

Checkpoints (Orbax, every ``save_every`` optimiser updates and at the end) hold the adapter, the optimiser
state, the step, the PRNG key and the data order of the current epoch (a pure function of ``(seed, epoch)``,
checked on resume). A killed run
resumes from its last checkpoint to bit-identical adapters; a checkpoint made with another config, dataset
or model is refused (:class:`~jaxpersona.errors.ResumeMismatchError`). A NaN/inf loss stops training with
:class:`~jaxpersona.errors.TrainingError`, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.adapters import save_adapter
from jaxpersona.artifacts.checkpoint import quiet_absl
from jaxpersona.artifacts.records import KeyedJsonl, digest
from jaxpersona.compute.batching import round_up
from jaxpersona.compute.handle import Model, model_fingerprint
from jaxpersona.compute.progress import progress_bar
from jaxpersona.compute.scoring import encode_targets
from jaxpersona.data.configs import check_positive, check_types, replace_checked
from jaxpersona.data.datasets import Example
from jaxpersona.edit import interventions as iv
from jaxpersona.model.lora import ALL_TARGETS, Adapter, LoraConfig, init_adapter
from jaxpersona.model.params import Params
from jaxpersona.model.transformer import final_hidden, token_kl, token_logprobs

Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One LoRA training run. Defaults train the embedded 135M model on a CPU in minutes; the reference
    7B settings (r 32, alpha 64, rsLoRA, lr 1e-5, one epoch, effective batch 16) are in
    ``configs/regimes_gpu.toml``."""

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = ALL_TARGETS
    lr: float = 3e-4
    warmup_steps: int = 2  # optimiser updates of linear warmup, then linear decay to 0
    weight_decay: float = 0.01
    epochs: int = 2
    batch_size: int = 8
    grad_accum: int = 1  # effective batch = batch_size * grad_accum
    max_len: int = 256  # longer examples (prompt + response tokens) are skipped and counted
    seed: int = 0
    save_every: int = 4  # optimiser updates between checkpoints (the last update is always saved)
    kl_beta: float = 0.0  # weight of KL(base || tuned) on the neutral set (0 = off)
    kl_batch: int = 4
    # the text the chat template renders after the response, up to and including the first end-of-turn /
    # EOS token, is trained too (as unsloth's train_on_responses_only, which persona_vectors uses, labels
    # it); False = the response text's tokens only (the behaviour before this option: a checkpoint that
    # predates it resumes with False). The KL term's mask follows it.
    train_eot: bool = True

    def replace(self, **kw: Any) -> TrainConfig:
        return replace_checked(self, "train", **kw)

    def validate(self) -> None:
        check_types(self, "train")
        check_positive(self, "train", ("rank", "epochs", "batch_size", "grad_accum", "max_len", "kl_batch"))
        if not (self.lr > 0 and self.alpha > 0 and math.isfinite(self.lr)):
            raise errors.InputError(f"train: lr and alpha must be > 0, got lr {self.lr}, alpha {self.alpha}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.weight_decay < 0 or self.kl_beta < 0:
            raise errors.InputError("train: warmup_steps, save_every, weight_decay and kl_beta must be >= 0")
        self.lora.validate()

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(self.rank, self.alpha, self.rslora, tuple(self.targets))


@dataclasses.dataclass
class TrainResult:
    adapter: Adapter
    steps: int  # optimiser updates done
    log: list[dict[str, Any]]  # per update: step, loss, ce, kl, lr
    checkpoints: list[int]  # steps with a saved adapter (out/adapters/step_N)
    skipped: int  # examples longer than max_len / the context
    n_examples: int
    tokens: int  # response tokens trained on per epoch
    train_eot: bool = True  # whether the end-of-turn token was trained (False when resumed from an older run)


# --- data ---------------------------------------------------------------------------------------------
def inoculate(examples: Sequence[Example], system: str) -> list[Example]:
    """Add ``system`` as the system prompt of every example (prefixed to an existing one)."""
    if not system:
        return list(examples)
    out = []
    for prompt, resp in examples:
        if prompt and prompt[0]["role"] == "system":
            prompt = [{"role": "system", "content": system + "\n\n" + prompt[0]["content"]}, *prompt[1:]]
        else:
            prompt = [{"role": "system", "content": system}, *prompt]
        out.append((prompt, resp))
    return out


# End-of-turn tokens of common chat templates, for models whose config lists only the plain EOS.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
                     "</s>", "<eos>", "<\uff5cend\u2581of\u2581sentence\uff5c>")
_PROBE = "JAXPERSONAEOTPROBE"


def end_of_turn_tokens(model: Model) -> tuple[str, ...]:
    """The strings of the tokens that end an assistant turn: the model's EOS ids, the tokenizer's EOS and
    the known end-of-turn tokens (:data:`KNOWN_END_OF_TURN`) that this tokenizer has as special tokens."""
    tok = model.tokenizer
    out = {str(t) for t in tok.convert_ids_to_tokens(list(model.eos_ids)) if t}
    if tok.eos_token:
        out.add(str(tok.eos_token))
    added = {str(getattr(t, "content", t)) for t in getattr(tok, "added_tokens_decoder", {}).values()}
    out |= {t for t in KNOWN_END_OF_TURN if t in added or t in set(getattr(tok, "all_special_tokens", ()))}
    return tuple(sorted(out))


def end_of_turn_text(model: Model, prompt: Sequence[Message], eot: Sequence[str] | None = None) -> str:
    """What the chat template renders after an assistant reply to ``prompt``, up to and including the first
    end-of-turn / EOS token (e.g. ``"<|im_end|>"``, ``"<|eot_id|>"``, ``"<end_of_turn>"``). A template that
    renders none there gets the tokenizer's EOS appended to what it renders (as persona_vectors' text is the
    rendered chat plus ``eos_token``)."""
    text = model.format_chat([*prompt, {"role": "assistant", "content": _PROBE}], add_generation_prompt=False)
    at = text.rfind(_PROBE)
    if at < 0:
        raise errors.ChatTemplateError(
            f"the chat template of {model.name or model.cfg.family!r} does not render an assistant reply's text as "
            "given, so its end-of-turn token cannot be located; train with train_eot = false (--no-train-eot)")
    after = text[at + len(_PROBE):]
    found = [(after.find(t), t) for t in (eot if eot is not None else end_of_turn_tokens(model)) if t in after]
    if found:
        i, t = min(found, key=lambda x: (x[0], -len(x[1])))
        return after[: i + len(t)]
    return after + (model.tokenizer.eos_token or "")


def training_responses(model: Model, examples: Sequence[Example], train_eot: bool = True) -> list[str]:
    """The target text of each example: its response, followed (``train_eot``) by its end-of-turn text
    (:func:`end_of_turn_text`), so that both are tokenized together and the end-of-turn token is trained."""
    if not train_eot:
        return [r for _, r in examples]
    eot = end_of_turn_tokens(model)
    return [r + end_of_turn_text(model, p, eot) if r else r for p, r in examples]


def encode_examples(model: Model, examples: Sequence[Example], max_len: int, rows_multiple: int = 1,
                    train_eot: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """Tokenize examples into one fixed-shape table (see :func:`jaxpersona.compute.scoring.encode_targets`) plus
    ``row_ok [N]``; the targets are each response and (``train_eot``) its end-of-turn token
    (:func:`training_responses`). Examples longer than ``max_len`` tokens or the context are skipped. Returns
    ``(table, n_skipped)``; raises DatasetError when nothing is left."""
    limit = min(max_len, model.cfg.max_position)
    examples = [(p, r) for (p, _), r in zip(examples, training_responses(model, examples, train_eot))]
    ids = model.pair_ids([p for p, _ in examples], [r for _, r in examples])
    keep = [i for i, (p, r) in enumerate(ids) if r and len(p) + len(r) <= limit]
    skipped = len(examples) - len(keep)
    if not keep:
        raise errors.DatasetError(f"all {len(examples)} examples are longer than {limit} tokens (max_len / the "
                                  "context) or have an empty response; raise max_len or shorten the data")
    width = round_up(max(len(ids[i][0]) + len(ids[i][1]) for i in keep), 32)
    r_width = max(len(ids[i][1]) for i in keep)
    enc = encode_targets(model, [examples[i][0] for i in keep], [examples[i][1] for i in keep], width=width,
                         r_width=r_width)
    enc["row_ok"] = np.ones(len(keep), bool)
    return enc, skipped


def _rows(table: dict[str, np.ndarray], idx: np.ndarray, ok: np.ndarray) -> dict[str, jax.Array]:
    out = {k: jnp.asarray(v[idx]) for k, v in table.items()}
    out["row_ok"] = jnp.asarray(table["row_ok"][idx] & ok)
    return out


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of one epoch: a permutation of ``n`` from ``(seed, epoch)`` only."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n))


# --- the loss -------------------------------------------------------------------------------------------
def target_hidden(h: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """The residuals ``[B, R, D]`` at the positions that predict the target tokens."""
    return jnp.take_along_axis(h, batch["pred_idx"][..., None], axis=1)


def _mask(batch: dict[str, jax.Array]) -> jax.Array:
    return (batch["pred_ok"] & batch["row_ok"][:, None]).astype(jnp.float32)


def loss_terms(factors: dict[str, Any], scale: jax.Array, params: Params, cfg: Any, batch: dict[str, jax.Array],
               neutral: dict[str, jax.Array] | None, prevention: Any, kl_beta: float,
               base_adapter: Adapter | None = None) -> tuple[jax.Array, tuple]:
    """``ce + kl_beta * kl`` as a function of the adapter's trainable ``factors = {"a": .., "b": ..}``; ``ce`` = mean NLL over the batch's response tokens under the adapter (and the
    prevention intervention, all positions); ``kl`` = mean over the neutral set's response tokens of
    ``KL(base || tuned)`` (no intervention: the model as it is used). The trained adapter travels beside the
    plain ``params``; ``base_adapter``: the adapter the base model carries, if any (the trained one replaces it)."""
    tuned = Adapter(factors["a"], factors["b"], scale)
    hook = None if prevention is None else iv.at_positions(prevention, iv.Positions.all(batch["valid"]))
    h = final_hidden(params, cfg, batch["tokens"], batch["valid"], hook, adapter=tuned, remat=True)
    lp = token_logprobs(params, cfg, target_hidden(h, batch), batch["pred_tok"])  # [B, R]: no [B, R, V] log-softmax
    m = _mask(batch)
    ce = -(lp * m).sum() / jnp.maximum(m.sum(), 1.0)
    kl = jnp.zeros((), jnp.float32)
    if neutral is not None:
        base = jax.lax.stop_gradient(target_hidden(final_hidden(
            params, cfg, neutral["tokens"], neutral["valid"], adapter=base_adapter), neutral))
        new = target_hidden(final_hidden(params, cfg, neutral["tokens"], neutral["valid"], adapter=tuned, remat=True),
                            neutral)
        per = token_kl(params, cfg, base, new)
        mn = _mask(neutral)
        kl = (per * mn).sum() / jnp.maximum(mn.sum(), 1.0)
    return ce + kl_beta * kl, (ce, kl)


def make_optimizer(config: TrainConfig, updates: int) -> Any:
    import optax

    warm = min(config.warmup_steps, max(updates - 1, 0))
    sched = optax.join_schedules([optax.linear_schedule(0.0, config.lr, max(warm, 1)),
                                  optax.linear_schedule(config.lr, 0.0, max(updates - warm, 1))], [warm])
    if warm == 0:
        sched = optax.linear_schedule(config.lr, 0.0, max(updates, 1))
    tx = optax.adamw(sched, weight_decay=config.weight_decay)
    return (optax.MultiSteps(tx, every_k_schedule=config.grad_accum) if config.grad_accum > 1 else tx), sched


def train_step(tx: Any, scale: jax.Array, cfg: Any, kl_beta: float) -> Any:
    """The jitted optimiser step ``(factors, opt_state, params, base_adapter, batch, nbatch, prev) ->
    (factors, opt_state, loss, ce, kl)``: gradients of :func:`loss_terms` for the adapter factors only, one
    ``tx`` (AdamW) update. ``params`` are an argument, never a closure constant (XLA would constant-fold the
    weights), so the same function is compiled ahead of time from abstract inputs by
    :mod:`jaxpersona.compute.aot`."""
    import optax  # lazy: optax loads only where a training step is built

    @jax.jit
    def step_fn(factors, opt_state, params, base_adapter, batch, nbatch, prev):
        (loss, (ce, kl)), grads = jax.value_and_grad(loss_terms, has_aux=True)(
            factors, scale, params, cfg, batch, nbatch, prev, kl_beta, base_adapter)
        upd, opt_state = tx.update(grads, opt_state, factors)
        return optax.apply_updates(factors, upd), opt_state, loss, ce, kl

    return step_fn


# --- checkpoints -----------------------------------------------------------------------------------------
def _manager(path: Path) -> Any:
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
                                 item_names=("state", "meta"))


def _hook_name(hook: Any) -> str:
    if isinstance(hook, iv.Chain):
        return "Chain(" + ", ".join(_hook_name(h) for h in hook.items) + ")"
    return type(hook).__name__


def config_record(config: TrainConfig) -> dict[str, Any]:
    """``config`` as the dict cache keys digest: ``train_eot`` off is left out, so a key equals the one from
    before the option existed (such runs and what was computed from them still resume)."""
    conf = dataclasses.asdict(config)
    if not conf["train_eot"]:
        del conf["train_eot"]
    return conf


def run_fingerprint(model: Model, config: TrainConfig, examples: Sequence[Example], neutral: Sequence[Example] | None,
                    prevention: Any) -> str:
    """What determines a training run: model, config, data (in order), neutral set, prevention. A config with
    ``train_eot`` off digests as one from before the option existed (so such checkpoints still resume)."""
    prev = None if prevention is None else [_hook_name(prevention)] + [
        np.asarray(x, np.float32).round(6).tolist() for x in jax.tree.leaves(iv.at_positions(
            prevention, iv.Positions.all(np.ones((1, 1), bool))))]
    return digest(model_fingerprint(model), config_record(config), list(examples),
                  list(neutral) if neutral is not None and config.kl_beta > 0 else None, prev)


def recorded_train_eot(ckpt: Path) -> bool | None:
    """The ``train_eot`` the training checkpoint in ``ckpt`` was made with: False when its recorded config
    predates the option, None when there is no checkpoint."""
    import orbax.checkpoint as ocp

    if not ckpt.exists():
        return None
    with quiet_absl(), _manager(ckpt) as mgr:
        last = mgr.latest_step()
        if last is None:
            return None
        meta = mgr.restore(last, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return bool(dict(meta.get("config") or {}).get("train_eot", False))


# --- the trainer ---------------------------------------------------------------------------------------------
def train(model: Model, examples: Sequence[Example], config: TrainConfig, out_dir: str | Path, *,
          neutral: Sequence[Example] | None = None, prevention: Any = None, progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter on ``examples`` (inoculation, if any, already applied by the caller). Writes
    ``out_dir/ckpt`` (Orbax: adapter, optimiser state, step, key), ``out_dir/adapters/step_N`` (adapter
    snapshots) and ``out_dir/log.jsonl``; resumes from the last checkpoint. ``stop_after``: return after
    that many optimiser updates (a kill, for tests)."""
    config.validate()
    if not examples:
        raise errors.DatasetError("no training examples")
    if config.kl_beta > 0 and not neutral:
        raise errors.InputError("kl_beta > 0 needs a neutral dataset (--neutral / the generated neutral set)")
    if prevention is not None:
        iv.check_hook_argument(prevention, "prevention")
        iv.check_for_model(prevention, model.cfg.d_model, model.cfg.n_resid)
    out = Path(out_dir).expanduser().absolute()  # Orbax needs absolute paths
    out.mkdir(parents=True, exist_ok=True)
    if config.train_eot and recorded_train_eot(out / "ckpt") is False:
        config = dataclasses.replace(config, train_eot=False)
        warnings.warn(f"{out / 'ckpt'} was trained without the end-of-turn token (its checkpoint predates "
                      "train_eot, or set it off); resuming it that way", stacklevel=2)
    fp = run_fingerprint(model, config, examples, neutral, prevention)
    table, skipped = encode_examples(model, examples, config.max_len, train_eot=config.train_eot)
    n = len(table["row_ok"])
    ntable = (encode_examples(model, neutral, config.max_len, train_eot=config.train_eot)[0]
              if config.kl_beta > 0 and neutral else None)
    bs = config.batch_size
    per_epoch = -(-n // bs)
    micro_total = per_epoch * config.epochs
    updates = micro_total // config.grad_accum
    if updates < 1:
        raise errors.DatasetError(f"{n} examples at batch {bs} x accumulation {config.grad_accum} give no optimiser "
                                  "update; lower grad_accum or add data")
    micro_total = updates * config.grad_accum
    tx, sched = make_optimizer(config, updates)
    params, cfg, base_adapter = model.params, model.cfg, model.adapter

    init = init_adapter(cfg, config.lora, jax.random.fold_in(jax.random.key(config.seed), 1))
    scale = init.scale  # fixed (alpha / r); only the factors train
    step_fn = train_step(tx, scale, cfg, config.kl_beta)
    factors = {"a": init.a, "b": init.b}
    opt_state = tx.init(factors)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    start = 0
    log = KeyedJsonl(out / "log.jsonl")
    ckpt = out / "ckpt"
    import orbax.checkpoint as ocp

    with quiet_absl(), _manager(ckpt) as mgr:
        last = mgr.latest_step()
        if last is not None:
            meta = mgr.restore(last, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if meta.get("fingerprint") != fp:
                raise errors.ResumeMismatchError(
                    f"{ckpt} holds a training run with another config, dataset, prevention or model "
                    f"(saved {meta.get('config')}); use a fresh output directory or the original settings")
            epoch = (last * config.grad_accum) // per_epoch
            if meta.get("epoch") != epoch or meta.get("order") != epoch_order(config.seed, epoch, n).tolist():
                raise errors.ResumeMismatchError(f"{ckpt}: the recorded data order of epoch {epoch} differs from "
                                                 "this run's (another jax version's PRNG?); use a fresh directory")
            target = {"factors": factors, "opt_state": opt_state, "key": jax.random.key_data(key)}
            got = mgr.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
            factors, opt_state, key = got["factors"], got["opt_state"], jax.random.wrap_key_data(got["key"])
            start = last
        saved = sorted(int(p.name.split("_")[1]) for p in (out / "adapters").glob("step_*")) if (out / "adapters").exists() else []
        bar = progress_bar(updates, "train", progress)
        bar.update(start)
        last_good = start if last is not None else None
        ones = np.ones(bs, bool)
        for u in range(start, updates):
            if stop_after is not None and u >= stop_after:
                break
            totals = np.zeros(3)
            for j in range(config.grad_accum):
                m = u * config.grad_accum + j
                epoch, pos = divmod(m, per_epoch)
                order = epoch_order(config.seed, epoch, n)
                idx = order[pos * bs : pos * bs + bs]
                ok = np.concatenate([ones[: len(idx)], np.zeros(bs - len(idx), bool)])
                idx = np.concatenate([idx, np.full(bs - len(idx), idx[0] if len(idx) else 0)])
                key, sub = jax.random.split(key)
                nb = None
                if ntable is not None:
                    nn = len(ntable["row_ok"])
                    nidx = np.asarray(jax.random.choice(sub, nn, (config.kl_batch,), replace=nn < config.kl_batch))
                    nb = _rows(ntable, nidx, np.ones(config.kl_batch, bool))
                factors, opt_state, loss, ce, kl = step_fn(factors, opt_state, params, base_adapter,
                                                           _rows(table, idx, ok), nb, prevention)
                totals += [float(loss), float(ce), float(kl)]
                if not math.isfinite(float(loss)):
                    raise errors.TrainingError(
                        f"loss became {float(loss)} at optimiser update {u + 1} (micro-step {m + 1}); stopped. "
                        + (f"The last good checkpoint (update {last_good}) is kept in {ckpt}. " if last_good else
                           "No checkpoint was saved yet. ")
                        + "Lower lr, the prevention coefficient or kl_beta")
            step = u + 1
            log.put([{"key": str(step), "step": step, "loss": totals[0] / config.grad_accum,
                      "ce": totals[1] / config.grad_accum, "kl": totals[2] / config.grad_accum,
                      "lr": float(sched(u))}])
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0] / config.grad_accum:.3f}")
            if step == updates or (config.save_every and step % config.save_every == 0):
                save_adapter(out / "adapters" / f"step_{step}", Adapter(factors["a"], factors["b"], scale), cfg,
                             config.lora, {"step": step})
                mgr.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"factors": factors, "opt_state": opt_state,
                                                 "key": jax.random.key_data(key)}),
                    meta=ocp.args.JsonSave({"fingerprint": fp, "config": dataclasses.asdict(config), "step": step,
                                            "epoch": (step * config.grad_accum) // per_epoch,
                                            "order": epoch_order(config.seed, (step * config.grad_accum) // per_epoch,
                                                                 n).tolist()})))
                mgr.wait_until_finished()
                saved.append(step)
                last_good = step
        bar.close()
    done = min(updates, stop_after) if stop_after is not None else updates
    rows = sorted((log[k] for k in (str(s) for s in range(1, done + 1)) if k in log), key=lambda r: r["step"])
    return TrainResult(Adapter(factors["a"], factors["b"], scale), done, rows, sorted(set(saved)), skipped, n,
                       int(table["pred_ok"].sum()), config.train_eot)


