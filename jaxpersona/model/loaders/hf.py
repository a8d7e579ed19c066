"""Load an HF model directory (``config.json`` + ``*.safetensors``, sharded or not) into params.

The HF -> jaxpersona name map lives here once; the GGUF loader converts GGUF files into HF
directories and comes through this same path.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.model.config import ModelConfig, eos_tuple, from_hf_config, parse_dtype
from jaxpersona.model.params import Params, check_params, param_shapes
from jaxpersona.model.sharding import (KV_WEIGHTS, TENSOR_PARALLEL, kv_source_columns, layout_for_mesh,
                                       param_shardings, per_device_bytes)

# HF per-layer names (after "model.layers.{i}.") -> (our name, transpose?)
_LAYER_MAP: dict[str, tuple[str, bool]] = {
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.o_proj.bias": ("bo", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
    "input_layernorm.weight": ("attn_norm", False),
}
# post_attention_layernorm is the pre-MLP norm in Llama/Qwen, but a sandwich norm in Gemma.
_LLAMA_NORMS = {"post_attention_layernorm.weight": ("mlp_norm", False)}
_GEMMA_NORMS = {
    "post_attention_layernorm.weight": ("post_attn_norm", False),
    "pre_feedforward_layernorm.weight": ("mlp_norm", False),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", False),
}
_LAYER_RE = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def layer_weight_name(key: str, layer: int, prefix: str = "model.") -> str:
    """The HF tensor name of our per-layer weight ``key`` in block ``layer`` (``wq`` ->
    ``model.layers.{layer}.self_attn.q_proj.weight``); ``prefix``: what precedes ``layers.`` (Gemma 3's
    multimodal checkpoints: ``model.language_model.``)."""
    hf = next((n for n, (ours, _) in _LAYER_MAP.items() if ours == key), None)
    if hf is None:
        raise errors.InputError(f"{key!r} is not a per-layer weight shared by every family; "
                                f"choose from {sorted({ours for ours, _ in _LAYER_MAP.values()})}")
    return f"{prefix}layers.{layer}.{hf}"


def parse_layer_weight(cfg: ModelConfig, name: str) -> tuple[str, int, str] | None:
    """``(our key, layer, prefix)`` of an HF per-layer tensor name (any prefix HF uses: ``model.``, Gemma 3's
    ``model.language_model.`` / ``language_model.model.``; ``prefix`` is the part before ``layers.``), or
    None when ``name`` is not a per-layer weight of ``cfg``'s family."""
    m = _LAYER_RE.match(name)
    if not m:
        return None
    got = {**_LAYER_MAP, **(_GEMMA_NORMS if cfg.sandwich_norm else _LLAMA_NORMS)}.get(m.group(2))
    return None if got is None else (got[0], int(m.group(1)), name[: m.start(1) - len("layers.")])


def _strip(name: str) -> str:
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


class WeightPlan(NamedTuple):
    """Where each parameter comes from: ``top[key] = hf name``; ``layers[key] = ([hf name per layer], transpose)``."""

    top: dict[str, str]
    layers: dict[str, tuple[list[str], bool]]


