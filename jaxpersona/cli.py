"""``jaxpersona`` command line. Every :class:`~jaxpersona.errors.JaxPersonaError` becomes a one-line
message on stderr and a non-zero exit code (2), never a traceback or a silently wrong number.

    jaxpersona models                                   # registered models and whether installed
    jaxpersona chat "Hi!" --system "You are terse."      # one reply from the default model
    jaxpersona generate --prompts prompts.txt --temperature 0.7 --seed 1
    jaxpersona resid "some text" --layers 0,10,30 --reduce mean --out resid.npy
    jaxpersona convert model.gguf out_dir/               # GGUF -> HF directory (float32 safetensors)
    jaxpersona sweep --config configs/sweep_optimism.toml  # a steering grid, one batched computation
    jaxpersona extract --trait evil                      # the persona-vector pipeline (Chen et al. 2025)
    jaxpersona extract --all-traits                      # every shipped trait, one batched steering sweep
    jaxpersona traits list | show evil | new NAME --description "..."
    jaxpersona vectors show|export|import ...            # Orbax vector banks <-> .pt / control-vector GGUF
    jaxpersona screen --vectors runs/persona_evil/vectors --trait evil --data train.jsonl
    jaxpersona trait-data --trait evil --out data/evil        # trait-eliciting + matched neutral chat JSONL
    jaxpersona finetune --data data/evil/trait.jsonl --out runs/ft   # LoRA (optax, Orbax resume)
    jaxpersona regimes --trait evil                      # prompt vs fine-tune vs BiPO; prevention trainers
    jaxpersona serve --bank runs/persona_evil/vectors    # OpenAI-compatible server, per-request interventions
    jaxpersona report runs/persona_evil                  # a static HTML page of any run directory
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from jaxpersona import errors
from jaxpersona.compute.accelerators import cuda_plugin_installed, libtpu_available, tpu_chips_on_pci
from jaxpersona.model import registry

# What each command calls in the library, as "module:name" (``main`` uses "distributed" for
# --coordinator). Nothing here is imported until that command runs: see :func:`library`.
LIBRARY: dict[str, tuple[str, ...]] = {
    "models": (),
    "chat": ("jaxpersona.compute.handle:load", "jaxpersona.edit.capping:every_token_hook"),
    "generate": ("jaxpersona.compute.handle:load", "jaxpersona.edit.capping:every_token_hook"),
    "resid": ("jaxpersona.compute.handle:load",),
    "convert": ("jaxpersona.model.loaders.gguf:convert_gguf_to_hf_dir",),
    "sweep": ("jaxpersona.pipelines.sweep:run_sweep_config",),
    "extract": ("jaxpersona.compute.handle:load", "jaxpersona.data.traits:list_traits",
                "jaxpersona.data.traits:load_anchors", "jaxpersona.data.traits:load_trait",
                "jaxpersona.measure.judge:build_judge", "jaxpersona.pipelines.persona:load_extract_config",
                "jaxpersona.pipelines.persona:load_run_traits", "jaxpersona.pipelines.persona:run_extract",
                "jaxpersona.pipelines.persona:run_extract_all"),
    "space": ("jaxpersona.compute.handle:load", "jaxpersona.data.roles:load_conversations",
              "jaxpersona.data.roles:load_roles", "jaxpersona.measure.judge:build_judge",
              "jaxpersona.pipelines.space:load_space_config", "jaxpersona.pipelines.space:run_space"),
    "consistency": ("jaxpersona.artifacts.bank:VectorBank", "jaxpersona.artifacts.bank:select_entries",
                    "jaxpersona.compute.handle:load", "jaxpersona.pipelines.consistency:load_consistency_config",
                    "jaxpersona.pipelines.consistency:run_consistency"),
    "capping": ("jaxpersona.edit.capping:CapConfig", "jaxpersona.edit.capping:describe_capping",
                "jaxpersona.edit.capping:import_capping_file"),
    "traits": ("jaxpersona.data.traits:list_traits", "jaxpersona.data.traits:load_trait",
               "jaxpersona.data.traits:draft_trait", "jaxpersona.data.traits:save_trait",
               "jaxpersona.measure.endpoint:OpenAIEndpoint", "jaxpersona.measure.endpoint:LocalCompleter",
               "jaxpersona.compute.handle:load"),
    "vectors": ("jaxpersona.artifacts.bank:VectorBank", "jaxpersona.artifacts.bank:describe_bank",
                "jaxpersona.artifacts.interop:import_pt_into_bank", "jaxpersona.artifacts.interop:export_entry"),
    "screen": ("jaxpersona.artifacts.bank:VectorBank", "jaxpersona.compute.handle:load",
               "jaxpersona.pipelines.screen:screen_dataset", "jaxpersona.artifacts.peft:load_any_adapter"),
    "trait-data": ("jaxpersona.compute.handle:load", "jaxpersona.data.traits:load_trait",
                   "jaxpersona.pipelines.regimes:run_trait_data"),
    "finetune": ("jaxpersona.compute.handle:load", "jaxpersona.data.datasets:read_dataset",
                 "jaxpersona.pipelines.regimes:load_regimes_config", "jaxpersona.pipelines.regimes:prevention_from_bank",
                 "jaxpersona.pipelines.regimes:run_finetune", "jaxpersona.compute.handle:weights_source",
                 "jaxpersona.artifacts.peft:save_peft_adapter", "jaxpersona.artifacts.peft:save_merged"),
    "regimes": ("jaxpersona.compute.handle:load", "jaxpersona.data.traits:load_trait",
                "jaxpersona.pipelines.regimes:load_regimes_config", "jaxpersona.pipelines.regimes:run_regimes"),
    "plan": ("jaxpersona.compute.plan:GIB", "jaxpersona.compute.plan:make_plan", "jaxpersona.compute.aot:dry_run",
             "jaxpersona.compute.aot:DEFAULT_SIZES", "jaxpersona.compute.layout:choose_layout",
             "jaxpersona.compute.accelerators:parse_slice"),
    "serve": ("jaxpersona.serve.app:run_server", "jaxpersona.compute.handle:weights_source",
              "jaxpersona.artifacts.peft:cached_merge"),
    "report": ("jaxpersona.report:write_report",),
    "distributed": ("jaxpersona.model.sharding:init_distributed",),
    "compile-cache": ("jaxpersona.compute.compiling:compile_cache",),
}
# commands that compile nothing (or only print): no compile cache is set up for them
NO_COMPILE = ("models", "capping", "vectors", "plan", "report", "convert")


def library(command: str) -> SimpleNamespace:
    """The library names ``command`` calls (its :data:`LIBRARY` row), imported now, as attributes.

    Looked up on every call (never cached here), so a name patched in its module is the one used."""
    names = {}
    for ref in LIBRARY[command]:
        module, _, name = ref.partition(":")
        # lazy: the command modules pull in jax, transformers, orbax, optax (seconds); `jaxpersona --help`,
        # `jaxpersona models` and argument errors must not pay for them: only the chosen command's modules load
        names[name] = getattr(importlib.import_module(module), name)
    return SimpleNamespace(**names)


def _log(quiet: bool) -> Callable[[str], None]:
    """Where a pipeline's progress lines go: stdout, or nowhere with --quiet."""
    return (lambda _: None) if quiet else print


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=registry.DEFAULT_MODEL,
                   help=f"registered name, HF model directory or .gguf file (default: {registry.DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--matmul-dtype", default=None, choices=("float32", "bfloat16"),
                   help="store and multiply the matmul weights in this dtype, accumulating in --dtype: "
                        "`--matmul-dtype bfloat16` is mixed precision, ~2x faster on CPUs with AMX-BF16 "
                        "(serve: 1.4x; see README, Precision) (default: --dtype)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap", default=None, help="a capping config (capping.json from `jaxpersona space`) applied to "
                                                 "every token")


