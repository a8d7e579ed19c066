"""``jaxpersona`` command line. Every :class:`~jaxpersona.errors.JaxPersonaError` becomes a one-line
message on stderr and a non-zero exit code (2), never a traceback or a silently wrong number.

    jaxpersona models                                   # registered models and whether installed
    jaxpersona chat "Hi!" --system "You are terse."      # one reply from the default model
    jaxpersona generate --prompts prompts.txt --temperature 0.7 --seed 1
    jaxpersona resid "some text" --layers 0,10,30 --reduce mean --out resid.npy
    jaxpersona convert model.gguf out_dir/               # GGUF -> HF directory (float32 safetensors)
    jaxpersona sweep --config configs/sweep_optimism.toml  # a steering grid, one batched computation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxpersona import errors, registry


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=registry.DEFAULT_MODEL,
                   help=f"registered name, HF model directory or .gguf file (default: {registry.DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise errors.InputError(f"--layers must be comma-separated integers, got {text!r}") from e


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
    from jaxpersona.model import load

    model = load(args.model, dtype=args.dtype)
    print(model.chat(args.message, system=args.system, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxpersona.model import load

    if args.prompts:
        path = Path(args.prompts)
        if not path.exists():
            raise errors.InputError(f"prompts file {path} does not exist")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(args.prompt)
    if not prompts:
        raise errors.InputError("no prompts: pass PROMPT arguments or --prompts FILE (one prompt per line)")
    model = load(args.model, dtype=args.dtype)
    texts = model.generate(prompts, chat=not args.raw, system=args.system, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for p, t in zip(prompts, texts):
        print(json.dumps({"prompt": p, "completion": t}, ensure_ascii=False))
    return 0


def cmd_resid(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxpersona.model import load

    model = load(args.model, dtype=args.dtype)
    layers = _parse_layers(args.layers) if args.layers else tuple(range(model.cfg.n_resid))
    acts = model.resid(args.text, layers, args.reduce, chat=args.chat, system=args.system)
    if args.out:
        np.save(args.out, acts)
        print(f"saved resid {list(acts.shape)} (layers {list(layers)}, reduce={args.reduce}) to {args.out}")
    else:
        for l, a in zip(layers, acts):
            norms = np.linalg.norm(a.reshape(-1, a.shape[-1]), axis=-1)
            print(f"resid[{l}]: shape {list(a.shape)}  mean norm {norms.mean():.3f}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxpersona.loaders.gguf import convert_gguf_to_hf_dir

    src = registry.resolve(args.gguf) if args.gguf in registry.REGISTRY else Path(args.gguf)
    out = convert_gguf_to_hf_dir(src, args.out)
    print(f"wrote HF model directory {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxpersona.runs import run_sweep_config

    summary = run_sweep_config(args.config, out_dir=args.out, model=args.model, progress=not args.quiet)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxpersona", description="Persona vectors and interventions in JAX.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("chat", help="one chat reply")
    p.add_argument("message")
    p.add_argument("--system", default=None)
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="batched generation, one JSON line per prompt")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--system", default=None)
    p.add_argument("--raw", action="store_true", help="no chat template (base models)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("resid", help="capture the residual stream (resid[0]=embeddings, resid[l]=block l-1 out)")
    p.add_argument("text", nargs="+")
    p.add_argument("--layers", default="", help="comma-separated resid indices (default: all 0..L)")
    p.add_argument("--reduce", default="mean", choices=["mean", "last", "tokens"])
    p.add_argument("--chat", action="store_true", help="format each text as a user turn")
    p.add_argument("--system", default=None)
    p.add_argument("--out", help="save as .npy")
    _add_model_args(p)
    p.set_defaults(func=cmd_resid)

    p = sub.add_parser("sweep", help="run an intervention grid from a TOML config (see configs/)")
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("convert", help="convert a GGUF file (or registered name) to an HF model directory")
    p.add_argument("gguf")
    p.add_argument("out")
    p.set_defaults(func=cmd_convert)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except errors.JaxPersonaError as e:
        print(f"jaxpersona: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