def weight_plan(cfg: ModelConfig, names: list[str]) -> WeightPlan:
    """Map HF tensor names onto the params pytree (refusing unexpected or missing weights)."""
    layer_map = {**_LAYER_MAP, **(_GEMMA_NORMS if cfg.sandwich_norm else _LLAMA_NORMS)}
    per_layer: dict[str, dict[int, str]] = {}
    top: dict[str, str] = {}
    unexpected = []
    for name in names:
        if _IGNORED.search(name):
            continue
        m = _LAYER_RE.match(name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest not in layer_map:
                unexpected.append(name)
                continue
            per_layer.setdefault(layer_map[rest][0], {})[i] = name
            continue
        short = _strip(name)
        key = {"embed_tokens.weight": "embed", "norm.weight": "final_norm", "lm_head.weight": "lm_head"}.get(short)
        if key is None:
            unexpected.append(name)
        elif not (key == "lm_head" and cfg.tie_embeddings):
            top[key] = name
    if unexpected:
        raise errors.ShapeMismatchError(
            f"checkpoint has weights this {cfg.family} config does not use: {unexpected[:8]}"
            " — the config.json does not describe these weights"
        )
    transpose = {ours: t for ours, t in layer_map.values()}
    layers = {}
    for key, by_layer in per_layer.items():
        missing = sorted(set(range(cfg.n_layers)) - set(by_layer))
        if missing or len(by_layer) != cfg.n_layers:
            raise errors.ShapeMismatchError(
                f"{key}: checkpoint has layers {sorted(by_layer)[:4]}... but config says {cfg.n_layers} layers"
                f" (missing {missing[:8]})"
            )
        layers[key] = ([by_layer[i] for i in range(cfg.n_layers)], transpose[key])
    return WeightPlan(top, layers)


def params_from_hf_tensors(
    cfg: ModelConfig, names: list[str], get: Callable[[str], np.ndarray], dtype: Any = jnp.float32
) -> Params:
    """Build the stacked params pytree from HF-named tensors (``get(name) -> [out, in]`` arrays)."""
    plan = weight_plan(cfg, names)

    def cast(a: np.ndarray) -> jnp.ndarray:
        return jnp.asarray(np.asarray(a, dtype=np.float32) if a.dtype != np.float32 else a, dtype=dtype)

    params: Params = {"layers": {}}
    for key, name in plan.top.items():
        a = get(name)
        params[key] = cast(a.T if key == "lm_head" else a)
    for key, (layer_names, transpose) in plan.layers.items():
        arrs = [get(n) for n in layer_names]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise errors.ShapeMismatchError(f"{key}: layers have different shapes {sorted(shapes)}")
        stacked = np.stack([a.T if transpose else a for a in arrs])
        params["layers"][key] = cast(stacked)
    check_params(params, cfg)
    return params


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise errors.CorruptCheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise errors.ModelNotFoundError(
                f"{index.name} lists shards that are not in {path}: {missing} — download every shard"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise errors.ModelNotFoundError(f"no *.safetensors in {path}; expected an HF model directory")
    return files


def read_hf_config(path: str | Path) -> ModelConfig:
    """``config.json`` (+ ``generation_config.json`` stop tokens) of an HF model directory."""
    path = Path(path)
    if not path.is_dir():
        raise errors.ModelNotFoundError(f"{path} is not a directory (expected an HF model directory)")
    if not (path / "config.json").exists():
        raise errors.ModelNotFoundError(f"{path} has no config.json; is this an HF model directory?")
    try:
        cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise errors.CorruptCheckpointError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():  # stop tokens for generation (e.g. Qwen's <|im_end|> and <|endoftext|>)
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise errors.CorruptCheckpointError(f"{gen_cfg} is not valid JSON ({e})") from e
        if eos is not None:
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(sorted({*cfg.eos_token_ids, *eos_tuple(eos)})))
    return cfg


def open_checkpoint(path: Path) -> dict[str, Any]:
    """``{tensor name: safe_open handle}`` over every shard; with an index, every tensor it lists must be in
    the shard it names (CorruptCheckpointError otherwise, before anything is read)."""
    from safetensors import SafetensorError, safe_open

    where: dict[str, Any] = {}
    try:
        for f in _safetensors_files(path):
            h = safe_open(str(f), framework="numpy")
            for name in h.keys():
                where[name] = (h, f.name)
    except SafetensorError as e:
        raise errors.CorruptCheckpointError(
            f"cannot read safetensors in {path}: {e} — the file is truncated or corrupt; re-download it"
        ) from e
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = [f"{n} (index: {f}, found in {where[n][1] if n in where else 'no shard'})"
                 for n, f in weight_map.items() if n not in where or where[n][1] != f]
        if wrong:
            raise errors.CorruptCheckpointError(
                f"{index.name} disagrees with the shard files: {wrong[:5]} — re-download the checkpoint")
    return {n: h for n, (h, _) in where.items()}


def load_hf_dir(path: str | Path, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
    """Read ``config.json`` + safetensors weights from an HF model directory."""
    from safetensors import SafetensorError

    dtype = parse_dtype(dtype)
    path = Path(path)
    cfg = read_hf_config(path)
    where = open_checkpoint(path)
    try:
        params = params_from_hf_tensors(cfg, list(where), lambda n: where[n].get_tensor(n), dtype)
    except SafetensorError as e:
        raise errors.CorruptCheckpointError(
            f"cannot read safetensors in {path}: {e} — the file is truncated or corrupt; re-download it"
        ) from e
    return cfg, params


def _free_bytes(dev: Any) -> int | None:
    """Free memory a device reports (None where it reports no limit, as the CPU)."""
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None


def check_device_memory(shapes: Params, shardings: Params, itemsize: int, mesh: Any) -> None:
    """Refuse (MemoryPlanError) weights whose per-device shards exceed a local device's free memory, before
    any is read. Devices that report no memory limit (the CPU) are not checked."""
    import jax


    need = per_device_bytes(shapes, shardings, itemsize)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    free = _free_bytes(local[0]) if local else None
    if free is not None and need > free:
        raise errors.MemoryPlanError(
            f"the weights need {need / 2**30:.2f} GiB per device but {local[0]} has {free / 2**30:.2f} GiB free; "
            "use a larger model axis, FSDP rules, or check with `jaxpersona plan`")


def load_hf_dir_sharded(path: str | Path, mesh: Any, rules: Any = None, dtype: Any = jnp.float32,
                        read_log: list | None = None) -> tuple[ModelConfig, Params]:
    """Load an HF directory straight into sharded device arrays on ``mesh`` (see :mod:`jaxpersona.model.sharding`).

    Each array is built with ``jax.make_array_from_callback``: a process reads, from the safetensors files,
    only the slices its own devices hold (transposed / stacked over layers on the fly); no host ever holds
    the whole model. Shapes are checked against the config before anything is read. ``read_log`` (for
    tests) collects ``(hf name, slice)`` of every read.

    A model axis larger than the KV heads (a multiple of them) loads the config of
    :func:`jaxpersona.model.sharding.layout_for_mesh`: each KV head repeated ``r = model / kv`` times (read from
    the one stored head), and that config is the one returned."""
    import jax

    dtype = parse_dtype(dtype)
    path = Path(path)
    cfg = read_hf_config(path)
    where = open_checkpoint(path)
    plan = weight_plan(cfg, list(where))
    shapes = param_shapes(cfg)  # the checkpoint's shapes
    rules = rules or TENSOR_PARALLEL
    used, r = layout_for_mesh(cfg, mesh, fsdp=any(k == "embed" and v for k, v in rules))
    shardings = param_shardings(used, mesh, rules)
    np_dtype = np.dtype(jnp.dtype(dtype))
    check_device_memory(param_shapes(used), shardings, np_dtype.itemsize, mesh)

    def hf_shape(name: str) -> tuple[int, ...]:
        return tuple(where[name].get_slice(name).get_shape())

    def read(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        if read_log is not None:
            read_log.append((name, idx))
        return np.asarray(where[name].get_slice(name)[idx], np.float32)

    problems = []
    sources: dict[tuple[str, ...], Any] = {}
    for key in (k for k in shapes if k != "layers"):
        name = plan.top.get(key)
        want = shapes[key][::-1] if key == "lm_head" else shapes[key]
        if name is None:
            problems.append(f"missing {key} (expected shape {shapes[key]})")
        elif hf_shape(name) != tuple(want):
            problems.append(f"{name}: shape {hf_shape(name)}, config implies {tuple(want)}")
        sources[(key,)] = name
    for key, shape in shapes["layers"].items():
        if key not in plan.layers:
            problems.append(f"missing layers.{key} (expected shape {shape})")
            continue
        names, transpose = plan.layers[key]
        want = (shape[2], shape[1]) if transpose else shape[1:]
        bad = [n for n in names if hf_shape(n) != tuple(want)]
        if bad:
            problems.append(f"{bad[0]}: shape {hf_shape(bad[0])}, config implies {tuple(want)}")
        sources[("layers", key)] = (names, transpose)
    extra = sorted(set(plan.layers) - set(shapes["layers"]))
    problems += [f"unexpected weight layers.{k}" for k in extra]
    if problems:
        raise errors.ShapeMismatchError("weights do not match the config (wrong config.json for these weights?):\n  "
                                        + "\n  ".join(problems[:20]))

    def array(kpath: tuple[str, ...], shape: tuple[int, ...], sharding: Any) -> jax.Array:
        src = sources[kpath]
        repeat = r > 1 and kpath[0] == "layers" and kpath[1] in KV_WEIGHTS

        def cb(idx: tuple[slice, ...]) -> np.ndarray:
            if kpath[0] != "layers":
                out = read(src, idx[::-1]).T if kpath[0] == "lm_head" else read(src, idx)
            else:
                names, transpose = src
                rows = range(*idx[0].indices(shape[0]))
                take = None
                if repeat:  # replicated KV heads: read the stored heads' columns these copy, then pick
                    cols = kv_source_columns(cfg, r, *idx[-1].indices(shape[-1])[:2])
                    lo = int(cols.min()) if cols.size else 0
                    idx = (*idx[:-1], slice(lo, lo + (int(cols.max()) + 1 - lo if cols.size else 0)))
                    take = cols - lo
                inner = idx[1:][::-1] if transpose else idx[1:]
                out = np.stack([read(names[l], inner).T if transpose else read(names[l], inner) for l in rows])
                if take is not None:
                    out = out[..., take]
            return out.astype(np_dtype)

        return jax.make_array_from_callback(tuple(shape), sharding, cb)

    used_shapes = param_shapes(used)
    params: Params = {k: array((k,), used_shapes[k], shardings[k]) for k in used_shapes if k != "layers"}
    params["layers"] = {k: array(("layers", k), s, shardings["layers"][k]) for k, s in used_shapes["layers"].items()}
    return used, params


# Files a tokenizer can be built from (besides tokenizer.json, which is enough on its own): each set
# is what one family of slow tokenizers reads (BPE, sentencepiece, WordPiece).
_VOCAB_FILE_SETS: tuple[tuple[str, ...], ...] = (
    ("vocab.json", "merges.txt"),  # byte-level BPE (GPT-2, Qwen2, ...)
    ("tokenizer.model",),  # sentencepiece / tiktoken (Llama, Mistral, Gemma, ...)
    ("spiece.model",),  # sentencepiece (T5-style)
    ("sentencepiece.bpe.model",),  # sentencepiece (XLM-R-style)
    ("vocab.txt",),  # WordPiece
)
_ADD_TOKENIZER = "copy tokenizer.json and tokenizer_config.json from the original model into that directory"


def _check_tokenizer_files(path: Path) -> None:
    """Refuse a directory that has no tokenizer transformers can build (it would fail or fall back to junk)."""
    if (path / "tokenizer.json").is_file():
        return
    if any(all((path / f).is_file() for f in files) for files in _VOCAB_FILE_SETS):
        return
    partial = [files for files in _VOCAB_FILE_SETS if any((path / f).is_file() for f in files)]
    if partial:  # e.g. vocab.json without merges.txt: name exactly what is missing
        missing = [f for files in partial for f in files if not (path / f).is_file()]
        what = f"tokenizer.json, or {' + '.join(missing)} to go with the vocabulary files it has"
    else:
        what = "tokenizer.json (or tokenizer_config.json with tokenizer.model, or vocab.json + merges.txt)"
    raise errors.ModelNotFoundError(f"{path} has no usable tokenizer: missing {what} — {_ADD_TOKENIZER}")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_tokenizer_works(tok: Any, path: Path) -> None:
    """Refuse the one-token fallback transformers builds from a config alone (it would run on garbage)."""
    try:
        size = len(tok)
        ids = list(tok.encode("hello world", add_special_tokens=False))
    except Exception as e:  # noqa: BLE001 - any failure here means the tokenizer is unusable
        raise errors.CorruptCheckpointError(
            f"the tokenizer in {path} cannot encode text ({_one_line(e)}) — {_ADD_TOKENIZER}"
        ) from e
    unk = getattr(tok, "unk_token_id", None)
    if size < 2 or not ids or (len(ids) == 1 and ids[0] == unk):
        raise errors.ModelNotFoundError(
            f"{path} has no usable tokenizer: it loads as a degenerate tokenizer ({size} tokens; 'hello world' -> "
            f"{ids}), so tokenizer.json / the vocabulary files are missing or empty — {_ADD_TOKENIZER}"
        )


def load_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer saved in ``path`` (left padding, for batched generation).

    Raises :class:`~jaxpersona.errors.ModelNotFoundError` naming the missing files when ``path`` has no
    tokenizer (transformers would raise a ValueError or silently build a useless fallback tokenizer),
    and :class:`~jaxpersona.errors.CorruptCheckpointError` when the tokenizer files cannot be read.
    """
    path = Path(path)
    _check_tokenizer_files(path)
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers / tokenizers raise ValueError, OSError, KeyError, bare Exception, ...
        raise errors.CorruptCheckpointError(
            f"cannot load the tokenizer in {path} ({_one_line(e)}) — the tokenizer files are"
            f" incomplete or corrupt; {_ADD_TOKENIZER}"
        ) from e
    _check_tokenizer_works(tok, path)
    tok.padding_side = "left"
    return tok