def _add_judge_args(p: argparse.ArgumentParser, default: str = "self") -> None:
    g = p.add_argument_group(f"judge (default: {'the subject model itself, run locally' if default == 'self' else default})")
    g.add_argument("--judge", default=default,
                   help="'self', a registered name, an HF directory or .gguf file: a local JAX judge"
                        + ("; 'none': no judge" if default == "none" else ""))
    g.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (e.g. https://api.openai.com/v1)")
    g.add_argument("--judge-model", default=None, help="model name at --judge-url (e.g. gpt-4.1-mini)")
    g.add_argument("--judge-key-env", default=None, help="env var holding the API key (never logged; default "
                   "OPENAI_API_KEY, sent when set; a variable named here must be set)")


def _judge_key_env(args: argparse.Namespace) -> str:
    """The judge's key variable, checked before any work: one named with ``--judge-key-env`` must be set (an unset
    default, OPENAI_API_KEY, sends no key: a local endpoint)."""
    if args.judge_key_env is None:
        return "OPENAI_API_KEY"
    if args.judge_url and not os.environ.get(args.judge_key_env):
        raise errors.InputError(f"--judge-key-env {args.judge_key_env}: that environment variable is not set (or is "
                                "empty); set it to the endpoint's API key, or leave the option out to send no key")
    return args.judge_key_env


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank", action="append", default=[], help="a vector bank directory whose entries requests may "
                                                                "name (repeatable)")
    p.add_argument("--preset", action="append", default=[], metavar="NAME=FILE",
                   help="a named intervention preset: a capping config (capping.json from `jaxpersona space`) or a "
                        "JSON list of intervention objects (repeatable)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter requests select per request with \"model\": NAME (vLLM's way; listed in "
                        "/v1/models): a peft directory (adapter_config.json; a Trainer directory uses its highest "
                        "checkpoint-N) or a jaxpersona adapter (adapters/step_N); a bare DIR is named after the "
                        "directory (repeatable; all of them decode in one batch)")
    p.add_argument("--merge-adapter", default=None, metavar="DIR",
                   help="serve the weights with this adapter merged in (every request; the merged copy is kept in "
                        "the cache)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--batch", type=int, default=8, help="rows decoded together (continuous batching)")
    p.add_argument("--max-context", type=int, default=1024, help="KV-cache slots per row (prompt + new tokens)")
    p.add_argument("--max-interventions", type=int, default=4, help="intervention items per request")
    p.add_argument("--max-readout", type=int, default=4, help="persona-readout directions per request")
    p.add_argument("--max-queue", type=int, default=256, help="sequences queued or running before 429s")
    p.add_argument("--prefill-rows", type=int, default=None,
                   help="arrivals prefilled side by side in one call (default min(8, batch)); a lone arrival's calls "
                        "compute one row")
    p.add_argument("--prefill-chunk", type=int, default=16,
                   help="prompts are prefilled in blocks of this many tokens, one block between decode steps (running "
                        "streams keep going); also the prefix cache's block")
    p.add_argument("--attn-block", type=int, default=64,
                   help="attention reads the KV cache in blocks of this many slots, only over the slots in use")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="device memory for cached prompt blocks (shared system prompts); 0 turns it off")
    p.add_argument("--max-mixture", type=int, default=8, help="directions a request's persona mixture may hold")
    p.add_argument("--mesh", default=None, help="DATAxMODEL device mesh, e.g. 1x8: weights loaded tensor parallel "
                                                 "over `model`, batch rows over `data`")
    p.add_argument("--served-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--api-key-env", default=None, help="require `Authorization: Bearer $VAR` (the variable's name)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the common shapes before listening")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds to receive a request body (then 408)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take in all (then 504, or an error chunk when streaming)")
    p.add_argument("--max-connections", type=int, default=512, help="concurrent connections (503 beyond)")
    p.add_argument("--graceful-seconds", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, how long in-flight requests may take to finish")


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise errors.InputError(f"--layers must be comma-separated integers, got {text!r}") from e


# --- commands: each validates its arguments and calls the library with plain values ------------------
def cmd_models(args: argparse.Namespace) -> int:
    for name, m in registry.REGISTRY.items():
        try:
            path = m.locate()
            status = f"installed ({path})"
        except errors.ModelNotFoundError:
            status = f"not installed — {m.install}"
        default = " [default]" if name == registry.DEFAULT_MODEL else ""
        print(f"{name}{default}\n    {m.description}\n    {status}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if not args.message.strip():
        raise errors.InputError("chat: the message is empty")
    lib = library("chat")
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    hook = lib.every_token_hook(args.cap, model.cfg, 1) if args.cap else None
    print(model.chat(args.message, system=args.system, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, hook=hook))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompts and args.prompt:
        raise errors.InputError("pass PROMPT arguments or --prompts FILE, not both")
    if args.prompts:
        path = Path(args.prompts)
        if not path.exists():
            raise errors.InputError(f"prompts file {path} does not exist")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(args.prompt)
    if not prompts:
        raise errors.InputError("no prompts: pass PROMPT arguments or --prompts FILE (one prompt per line)")
    if blank := [i + 1 for i, p in enumerate(prompts) if not p.strip()]:
        raise errors.InputError(f"generate: prompt {blank[0]} of {len(prompts)} is empty")
    lib = library("generate")
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    hook = lib.every_token_hook(args.cap, model.cfg, len(prompts)) if args.cap else None
    texts = model.generate(prompts, chat=not args.raw, system=args.system, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed, hook=hook)
    for p, t in zip(prompts, texts):
        print(json.dumps({"prompt": p, "completion": t}, ensure_ascii=False))
    return 0


def _output_file(out: Path, what: str) -> Path:
    """``out``, checked before the work that produces it: a file path in an existing directory."""
    if out.is_dir() or not out.parent.is_dir():
        raise errors.InputError(f"--out {out}: write {what} in an existing directory")
    return out


def cmd_resid(args: argparse.Namespace) -> int:
    """Residual-stream activations ``[len(layers), ...]`` (per ``--reduce``): saved with ``--out``, else
    one line of shape and mean norm per resid point."""
    out = None
    if args.out:  # checked before any model work; numpy would append .npy, so the path said is the one written
        out = _output_file(Path(args.out if args.out.endswith(".npy") else args.out + ".npy"), "a .npy file")
    model = library("resid").load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    layers = _parse_layers(args.layers) if args.layers else tuple(range(model.cfg.n_resid))
    acts = model.resid(args.text, layers, args.reduce, chat=args.chat, system=args.system)
    if out is not None:
        np.save(out, acts)
        print(f"saved resid {list(acts.shape)} (layers {list(layers)}, reduce={args.reduce}) to {out}")
    else:
        for l, a in zip(layers, acts):
            norms = np.linalg.norm(a.reshape(-1, a.shape[-1]), axis=-1)
            print(f"resid[{l}]: shape {list(a.shape)}  mean norm {norms.mean():.3f}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    src = registry.resolve(args.gguf) if args.gguf in registry.REGISTRY else Path(args.gguf)
    out = library("convert").convert_gguf_to_hf_dir(src, args.out)
    print(f"wrote HF model directory {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    summary = library("sweep").run_sweep_config(args.config, out_dir=args.out, model=args.model,
                                                progress=not args.quiet, mesh=args.mesh)
    print(summary)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    key_env = _judge_key_env(args)
    lib = library("extract")
    config = lib.load_extract_config(args.config, full=args.full)
    if args.all_traits and args.trait:
        raise errors.InputError("pass --trait NAME or --all-traits, not both")
    names = lib.list_traits() if args.all_traits else ([args.trait] if args.trait else lib.load_run_traits(args.config))
    if not names:
        raise errors.InputError("extract needs --trait NAME|FILE, --all-traits, or traits = [...] in the --config file")
    if args.anchors and len(names) > 1:
        raise errors.InputError("--anchors checks one trait's judge; with several traits put anchors in "
                                "jaxpersona/data/trait_data/anchors/ or run the traits one by one")
    traits = [lib.load_trait(n) for n in names]
    anchors = lib.load_anchors(traits[0], args.anchors) if args.anchors else "shipped"
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    judge, judge_id = lib.build_judge(model, args.judge, url=args.judge_url, judge_model=args.judge_model,
                                      key_env=key_env)
    if len(traits) == 1:
        out = Path(args.out or f"runs/persona_{traits[0].name}")
        result = lib.run_extract(model, traits[0], judge, config, out, judge_id=judge_id, anchors=anchors,
                                 progress=not args.quiet, log=_log(args.quiet), mesh=args.mesh)
    else:
        out = Path(args.out or "runs/persona_all")
        result = lib.run_extract_all(model, traits, judge, config, out, judge_id=judge_id, progress=not args.quiet,
                                     log=_log(args.quiet), mesh=args.mesh)
    print(result.table())
    print(f"run directory: {out}")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    key_env = _judge_key_env(args)
    lib = library("space")
    config = lib.load_space_config(args.config, full=args.full)
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    scripts = list(lib.load_conversations(args.conversations))
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    roles = lib.load_roles(args.roles, questions=args.questions, model_name=model.name)
    if args.judge == "none" and not args.judge_url:
        judge, judge_id = None, "none"
    else:
        judge, judge_id = lib.build_judge(model, args.judge, url=args.judge_url, judge_model=args.judge_model,
                                          key_env=key_env)
    out = Path(args.out or "runs/space")
    result = lib.run_space(model, roles, scripts, judge, config, out, judge_id=judge_id, progress=not args.quiet,
                           log=_log(args.quiet))
    print(result.table())
    print(f"run directory: {out}")
    return 0


def cmd_consistency(args: argparse.Namespace) -> int:
    lib = library("consistency")
    config = lib.load_consistency_config(args.config)
    if args.entries and not args.bank:
        raise errors.InputError("--entries names entries of a --bank; pass the bank too")
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    bank = lib.VectorBank.load(args.bank, model.cfg) if args.bank else None
    if bank is not None and args.entries:
        names = [n.strip() for n in args.entries.split(",") if n.strip()]
        missing = [n for n in names if n not in bank]
        if missing:
            raise errors.InputError(f"--entries {missing} not in the bank; it has {list(bank.names)[:12]} ...")
        bank = lib.select_entries(bank, names)
    out = Path(args.out or "runs/consistency")
    summary = lib.run_consistency(model, config, out, bank=bank, space_dir=args.space, progress=not args.quiet,
                                  log=_log(args.quiet))
    print((out / "summary.txt").read_text())
    print(f"run directory: {out}")
    return 0 if summary else 1


def cmd_capping(args: argparse.Namespace) -> int:
    lib = library("capping")
    if args.action == "show":
        print(lib.describe_capping(lib.CapConfig.load(args.file)))
        return 0
    if not args.bank and not args.model_id:
        raise errors.InputError("capping import needs --bank (a `jaxpersona space` bank of this model: gives the "
                                "layer count and the axis to check the sign against) or --model-id with --n-layers")
    if not args.bank and not args.n_layers:
        raise errors.InputError("--model-id needs --n-layers (the model's number of blocks)")
    cap, out = lib.import_capping_file(args.file, args.out or Path(args.file).with_suffix(".json"), bank=args.bank,
                                       model_id=args.model_id, n_resid=None if args.bank else args.n_layers + 1,
                                       experiment=args.experiment)
    print(f"wrote {out}: {len(cap.layers)} caps at resid{list(cap.layers)} (floors on -v, from the reference's "
          "ceilings on v" + (f"; up to {cap.slots} per resid point, applied in config order" if cap.slots > 1 else "")
          + ")")
    if "cos_with_axis" in cap.info:
        print("cos(-v, our axis) per cap: " + ", ".join(f"resid[{l}] {c:.3f}" for l, c in
                                                        zip(cap.layers, cap.info["cos_with_axis"])))
    return 0


def cmd_traits(args: argparse.Namespace) -> int:
    lib = library("traits")
    if args.action == "list":
        for name in lib.list_traits():
            t = lib.load_trait(name)
            print(f"{name}: {t.description} ({len(t.pairs)} pairs, {len(t.questions)} + {len(t.eval_questions)} questions)")
        return 0
    if args.action == "show":
        if not args.name:
            raise errors.InputError("traits show needs a trait name or file")
        print(json.dumps(lib.load_trait(args.name).to_json(), indent=2))
        return 0
    if not args.name or not args.description:
        raise errors.InputError('traits new needs a NAME and --description "..."')
    out = _output_file(Path(args.out or f"{args.name}.json"), "the trait to a file")  # before minutes of drafting
    if args.endpoint:
        if not args.endpoint_model:
            raise errors.InputError("--endpoint needs --endpoint-model")
        completer = lib.OpenAIEndpoint(args.endpoint, args.endpoint_model, api_key_env=args.key_env)
    else:
        completer = lib.LocalCompleter(lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype))
    trait = lib.draft_trait(args.name, args.description, completer, seed=args.seed)
    lib.save_trait(trait, out)
    print(f"wrote {out}: {len(trait.pairs)} pairs, {len(trait.questions)} extraction + "
          f"{len(trait.eval_questions)} evaluation questions (validated; review and edit before use)")
    return 0


def cmd_vectors(args: argparse.Namespace) -> int:
    lib = library("vectors")
    if args.action == "import":
        if not (args.pt and args.trait and args.bank):
            raise errors.InputError("vectors import needs --pt FILE --trait NAME --bank DIR "
                                    "[--format pt|assistant-axis-pt]")
        target = lib.import_pt_into_bank(args.pt, args.trait, args.bank, args.model_id or "unknown", fmt=args.format)
        print(f"saved {args.trait} into {target}")
        return 0
    if not args.bank:
        raise errors.InputError(f"vectors {args.action} needs --bank DIR")
    bank = lib.VectorBank.load(args.bank)
    if args.action == "show":
        print(lib.describe_bank(bank, args.bank))
        return 0
    if not (args.trait and args.out and args.format):
        raise errors.InputError("vectors export needs --trait NAME --format pt|control|assistant-axis|assistant-axis-pt "
                                "--out FILE")
    lib.export_entry(bank, args.trait, args.format, args.out, coeff=args.coeff)
    print(f"wrote {args.out}")
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    lib = library("screen")
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    if args.adapter:  # screen against the fine-tuned model's own answers
        ad, meta = lib.load_any_adapter(args.adapter, model.cfg, log=_log(args.quiet))
        model = model.with_adapter(ad, f"adapter:{Path(args.adapter).name}@{str(meta.get('sha256') or meta['digest'])[:12]}")
    bank = lib.VectorBank.load(args.vectors, model.cfg)
    layer = args.layer
    if layer is None:
        meta = bank.meta_of(args.trait)  # unknown trait -> an error listing the bank's entries
        if "best_layer" not in meta:
            raise errors.InputError(f"no best layer recorded for {args.trait!r} in {args.vectors}; pass --layer")
        if isinstance(meta["best_layer"], bool) or not isinstance(meta["best_layer"], int):
            raise errors.InputError(f"the best layer recorded for {args.trait!r} in {args.vectors} is "
                                    f"{meta['best_layer']!r}, not a resid index; pass --layer")
        layer = int(meta["best_layer"])
    if args.top < 0:
        raise errors.InputError(f"--top must be >= 0, got {args.top}")
    res = lib.screen_dataset(model, bank.get(args.trait), layer, args.data, args.out or "runs/screen",
                             max_new_tokens=args.max_new_tokens, progress=not args.quiet, log=_log(args.quiet))
    print(f"{res['n']} samples, layer {res['layer']}: mean projection difference {res['mean_difference']:+.3f}")
    for r in res["rows"][: args.top]:
        print(f"  #{r['index']:<5} {r['difference']:+8.3f}  {r['prompt'][:60]!r}")
    return 0


def cmd_trait_data(args: argparse.Namespace) -> int:
    lib = library("trait-data")
    trait = lib.load_trait(args.trait)
    qs = list(trait.questions) + (list(trait.eval_questions) if args.with_eval_questions else [])
    if args.n_questions < 0:
        raise errors.InputError(f"--n-questions must be >= 0 (0 = all), got {args.n_questions}")
    qs = qs[: args.n_questions] if args.n_questions else qs
    if args.n_pairs < 1 or not qs:
        raise errors.InputError("--n-pairs must be >= 1 and the trait needs questions")
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    out = Path(args.out)
    counts = lib.run_trait_data(model, trait, qs, args.n_pairs, out, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=1.0, seed=args.seed, batch_size=args.batch_size,
                                progress=not args.quiet, log=_log(args.quiet))
    for name, n in counts.items():
        print(f"{out / f'{name}.jsonl'}: {n} examples")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    lib = library("finetune")
    _, config = lib.load_regimes_config(args.config)
    if args.kl_beta is not None:
        config = config.replace(kl_beta=args.kl_beta)
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    if args.no_train_eot:
        config = config.replace(train_eot=False)
    for flag, target in (("--export-peft", args.export_peft), ("--export-merged", args.export_merged)):
        if target and Path(target).exists() and not Path(target).is_dir():
            raise errors.InputError(f"{flag} {target} exists and is not a directory")
    data = lib.read_dataset(args.data)
    neutral = lib.read_dataset(args.neutral) if args.neutral else None
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    source = lib.weights_source(args.model) if args.export_peft or args.export_merged else None
    prevention, spec = None, None
    if args.prevent_bank:
        spec = {"bank": args.prevent_bank, "entry": args.prevent_entry, "kind": args.prevent_kind,
                "coeff": args.prevent_coeff, "layer": args.prevent_layer, "units": args.prevent_units}
        prevention = lib.prevention_from_bank(model, args.prevent_bank, args.prevent_entry, kind=args.prevent_kind,
                                              coeff=args.prevent_coeff, layer=args.prevent_layer,
                                              units=args.prevent_units)
    settings = {"data": args.data, "neutral": args.neutral, "inoculation": args.inoculation, "prevention": spec}
    res = lib.run_finetune(model, data, config, args.out, neutral=neutral, inoculation=args.inoculation or "",
                           prevention=prevention, settings=settings, progress=not args.quiet, log=_log(args.quiet))
    print(f"{res.steps} updates on {res.n_examples} examples ({res.skipped} skipped as longer than max_len "
          f"{config.max_len}); final loss {res.log[-1]['loss']:.4f}" if res.log else "nothing to do")
    print(f"adapters: {Path(args.out) / 'adapters'} (steps {res.checkpoints}); use Model.with_adapter(load_adapter(...))")
    if source is not None and args.export_peft:
        out = lib.save_peft_adapter(args.export_peft, res.adapter, model.cfg, config.lora, base_name=str(args.model),
                                    base_dir=source.path)
        print(f"peft adapter: {out} (peft.PeftModel.from_pretrained, vLLM --lora-modules)")
    if source is not None and args.export_merged:
        out = lib.save_merged(args.export_merged, source.path, res.adapter, source=source.kind, origin=source.origin,
                              meta={"finetune_run": str(Path(args.out).absolute())}, log=_log(args.quiet))
        print(f"merged model: {out} ({'the HF directory' if source.kind == 'hf' else 'the de-quantised GGUF'} "
              "+ the adapter; transformers loads it as a plain model)")
    return 0


def cmd_regimes(args: argparse.Namespace) -> int:
    lib = library("regimes")
    config, tconfig = lib.load_regimes_config(args.config)
    if args.trait:
        config = config.replace(trait=args.trait)
    if args.trait_b is not None:
        config = config.replace(trait_b="" if args.trait_b == "none" else args.trait_b)
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    adapters: dict[str, str] = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not (sep and name.strip() and path.strip()) or name.strip() in adapters:
            raise errors.InputError(f"--adapter {item!r}: expected NAME=DIR with a new NAME (a peft adapter, a Trainer "
                                    "directory of checkpoint-N, or a jaxpersona adapter)")
        adapters[name.strip()] = path.strip()
    trait = lib.load_trait(config.trait)
    trait_b = lib.load_trait(config.trait_b) if config.trait_b else None
    model = lib.load(args.model, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    out = Path(args.out or f"runs/regimes_{trait.name}")
    lib.run_regimes(model, trait, config, tconfig, out, trait_b=trait_b, adapters=adapters or None,
                    progress=not args.quiet, log=_log(args.quiet))
    print((out / "regimes.txt").read_text())
    print(f"run directory: {out}")
    return 0


def _cpu_platform_unless_accelerated() -> None:
    """Before JAX starts its backends, in a process the CLI runs: with no ``JAX_PLATFORMS`` set, no TPU on the PCI
    bus and no CUDA plugin, JAX runs on the CPU. Otherwise libtpu, when installed (the ``aot`` extra, for
    deviceless TPU compiles), probes the host as JAX starts (~2 s) and prints two warnings and an ``E0000 ...
    INVALID_ARGUMENT`` line, with a source trace, on every command of a machine that has no TPU."""
    if os.environ.get("JAX_PLATFORMS") or not libtpu_available() or cuda_plugin_installed() or tpu_chips_on_pci():
        return
    import jax

    jax.config.update("jax_platforms", "cpu")


def _plan_devices(chips: int) -> None:
    """Before JAX starts its backends: the CPU platform (libtpu, when installed for deviceless TPU compiles, must
    not claim a TPU this command does not use) with ``chips`` devices for CPU-backend estimates of GPU meshes."""
    import jax

    if not os.environ.get("JAX_PLATFORMS") and not cuda_plugin_installed():  # a GPU machine: on its own GPUs
        jax.config.update("jax_platforms", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", max(chips, 1))
        except RuntimeError:  # backends already up (a caller in the same process): its device count stands
            pass


def cmd_plan(args: argparse.Namespace) -> int:
    lib = library("plan")
    if not 0 < args.headroom <= 1:  # NaN fails this too
        raise errors.InputError(f"--headroom is the usable fraction of a device's memory, in (0, 1]; got {args.headroom}")
    if args.stage is None and args.slice is None:
        for flag in ("batch", "seq", "grid"):  # 0 is no size (it fell back to the default without a word)
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise errors.InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        plan = lib.make_plan(args.model, args.mesh, batch=args.batch or 1, seq=args.seq or 2048,
                             new_tokens=args.new_tokens or 0, grid=args.grid or 1, dtype=args.dtype, fsdp=args.fsdp,
                             accelerator=args.accelerator, headroom=args.headroom)
        print(json.dumps(plan.to_json()) if args.json else plan.table())
        if plan.fits is False:
            raise errors.MemoryPlanError(
                f"{plan.total / lib.GIB:.1f} GiB per device exceeds {args.headroom:.0%} of {args.accelerator}'s "
                f"{plan.capacity / lib.GIB:.1f} GiB; try a larger model axis, --fsdp, a smaller --batch/--seq/--grid, "
                "or an accelerator with more memory")
        return 0
    stage = args.stage or "decode"
    if stage not in lib.DEFAULT_SIZES:
        raise errors.InputError(f"unknown stage {stage!r}; stages: {', '.join(lib.DEFAULT_SIZES)}")
    given = {k: getattr(args, k) for k in ("batch", "seq", "context", "new_tokens", "grid", "targets", "rank")
             if getattr(args, k) is not None}
    sizes = dataclasses.replace(lib.DEFAULT_SIZES[stage], **given)
    if args.slice is not None:
        acc, chips = lib.parse_slice(args.slice)
        _plan_devices(chips if acc.platform == "gpu" else 1)
        choice = lib.choose_layout(args.model, stage, args.slice, sizes=sizes, dtype=args.dtype,
                                   headroom=args.headroom, log=None if args.json else print)
        print(json.dumps({**choice.run.to_json(), "skipped": choice.skipped, "command": choice.command(args.model)})
              if args.json else choice.table(args.model))
        return 0
    if args.accelerator is None:
        raise errors.InputError("plan --stage needs --accelerator (the chip whose compiler and specs are used), "
                                "or --slice to choose the layout")
    from jaxpersona.model.sharding import parse_mesh

    data, model = parse_mesh(args.mesh)
    _plan_devices(data * model)
    run = lib.dry_run(args.model, stage, (data, model), args.accelerator, sizes=sizes, dtype=args.dtype,
                      fsdp=args.fsdp)
    print(json.dumps(run.to_json()) if args.json else run.table())
    if not run.fits(args.headroom):
        raise errors.MemoryPlanError(
            f"the compiled {stage} needs {run.total / lib.GIB:.1f} GiB per device, over {args.headroom:.0%} of "
            f"{args.accelerator}'s {run.capacity / lib.GIB:.1f} GiB; let `--slice` choose a layout, or try a larger "
            "model axis, --fsdp or smaller sizes")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise errors.InputError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    lib = library("serve")
    model, served = args.model, args.served_name
    if args.merge_adapter:  # merged into a cached copy of the weights before the server starts
        source = lib.weights_source(args.model)
        model = str(lib.cached_merge(source.path, args.merge_adapter, source=source.kind, origin=source.origin,
                                     log=lambda m: print(m, file=sys.stderr)))
        served = served or f"{args.model}+{Path(args.merge_adapter).name}"
    adapters = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise errors.InputError(f"--adapter {spec!r}: use NAME=DIR (or a bare DIR)")
        adapters.append(f"{name}={path}")
    return int(lib.run_server(
        model, args.dtype, matmul_dtype=args.matmul_dtype, banks=args.bank, presets=args.preset, adapters=adapters,
        served_name=served,
        host=args.host, port=args.port, batch=args.batch, max_context=args.max_context,
        max_interventions=args.max_interventions, max_readout=args.max_readout, max_queue=args.max_queue,
        prefill_rows=args.prefill_rows, mesh=args.mesh, api_key=api_key, warmup=not args.no_warmup,
        access_log=not args.quiet, read_timeout=args.read_timeout, request_timeout=args.request_timeout,
        max_connections=args.max_connections, graceful_seconds=args.graceful_seconds,
        prefill_chunk=args.prefill_chunk, attn_block=args.attn_block, prefix_cache_mb=args.prefix_cache_mb,
        max_mixture=args.max_mixture))


def cmd_report(args: argparse.Namespace) -> int:
    """The HTML page of a run directory: its kind from its ``run.json`` (an older directory gets one written)."""
    out = library("report").write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"report: {out}")
    return 0


# --- the parser: one function per group of subcommands, in the order `--help` lists them -----------------
def _add_model_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Subcommands models, chat, generate, resid: the model itself (``add``: the subparsers' ``add_parser``)."""
    p = add("models", help="list registered models")
    p.set_defaults(func=cmd_models)

    p = add("chat", help="one chat reply")
    p.add_argument("message")
    p.add_argument("--system", default=None)
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = add("generate", help="batched generation, one JSON line per prompt")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--system", default=None)
    p.add_argument("--raw", action="store_true", help="no chat template (base models)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = add("resid", help="capture the residual stream (resid[0]=embeddings, resid[l]=block l-1 out)")
    p.add_argument("text", nargs="+")
    p.add_argument("--layers", default="", help="comma-separated resid indices (default: all 0..L)")
    p.add_argument("--reduce", default="mean", choices=["mean", "last", "tokens"])
    p.add_argument("--chat", action="store_true", help="format each text as a user turn")
    p.add_argument("--system", default=None)
    p.add_argument("--out", help="save as .npy")
    _add_model_args(p)
    p.set_defaults(func=cmd_resid)


def _add_pipeline_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Subcommands sweep, extract, space, consistency: the pipelines (``add``: the subparsers' ``add_parser``)."""
    p = add("sweep", help="run an intervention grid from a TOML config (see configs/)")
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--mesh", default=None, help="DATAxMODEL device mesh, e.g. 8x1: grid points sharded over `data`, "
                                                 "weights tensor parallel over `model` (all processes' devices)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = add("extract", help="persona-vector pipeline: generate, judge, filter, extract, steer, monitor")
    p.add_argument("--trait", default=None, help="shipped trait name (see `traits list`) or a trait JSON file")
    p.add_argument("--all-traits", action="store_true",
                   help="every shipped trait, with one batched steering sweep (traits x layers x coefficients)")
    p.add_argument("--anchors", default=None, help="anchor answers (JSON) to check the judge with (default: the "
                                                   "trait's shipped anchors)")
    p.add_argument("--config", default=None, help="TOML with an [extract] table overriding the preset")
    p.add_argument("--full", action="store_true", help="the paper's sizes (hours on a CPU; for a GPU)")
    p.add_argument("--out", default=None, help="run directory (default runs/persona_TRAIT); reruns resume")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--mesh", default=None, help="DATAxMODEL device mesh for the steering sweep and its random "
                                                 "control (grid points over `data`, weights over `model`)")
    _add_model_args(p)
    _add_judge_args(p)
    p.set_defaults(func=cmd_extract)

    p = add("space", help="persona space + Assistant Axis: role answers, PCA, calibrated capping, drift")
    p.add_argument("--config", default=None, help="TOML with a [space] table overriding the preset")
    p.add_argument("--full", action="store_true", help="the GPU-sized run (every role prompt, 80 questions)")
    p.add_argument("--roles", default=None, help="role directory in the reference layout (default: the shipped set)")
    p.add_argument("--questions", default=None, help="questions JSONL (default: next to the roles, else shipped)")
    p.add_argument("--conversations", default=None, help="conversation scripts (.jsonl) or transcripts (.json / dir)")
    p.add_argument("--out", default=None, help="run directory (default runs/space); reruns resume")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    _add_judge_args(p, default="none")
    p.set_defaults(func=cmd_space)

    p = add("consistency", help="run-to-run variance within vs between personas (seeds vmapped)")
    p.add_argument("--config", default=None, help="TOML with a [consistency] table")
    p.add_argument("--bank", default=None, help="vector bank whose unit vectors are measured too (extract/space)")
    p.add_argument("--entries", default=None, help="comma-separated bank entries to measure (default: all)")
    p.add_argument("--space", default=None, help="a `jaxpersona space` run directory: adds consistency over turns "
                                                 "with and without its capping / KV edit")
    p.add_argument("--out", default=None, help="run directory (default runs/consistency); reruns resume")
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_consistency)


def _add_file_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Subcommands capping, traits, vectors, screen: files of configs, traits and vectors (``add``: the subparsers' ``add_parser``)."""
    p = add("capping", help="show a capping config, or import the reference's capping_config.pt")
    p.add_argument("action", choices=["show", "import"])
    p.add_argument("file", help="capping.json (show) or capping_config.pt (import)")
    p.add_argument("--bank", default=None, help="a `jaxpersona space` bank of the same model (layer count, axis)")
    p.add_argument("--model-id", default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--experiment", default=None, help="experiment id in the .pt (e.g. layers_46:54-p0.25; the first "
                                                       "of a repeated id), or its index")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_capping)

    p = add("traits", help="list / show shipped trait files, or draft a new one")
    p.add_argument("action", choices=["list", "show", "new"])
    p.add_argument("name", nargs="?")
    p.add_argument("--description", default=None)
    p.add_argument("--out", default=None, help="where to write the drafted trait (default NAME.json)")
    p.add_argument("--endpoint", default=None, help="draft with an OpenAI-compatible endpoint instead of a local model")
    p.add_argument("--endpoint-model", default=None)
    p.add_argument("--key-env", default="OPENAI_API_KEY")
    p.add_argument("--seed", type=int, default=0)
    _add_model_args(p)
    p.set_defaults(func=cmd_traits)

    p = add("vectors", help="vector banks (Orbax): show, export (.pt / llama.cpp control GGUF / "
                            "assistant-axis .npy or assistant_axis.pt), import persona_vectors or assistant-axis .pt")
    p.add_argument("action", choices=["show", "export", "import"])
    p.add_argument("--bank", default=None, help="vector bank directory (e.g. runs/persona_evil/vectors)")
    p.add_argument("--trait", default=None)
    p.add_argument("--format", choices=["pt", "control", "assistant-axis", "assistant-axis-pt"], default=None,
                   help="export: pt (persona_vectors [L+1, d]), control (llama.cpp GGUF), assistant-axis (.npy [L, d]), "
                        "assistant-axis-pt (their assistant_axis.pt: {'axis': [L, d], 'metadata'}); import: pt or "
                        "assistant-axis-pt (default: pt, or assistant-axis for a {'axis', ...} file)")
    p.add_argument("--out", default=None)
    p.add_argument("--coeff", type=float, default=1.0, help="scale for control-vector export")
    p.add_argument("--pt", default=None, help="a .pt file to import: persona_vectors [L+1, d], or with --format "
                                              "assistant-axis-pt their assistant_axis.pt ([L, d] or {'axis', ...})")
    p.add_argument("--model-id", default=None, help="model the imported vectors belong to")
    p.set_defaults(func=cmd_vectors)

    p = add("screen", help="rank a chat JSONL dataset by projection difference onto a persona vector")
    p.add_argument("--vectors", required=True, help="vector bank directory")
    p.add_argument("--trait", required=True)
    p.add_argument("--data", required=True, help='JSONL, one {"messages": [...]} per line, last = assistant')
    p.add_argument("--layer", type=int, default=None, help="resid layer (default: the bank's best layer)")
    p.add_argument("--out", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--adapter", default=None, metavar="DIR", help="screen against this fine-tuned model: a peft "
                   "directory (or Trainer directory of checkpoint-N) or a jaxpersona adapter")
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_screen)


def _add_training_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Subcommands trait-data, finetune, regimes: training data, fine-tuning, regimes (``add``: the subparsers' ``add_parser``)."""
    p = add("trait-data", help="trait-eliciting chat JSONL (the model's answers under the trait's "
                               "positive prompts, stored without them) + a matched neutral set")
    p.add_argument("--trait", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n-pairs", type=int, default=2, help="answers per question (one per instruction pair)")
    p.add_argument("--n-questions", type=int, default=0, help="first N questions (0 = all extraction questions)")
    p.add_argument("--with-eval-questions", action="store_true", help="also the trait's evaluation questions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_trait_data)

    p = add("finetune", help="LoRA fine-tuning on a chat JSONL (optax; Orbax checkpoints; reruns resume)")
    p.add_argument("--data", required=True, help='JSONL, one {"messages": [...]} per line, last = assistant')
    p.add_argument("--out", required=True, help="run directory (ckpt/, adapters/step_N, log.jsonl)")
    p.add_argument("--config", default=None, help="TOML with a [train] table (see configs/regimes_*.toml)")
    p.add_argument("--neutral", default=None, help="neutral chat JSONL for the KL penalty")
    p.add_argument("--kl-beta", type=float, default=None, help="weight of KL(base || tuned) on --neutral")
    p.add_argument("--no-train-eot", action="store_true",
                   help="leave the end-of-turn token out of the loss (default: trained, as persona_vectors / "
                        "unsloth's train_on_responses_only do; [train] train_eot = false in --config)")
    p.add_argument("--inoculation", default=None, help="system prompt added to every training example")
    p.add_argument("--prevent-bank", default=None, help="vector bank for preventative steering / ablation")
    p.add_argument("--prevent-entry", default=None)
    p.add_argument("--prevent-kind", choices=["steer", "ablate"], default="steer")
    p.add_argument("--prevent-coeff", type=float, default=5.0)
    p.add_argument("--prevent-layer", type=int, default=-1, help="resid index (-1 = the middle)")
    p.add_argument("--prevent-units", choices=["relative", "absolute"], default="absolute",
                   help="absolute = the raw vector times coeff (the reference); relative = coeff x residual norm")
    p.add_argument("--export-peft", default=None, metavar="DIR", help="also write the final adapter as a peft "
                   "directory (peft.PeftModel.from_pretrained, vLLM --lora-modules)")
    p.add_argument("--export-merged", default=None, metavar="DIR", help="also write the base weights with the final "
                   "adapter merged in, as an HF directory transformers loads")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_finetune)

    p = add("regimes", help="a persona under prompting, fine-tuning (4 trainers) and BiPO steering: "
                            "shifts, cosines, regime grid, composition")
    p.add_argument("--trait", default=None, help="trait to fine-tune on (default: the config's, evil)")
    p.add_argument("--trait-b", default=None, help="second trait for the composition analyses ('none' = skip)")
    p.add_argument("--config", default=None, help="TOML with [regimes] and [train] tables (configs/regimes_gpu.toml)")
    p.add_argument("--out", default=None, help="run directory (default runs/regimes_TRAIT); reruns resume")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter trained elsewhere as a fine-tune regime: a peft directory (a Trainer directory "
                        "uses its highest checkpoint-N) or a jaxpersona adapter (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_regimes)


def _add_tool_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Subcommands plan, serve, report, convert: memory plans, the server, reports, conversion (``add``: the subparsers' ``add_parser``)."""
    p = add("plan", help="per-device memory of a model on a (data x model) mesh, no weights needed; with --stage, "
                         "the stage's real sharded program compiled ahead of time (deviceless for TPU topologies); "
                         "with --slice, the layout chosen for you")
    p.add_argument("--model", required=True, help="HF directory, config.json, registered name or a shipped paper "
                                                  "model (qwen2.5-7b-instruct, llama-3.1-8b-instruct, gemma-2-27b-it, "
                                                  "qwen3-32b, llama-3.3-70b-instruct)")
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL, e.g. 8x8")
    p.add_argument("--stage", default=None, help="compile this stage: prefill, activations, sweep, roles, capped, "
                                                 "train, decode")
    p.add_argument("--slice", default=None, help="choose the layout for this slice: v5e-8, v5e-64, v5p-8 (TensorCores), "
                                                 "8xh100, 8xh200 (with --stage; default stage decode)")
    p.add_argument("--batch", type=int, default=None, help="rows (default 1; with --stage the stage's paper size)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048 / the stage's)")
    p.add_argument("--new-tokens", type=int, default=None, help="extra KV-cache positions for generation")
    p.add_argument("--grid", type=int, default=None, help="sweep grid points (sharded over the data axis)")
    p.add_argument("--context", type=int, default=None, help="--stage: KV-cache slots (capped, decode, prefill)")
    p.add_argument("--targets", type=int, default=None, help="--stage: scored response tokens (sweep, train)")
    p.add_argument("--rank", type=int, default=None, help="--stage train: LoRA rank")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--fsdp", action="store_true", help="also shard every weight's embed dimension over data")
    p.add_argument("--accelerator", default=None, help="h100, h200, a100-80gb, a100-40gb, l4, v4, v5e, v5p, v6e")
    p.add_argument("--headroom", type=float, default=0.9, help="usable share of the device memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = add("serve", help="OpenAI-compatible HTTP server with per-request steer/cap/ablate and a persona "
                          "readout; requests with different interventions share one batch")
    _add_model_args(p)
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = add("report", help="a static HTML report (config, tables, plots, vector bank) of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = add("convert", help="convert a GGUF file (or registered name) to an HF model directory")
    p.add_argument("gguf")
    p.add_argument("out")
    p.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxpersona", description="Persona vectors and interventions in JAX.")
    ap.add_argument("--coordinator", default=None, help="multi-process run: HOST:PORT of process 0 (every process "
                                                        "runs the same command; jax.distributed.initialize)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="keep compiled XLA programs here, so a second run compiles nothing (default: "
                         "$JAXPERSONA_COMPILE_CACHE, else ~/.cache/jaxpersona/xla)")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="compile everything afresh and store nothing (also JAXPERSONA_COMPILE_CACHE=off)")
    sub = ap.add_subparsers(dest="command", required=True)

    _add_model_commands(sub.add_parser)
    _add_pipeline_commands(sub.add_parser)
    _add_file_commands(sub.add_parser)
    _add_training_commands(sub.add_parser)
    _add_tool_commands(sub.add_parser)
    return ap


def _port(text: str) -> int:
    """A TCP port for ``--port`` (argparse rejects anything else before the model loads)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number in 0..65535, got {text!r}")
    return port


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cpu_platform_unless_accelerated()
    try:
        if args.coordinator:
            library("distributed").init_distributed(args.coordinator, args.num_processes, args.process_id)
        if args.no_compile_cache or args.command in NO_COMPILE:
            return args.func(args)
        with library("compile-cache").compile_cache(args.compile_cache):  # restored after the command
            return args.func(args)
    except errors.JaxPersonaError as e:
        print(f"jaxpersona: error: {e}", file=sys.stderr)
        return e.exit_code
    except (OSError, UnicodeDecodeError) as e:  # a path that is a directory, not UTF-8, a missing parent, ...
        if isinstance(e, BrokenPipeError):  # `jaxpersona traits list | head -1`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not fail too
            return 0
        print(f"jaxpersona: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
