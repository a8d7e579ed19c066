"""peft LoRA adapters in and out, and merged HF directories: the files the field already has.

peft writes ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``, a torch pickle) with
tensors ``base_model.model.<HF module path>.lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``; the
adapted module computes ``W x + B (A x) · s`` with ``s = α/r`` (``α/√r`` with rsLoRA), ``r`` and ``α`` per
module from ``rank_pattern`` / ``alpha_pattern``. jaxpersona's :class:`~jaxpersona.model.lora.Adapter`
holds ``a = Aᵀ [L, in, r]``, ``b = Bᵀ [L, r, out]`` and ONE scale, so on the way in per-module ranks are
padded with zero columns to the largest and each module's scale ratio ``s_m / s`` is folded into its
``b``; modules peft did not adapt (``layers_to_transform``) get zero factors. Everything is read with
safetensors' NumPy backend: no torch and no peft (a ``.bin`` file alone needs torch).

The HF module paths come from the HF loader's name map
(:func:`~jaxpersona.model.loaders.hf.layer_weight_name` / :func:`~jaxpersona.model.loaders.hf.parse_layer_weight`),
peft's matching rules (``target_modules`` list / full-match regex / ``"all-linear"``, ``layers_to_transform``
with ``layers_pattern``, ``exclude_modules``, and ``(.*\\.)?(key)$`` pattern keys, first match wins) are
transcribed from peft 0.21 (``tuners_utils.check_target_module_exists``, ``utils.other.get_pattern_key``).

* :func:`load_peft_adapter` — a peft directory (or a Trainer output directory: its highest ``checkpoint-N``)
  onto a loaded model; anything plain LoRA cannot represent is an
  :class:`~jaxpersona.errors.AdapterFormatError` naming the field.
* :func:`save_peft_adapter` — the directory ``peft.PeftModel.from_pretrained`` and vLLM load.
* :func:`save_merged` — an HF directory of the base weights plus ``ΔW`` (added in fp32, the sum cast to the base
  dtype, as peft's default ``merge_and_unload``) that ``transformers`` loads as a plain model.
* :func:`load_any_adapter` — either format (peft, or jaxpersona's Orbax
  :func:`~jaxpersona.artifacts.adapters.save_adapter`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.adapters import adapter_digest, load_adapter
from jaxpersona.artifacts.records import digest
from jaxpersona.model import registry
from jaxpersona.model.config import ModelConfig
from jaxpersona.model.loaders.hf import (
    layer_weight_name,
    open_checkpoint,
    parse_layer_weight,
    read_hf_config,
    weight_plan,
)
from jaxpersona.model.lora import (
    ALL_TARGETS,
    TARGETS,
    Adapter,
    AdapterStack,
    LoraConfig,
    check_adapter,
)
from jaxpersona.model.params import param_shapes

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the HF model)
MERGE_MANIFEST = "jaxpersona_merge.json"

# our target -> its module path inside a block and its last name, from the HF loader's map:
# q -> "self_attn.q_proj", "q_proj"
MODULE_PATHS = {t: layer_weight_name(w, 0, "").removeprefix("layers.0.").removesuffix(".weight")
                for t, w in TARGETS.items()}
MODULE_NAMES = {t: p.rsplit(".", 1)[-1] for t, p in MODULE_PATHS.items()}
_TARGET_OF_KEY = {w: t for t, w in TARGETS.items()}

# peft inits whose adapter is relative to REWRITTEN base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA subtract
# B·A·s from W, or quantise it) or that are LoRA variants (MiCA); True / False / gaussian / eva / orthogonal only
# choose the starting factors, which a trained adapter no longer depends on.
PLAIN_INITS = ("true", "false", "gaussian", "eva", "orthogonal")
# non-empty fields that make the adapter more than plain LoRA on linear layers (value: what it is)
_UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude per output row)",
    "modules_to_save": "full copies of whole modules (modules_to_save)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "target_parameters": "LoRA on raw parameters (target_parameters, MoE experts)",
    "trainable_token_indices": "trained embedding rows (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}
# modules of a multimodal checkpoint's vision side: a text-only forward never runs them
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|multi_modal_projector|visual|vision_encoder)(\.|$)")

Log = Callable[[str], None]


# --- peft's matching rules ----------------------------------------------------------------------------
def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` (``rank_pattern`` / ``alpha_pattern``) that matches module name ``module``
    as peft matches it (``re.match(rf"(.*\\.)?({key})$", module)``), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def peft_targets(conf: Mapping[str, Any], module: str) -> bool:
    """Whether peft wraps the module named ``module`` (e.g. ``model.layers.3.self_attn.q_proj``) with LoRA under
    adapter config ``conf``: ``exclude_modules``, then ``target_modules`` as a full-match regex (a string), or
    a list of exact names / ``.name`` suffixes with ``layers_to_transform`` / ``layers_pattern``;
    ``"all-linear"`` is the list of every linear module name below the output layer."""
    exclude = conf.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    targets = conf.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(MODULE_NAMES.values())
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    targets = list(targets or [])
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    indexes = conf.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = conf.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def module_scale(conf: Mapping[str, Any], module: str) -> tuple[int, float, float]:
    """``(r, alpha, scale)`` of one module under ``conf`` (``rank_pattern`` / ``alpha_pattern`` over ``r`` /
    ``lora_alpha``; scale ``alpha/r``, or ``alpha/sqrt(r)`` with ``use_rslora``)."""
    rp, ap = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    rk, ak = pattern_key(rp, module), pattern_key(ap, module)
    r = int(rp[rk]) if rk is not None else int(conf.get("r", 8))
    alpha = float(ap[ak]) if ak is not None else float(conf.get("lora_alpha", 8))
    return r, alpha, alpha / (math.sqrt(r) if conf.get("use_rslora") else r)


# --- reading ------------------------------------------------------------------------------------------
def resolve_adapter_dir(path: str | Path, log: Log = print) -> tuple[Path, str | None]:
    """The peft adapter directory at ``path``: ``path`` itself when it holds ``adapter_config.json``, else (a
    Trainer output directory) its highest ``checkpoint-N`` that holds one (logged). Returns ``(dir, checkpoint
    name or None)``; :class:`~jaxpersona.errors.ModelNotFoundError` when there is none."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise errors.ModelNotFoundError(f"adapter directory {path} does not exist (or is not a directory)")
    if (path / CONFIG_FILE).is_file():
        return path, None
    ckpts = sorted((int(m.group(1)), d) for d in path.iterdir()
                   if d.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", d.name)) and (d / CONFIG_FILE).is_file())
    if ckpts:
        best = ckpts[-1][1]
        log(f"adapter {path}: using {best.name} (the highest of {len(ckpts)} checkpoint-N "
            f"director{'y' if len(ckpts) == 1 else 'ies'})")
        return best, best.name
    named = sorted(d.name for d in path.iterdir() if d.is_dir() and (d / CONFIG_FILE).is_file())
    hint = f"; it has adapters in {named}: pass one of those" if named else ""
    raise errors.ModelNotFoundError(f"{path} has no {CONFIG_FILE} and no checkpoint-N/ directory with one "
                                    f"(not a peft adapter or Trainer output directory){hint}")


def read_peft_config(adapter_dir: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict (:class:`~jaxpersona.errors.AdapterFormatError` if it is not a JSON object)."""
    f = Path(adapter_dir) / CONFIG_FILE
    try:
        conf = json.loads(f.read_text())
    except FileNotFoundError:
        raise errors.ModelNotFoundError(f"{f} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.AdapterFormatError(f"{f} is not JSON ({e}); a peft adapter_config.json is a JSON object") from None
    if not isinstance(conf, dict):
        raise errors.AdapterFormatError(f"{f} holds a {type(conf).__name__}, not a JSON object of LoRA settings")
    return conf


def check_peft_config(conf: Mapping[str, Any], where: str = CONFIG_FILE) -> None:
    """Refuse (:class:`~jaxpersona.errors.AdapterFormatError`, naming the field) a peft config that is more than
    plain LoRA: another ``peft_type``, DoRA, ``modules_to_save``, a bias, an init that rewrites the base weights,
    LoRA variants; and malformed ``r`` / ``lora_alpha`` / patterns."""
    def bad(msg: str) -> errors.AdapterFormatError:
        return errors.AdapterFormatError(f"{where}: {msg}")

    if conf.get("peft_type", "LORA") != "LORA":
        raise bad(f"peft_type {conf.get('peft_type')!r}: only LoRA adapters (peft_type LORA) can be read")
    for field, what in _UNSUPPORTED.items():
        if conf.get(field):
            raise bad(f"{field} = {conf[field]!r}: {what} is not plain LoRA; jaxpersona cannot represent it")
    if conf.get("bias", "none") not in ("none", None):
        raise bad(f"bias = {conf['bias']!r}: the adapter trained the base model's biases; only bias 'none' is "
                  "plain LoRA")
    init = conf.get("init_lora_weights", True)
    if str(init).lower() not in PLAIN_INITS:
        raise bad(f"init_lora_weights = {init!r}: this init rewrites the base weights (or is a LoRA variant), so the "
                  f"adapter does not apply to the plain base model; plain inits: {list(PLAIN_INITS)} (convert a PiSSA/"
                  "OLoRA adapter with peft's path_initial_model_for_weight_conversion)")
    r, alpha = conf.get("r", 8), conf.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad(f"r = {r!r}: the rank must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise bad(f"lora_alpha = {alpha!r}: must be a number")
    for field in ("rank_pattern", "alpha_pattern"):
        pat = conf.get(field) or {}
        if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in pat.values()):
            raise bad(f"{field} = {pat!r}: must map module patterns to numbers")
        for k in pat:
            try:
                re.compile(k)
            except re.error as e:
                raise bad(f"{field} key {k!r} is not a regular expression ({e})") from None
    if any(int(v) < 1 for v in (conf.get("rank_pattern") or {}).values()):
        raise bad("rank_pattern ranks must be positive integers")
    targets = conf.get("target_modules")
    if isinstance(targets, str):
        if conf.get("layers_to_transform") is not None or conf.get("layers_pattern"):
            raise bad("layers_to_transform / layers_pattern cannot be used with a regex target_modules (peft refuses "
                      "this config too)")
        if targets.lower() != "all-linear":
            try:
                re.compile(targets)
            except re.error as e:
                raise bad(f"target_modules {targets!r} is not a regular expression ({e})") from None
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad(f"target_modules = {targets!r}: expected a list of module names, a regex or 'all-linear'")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_peft_tensors(adapter_dir: Path) -> tuple[dict[str, np.ndarray], Path]:
    """Every tensor of the adapter's weights file (``adapter_model.safetensors``, else ``adapter_model.bin`` —
    that one needs torch) as NumPy arrays, and the file. Missing: ModelNotFoundError; unreadable:
    CorruptCheckpointError."""
    st, binf = adapter_dir / SAFETENSORS_FILE, adapter_dir / BIN_FILE
    if st.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(st), framework="numpy") as h:
                return {k: h.get_tensor(k) for k in h.keys()}, st  # noqa: SIM118 - a safe_open handle, not a dict
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise errors.CorruptCheckpointError(
                f"cannot read {st}: {e} — the file is truncated or corrupt; copy it again") from None
    if binf.is_file():
        return _read_bin(binf), binf
    raise errors.ModelNotFoundError(f"{adapter_dir} has {CONFIG_FILE} but no {SAFETENSORS_FILE} (or {BIN_FILE}): "
                                    "the adapter's weights are missing; copy the whole adapter directory")


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    """A torch-pickled state dict (``adapter_model.bin``) as NumPy (needs torch; bf16 read as float32)."""
    try:
        import torch
    except ImportError:
        raise errors.AdapterFormatError(
            f"{path} is a torch pickle and torch is not installed; install torch, or convert it to "
            f"{SAFETENSORS_FILE} (peft: save_pretrained(..., safe_serialization=True))") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a damaged pickle
        raise errors.CorruptCheckpointError(
            f"cannot read {path}: {type(e).__name__}: {e} — truncated or corrupt") from None
    if not isinstance(sd, dict):
        raise errors.AdapterFormatError(f"{path} holds a {type(sd).__name__}, not a state dict of LoRA factors")
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()}


def _key_problem(key: str) -> str:
    """Why a tensor name is not a plain ``<module>.lora_{A,B}.weight`` factor."""
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector (use_dora): jaxpersona cannot represent DoRA"
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        return "an embedding LoRA factor: jaxpersona adapts linear layers only (q k v o gate up down)"
    if re.search(r"\.lora_[AB]\.bias$", key):
        return "a bias on a LoRA factor (lora_bias): not plain LoRA"
    if re.search(r"\.lora_[AB]\.[^.]+\.weight$", key):
        return "a factor that keeps its adapter name (peft strips it on save): re-save it with peft's save_pretrained"
    if "modules_to_save" in key or "lora_" not in key:
        return "a full weight (modules_to_save or a trained bias), not a LoRA factor: not plain LoRA"
    return "not a LoRA factor jaxpersona knows"


def load_peft_adapter(path: str | Path, cfg: ModelConfig, *, log: Log = print) -> tuple[Adapter, dict[str, Any]]:
    """Read a peft LoRA adapter for the model ``cfg`` describes: ``(adapter, meta)``.

    ``path``: a peft directory, or a Trainer output directory (its highest ``checkpoint-N`` is used and named
    in ``log`` and ``meta``). bf16 / fp16 factors are upcast to float32. Per-module ranks / alphas
    (``rank_pattern`` / ``alpha_pattern``) are padded to the largest rank with zero columns and their scale
    ratio folded into ``b``, so ``adapter.scale`` (the config's ``r`` / ``lora_alpha`` scale) is exact for every
    module; modules peft did not adapt get zero factors. The base model is checked by shapes, not by
    ``base_model_name_or_path`` (``unsloth/...`` names the same weights). ``meta``: ``format``, ``source``,
    ``checkpoint``, ``file``, ``sha256``, ``peft_config``, ``base_model_name_or_path``, ``lora`` (rank, alpha,
    rslora, targets of the returned adapter), ``modules`` and ``ignored`` (vision-tower factors of a multimodal
    checkpoint: a text-only forward never runs them).

    Raises: ModelNotFoundError (no such directory / config / weights file), AdapterFormatError (config not
    JSON, DoRA, ``modules_to_save``, biases, embedding LoRA, a non-plain init, an unknown target module, a file
    that disagrees with its config), CorruptCheckpointError (truncated or corrupt file), AdapterMismatchError
    (factors whose shapes do not fit ``cfg``: another base model)."""
    src, ckpt = resolve_adapter_dir(path, log)
    conf = read_peft_config(src)
    check_peft_config(conf, str(src / CONFIG_FILE))
    tensors, wfile = read_peft_tensors(src)
    where = str(wfile)
    base_name = conf.get("base_model_name_or_path")
    shapes = param_shapes(cfg)["layers"]
    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    modules: dict[tuple[str, int], str] = {}
    prefixes: set[str] = set()
    ignored: list[str] = []
    for key, arr in tensors.items():
        body = key.removeprefix(KEY_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", body)
        if m is None:
            if _VISION.search(body):
                ignored.append(key)
                continue
            raise errors.AdapterFormatError(f"{where}: tensor {key!r} is {_key_problem(body)}")
        module, which = m.group(1), m.group(2)
        parsed = parse_layer_weight(cfg, module + ".weight")
        if parsed is None or parsed[0] not in _TARGET_OF_KEY:
            if _VISION.search(module):
                ignored.append(key)
                continue
            what = ("an embedding / output layer" if re.search(r"(embed_tokens|lm_head|wte|embed)$", module)
                    else "a module jaxpersona does not adapt")
            raise errors.AdapterFormatError(
                f"{where}: LoRA on {module!r}, {what}; the {cfg.family} blocks' LoRA targets are "
                f"{sorted(MODULE_PATHS.values())}")
        wkey, layer, prefix = parsed
        t = _TARGET_OF_KEY[wkey]
        if layer >= cfg.n_layers:
            raise errors.AdapterMismatchError(
                f"{where}: {module} is in block {layer} but this {cfg.family} model has {cfg.n_layers} blocks "
                f"(adapter for another base model: {base_name or 'unnamed'})")
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name not in ("bfloat16", "float16"):
            raise errors.AdapterFormatError(f"{where}: {key} has dtype {arr.dtype}; LoRA factors are float")
        prefixes.add(prefix)
        found.setdefault((t, layer), {})[which] = np.asarray(arr, np.float32)
        modules[(t, layer)] = module
    if len(prefixes) > 1:
        raise errors.AdapterFormatError(f"{where}: factors under several model prefixes {sorted(prefixes)}")
    if not found:
        raise errors.AdapterFormatError(f"{where}: no LoRA factors for the {cfg.family} blocks' linear layers "
                                        f"({len(tensors)} tensors, {len(ignored)} ignored as vision-tower modules)")
    prefix = prefixes.pop()
    half = [f"{modules[k]}.lora_{'B' if 'A' in v else 'A'}.weight" for k, v in found.items() if len(v) != 2]
    if half:
        raise errors.AdapterFormatError(f"{where}: a factor is missing for {half[:4]} (a partial or damaged file)")
    # the file against its config: exactly the modules peft would have wrapped
    if conf.get("target_modules") is not None:
        expected = {(t, l) for t in ALL_TARGETS for l in range(cfg.n_layers)
                    if peft_targets(conf, f"{prefix}layers.{l}.{MODULE_PATHS[t]}")}
        missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
        if missing or extra:
            def names(ks: list[tuple[str, int]]) -> list[str]:
                return [f"{prefix}layers.{l}.{MODULE_PATHS[t]}" for t, l in ks[:4]]
            raise errors.AdapterFormatError(
                f"{where}: the file and {CONFIG_FILE} disagree (target_modules {conf.get('target_modules')!r}, "
                f"layers_to_transform {conf.get('layers_to_transform')!r}): "
                + (f"no factors for {names(missing)}{' ...' if len(missing) > 4 else ''} " if missing else "")
                + (f"factors for untargeted {names(extra)}" if extra else "") + " — a partial or mislabelled adapter")
    # per-module rank / alpha, shapes against the model
    rslora = bool(conf.get("use_rslora", False))
    default_r, _, default_scale = module_scale({**conf, "rank_pattern": {}, "alpha_pattern": {}}, "")
    scale = default_scale if default_scale != 0 else 1.0
    per: dict[tuple[str, int], tuple[int, float, float]] = {}
    bad_shapes = []
    for (t, l), f in found.items():
        mod = modules[(t, l)]
        r_m, alpha_m, s_m = module_scale(conf, mod)
        n_layers, d_in, d_out = shapes[TARGETS[t]]
        A, B = f["A"], f["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != d_in or B.shape[0] != d_out:
            bad_shapes.append(f"{mod}: lora_A {A.shape} / lora_B {B.shape}, this model's {MODULE_NAMES[t]} is "
                              f"{d_in} -> {d_out} (lora_A [r, {d_in}], lora_B [{d_out}, r])")
            continue
        if A.shape[0] != r_m or B.shape[1] != r_m:
            raise errors.AdapterFormatError(
                f"{where}: {mod} has rank {A.shape[0]} (lora_A) / {B.shape[1]} (lora_B) but the config gives it "
                f"r = {r_m} (r {default_r}, rank_pattern {conf.get('rank_pattern') or {}})")
        per[(t, l)] = (r_m, alpha_m, s_m)
    if bad_shapes:
        raise errors.AdapterMismatchError(
            f"{where}: the adapter does not fit this {cfg.family} model ({cfg.n_layers} blocks, d_model {cfg.d_model}; "
            f"adapter made for {base_name or 'an unnamed base'}):\n  " + "\n  ".join(bad_shapes[:8]))
    rank = max(r for r, _, _ in per.values())
    targets = [t for t in ALL_TARGETS if any(k[0] == t for k in found)]
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    for t in targets:
        n_layers, d_in, d_out = shapes[TARGETS[t]]
        fa = np.zeros((n_layers, d_in, rank), np.float32)
        fb = np.zeros((n_layers, rank, d_out), np.float32)
        for l in range(n_layers):
            if (t, l) not in found:
                continue
            r_m, _, s_m = per[(t, l)]
            fa[l, :, :r_m] = found[(t, l)]["A"].T
            fb[l, :r_m, :] = found[(t, l)]["B"].T * np.float32(s_m / scale)
        a[t], b[t] = jnp.asarray(fa), jnp.asarray(fb)
    adapter = Adapter(a, b, jnp.asarray(scale, jnp.float32))
    check_adapter(adapter, cfg)
    alpha_eff = scale * (math.sqrt(rank) if rslora else rank)
    meta = {"format": "peft", "source": str(Path(path).expanduser().absolute()), "checkpoint": ckpt,
            "dir": str(src), "file": wfile.name, "sha256": file_sha256(wfile), "peft_config": dict(conf),
            "base_model_name_or_path": base_name,
            "lora": {"rank": rank, "alpha": alpha_eff, "rslora": rslora, "targets": targets, "scale": scale},
            "modules": len(found), "per_module_scales": sorted({round(s, 9) for _, _, s in per.values()}),
            "layers": {t: sorted(l for tt, l in found if tt == t) for t in targets}, "ignored": ignored}
    if ignored:
        log(f"adapter {src}: ignored {len(ignored)} vision-tower LoRA tensors (a text-only forward never runs them)")
    return adapter, meta


def lora_config_of(meta: Mapping[str, Any]) -> LoraConfig:
    """The :class:`~jaxpersona.model.lora.LoraConfig` of an adapter read by :func:`load_peft_adapter` (its
    ``meta["lora"]``): the padded rank, the alpha that gives the adapter's scale, rsLoRA, the targets."""
    lo = meta["lora"]
    return LoraConfig(int(lo["rank"]), float(lo["alpha"]), bool(lo["rslora"]), tuple(lo["targets"]))


def load_any_adapter(path: str | Path, cfg: ModelConfig, *, log: Log = print) -> tuple[Adapter, dict[str, Any]]:
    """An adapter directory of either format: jaxpersona's Orbax (:func:`~jaxpersona.artifacts.adapters.save_adapter`,
    a ``factors`` item) or peft (``adapter_config.json``, or a Trainer directory of ``checkpoint-N``; see
    :func:`load_peft_adapter`). ``meta`` always has ``format``, ``source`` and ``digest``."""
    p = Path(path).expanduser().absolute()
    if not p.is_dir():
        raise errors.ModelNotFoundError(f"adapter directory {p} does not exist (or is not a directory)")
    if (p / "factors").is_dir() and not (p / CONFIG_FILE).is_file():
        ad, info = load_adapter(p, cfg)
        lora = {"rank": ad.rank, "alpha": info.get("alpha"), "rslora": info.get("rslora"),
                "targets": list(ad.targets), "scale": float(ad.scale)}
        return ad, {**info, "format": "orbax", "source": str(p), "digest": adapter_digest(ad), "lora": lora}
    ad, meta = load_peft_adapter(p, cfg, log=log)
    return ad, {**meta, "digest": adapter_digest(ad)}


# --- writing --------------------------------------------------------------------------------------------
def _save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file, written under a temporary name and renamed into place."""
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _nice(x: float) -> float | int:
    """``x`` as an int when it is one to 1e-6 (alpha 64.00000001 -> 64)."""
    r = round(x)
    return int(r) if abs(x - r) <= 1e-6 * max(1.0, abs(x)) else x


def _module_prefix(cfg: ModelConfig, base_dir: str | Path | None) -> str:
    """What precedes ``layers.`` in the base checkpoint's names (``model.``; Gemma 3 multimodal:
    ``model.language_model.`` or ``language_model.model.``)."""
    if base_dir is None:
        return "model."
    names = list(open_checkpoint(Path(base_dir)))
    plan = weight_plan(cfg, names)
    parsed = parse_layer_weight(cfg, plan.layers["wq"][0][0])
    return parsed[2] if parsed is not None else "model."


def save_peft_adapter(out_dir: str | Path, adapter: Adapter, cfg: ModelConfig, lcfg: LoraConfig | None = None, *,
                      base_name: str = "", base_dir: str | Path | None = None, dtype: Any = np.float32) -> Path:
    """Write ``adapter`` as a peft LoRA directory that ``peft.PeftModel.from_pretrained`` loads on the HF model
    (same logits) and vLLM serves: ``adapter_config.json`` (``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``,
    ``lora_alpha``, ``use_rslora``, ``target_modules``, ``base_model_name_or_path``; no ``modules_to_save``,
    DoRA, bias or rank/alpha patterns) and ``adapter_model.safetensors`` with
    ``base_model.model.<HF module path>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]`` (no adapter name),
    every block of every target (zero factors stay zero). ``lcfg``: rsLoRA and alpha (default: plain LoRA with
    ``alpha = scale · r``; the written alpha always reproduces ``adapter.scale``). ``base_dir``: the base's HF
    directory, to take its module prefix (Gemma 3 multimodal checkpoints). ``dtype``: of the factors
    (float32; bfloat16 / float16 halve the file)."""
    if isinstance(adapter, AdapterStack) or not isinstance(adapter, Adapter):
        raise errors.InputError(f"save_peft_adapter writes one Adapter, got {type(adapter).__name__}")
    check_adapter(adapter, cfg)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise errors.InputError(f"{out} exists and is not a directory; choose a directory for the peft adapter")
    rank, scale = adapter.rank, float(adapter.scale)
    rslora = bool(lcfg.rslora) if lcfg is not None else False
    if lcfg is not None and lcfg.rank == rank and math.isclose(lcfg.scale, scale, rel_tol=1e-6):
        alpha: float | int = _nice(lcfg.alpha)
    else:
        alpha = _nice(scale * (math.sqrt(rank) if rslora else rank))
    np_dtype = np.dtype(jnp.dtype(dtype))
    prefix = _module_prefix(cfg, base_dir)
    tensors: dict[str, np.ndarray] = {}
    for t in adapter.targets:
        fa, fb = np.asarray(adapter.a[t], np.float32), np.asarray(adapter.b[t], np.float32)
        for l in range(cfg.n_layers):
            mod = KEY_PREFIX + layer_weight_name(TARGETS[t], l, prefix).removesuffix(".weight")
            tensors[f"{mod}.lora_A.weight"] = fa[l].T.astype(np_dtype)
            tensors[f"{mod}.lora_B.weight"] = fb[l].T.astype(np_dtype)
    names = [MODULE_NAMES[t] for t in adapter.targets]
    if prefix == "model.":
        targets: list[str] | str = names
    else:  # a multimodal checkpoint: only the language model's blocks (a bare name would match the vision tower too)
        targets = rf"{re.escape(prefix)}layers\.\d+\.({'|'.join(re.escape(MODULE_PATHS[t]) for t in adapter.targets)})"
    conf: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or None,
        "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
        "lora_bias": False, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "revision": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / SAFETENSORS_FILE, tensors, {"format": "pt"})
    tmp = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(conf, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def weights_digest(base_dir: str | Path) -> dict[str, Any]:
    """``{"files": {name: sha256}, "digest": sha256 of them}`` over an HF directory's ``*.safetensors``."""
    files = {f.name: file_sha256(f) for f in sorted(Path(base_dir).glob("*.safetensors"))}
    return {"files": files, "digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}


def save_merged(out_dir: str | Path, base_dir: str | Path, adapter: Adapter, *, source: str = "hf",
                origin: str | Path | None = None, meta: Mapping[str, Any] | None = None, log: Log = print) -> Path:
    """An HF directory of the base model with ``adapter`` merged in, that ``transformers`` loads as a plain model.

    ``base_dir``: the HF directory the weights were loaded from (``source="hf"``), or the float32 directory a GGUF
    was de-quantised into (``source="gguf"``, ``origin`` = the ``.gguf``; see
    :func:`~jaxpersona.compute.handle.weights_source`). Per target weight ``W [out, in]`` the update
    ``ΔW = (a @ b)ᵀ · scale`` is computed in fp32 and added to ``W`` in fp32, the sum cast to ``W``'s dtype: what
    peft's ``merge_and_unload()`` gives with its default fp32 adapter weights (bit for bit on a bf16 base);
    every other tensor, ``config.json``, the tokenizer files and the shard layout are copied unchanged.
    ``jaxpersona_merge.json`` records the base (path, ``source``, ``origin``, digest of its safetensors), the
    adapter (digest, rank, scale, targets, ``meta``) and the rule. Written under a temporary name and moved into
    place (an existing ``out_dir`` is replaced)."""
    from safetensors import safe_open

    base = Path(base_dir).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    if source not in ("hf", "gguf"):
        raise errors.InputError(f"save_merged: source must be 'hf' or 'gguf', got {source!r}")
    if out == base:
        raise errors.InputError(f"save_merged would overwrite the base model {base}; choose another directory")
    if isinstance(adapter, AdapterStack) or not isinstance(adapter, Adapter):
        raise errors.InputError(f"save_merged merges one Adapter, got {type(adapter).__name__}")
    cfg = read_hf_config(base)
    check_adapter(adapter, cfg)
    plan = weight_plan(cfg, list(open_checkpoint(base)))  # validates the shards before anything is written
    delta_of = {name: (t, l, plan.layers[TARGETS[t]][1]) for t in adapter.targets
                for l, name in enumerate(plan.layers[TARGETS[t]][0])}
    scale = np.float32(adapter.scale)
    a = {t: np.asarray(x, np.float32) for t, x in adapter.a.items()}
    b = {t: np.asarray(x, np.float32) for t, x in adapter.b.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    dtypes: set[str] = set()
    try:
        for f in sorted(base.glob("*.safetensors")):
            tensors = {}
            with safe_open(str(f), framework="numpy") as h:
                file_meta = h.metadata() or {"format": "pt"}
                for name in h.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                    w = h.get_tensor(name)
                    if name in delta_of:
                        t, l, transpose = delta_of[name]
                        d = (a[t][l] @ b[t][l]) * scale  # [in, out], fp32
                        d = d.T if transpose else d
                        w = (w.astype(np.float32) + d).astype(w.dtype)
                        dtypes.add(w.dtype.name)
                    tensors[name] = w
            _save_tensors(tmp / f.name, tensors, dict(file_meta))
        for f in base.iterdir():  # config, generation config, index, tokenizer files
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name != MERGE_MANIFEST:
                shutil.copy2(f, tmp / f.name)
        manifest = {
            "base": {"path": str(base), "source": source, "origin": str(origin) if origin else None,
                     "note": ("weights as loaded from an HF directory" if source == "hf" else
                              "weights de-quantised from a GGUF to float32 (jaxpersona convert)"),
                     "dtypes": sorted(dtypes), **weights_digest(base)},
            "adapter": {"digest": adapter_digest(adapter), "rank": adapter.rank, "scale": float(adapter.scale),
                        "targets": list(adapter.targets), **({"meta": dict(meta)} if meta else {})},
            "merge": "cast(W.dtype, W + (a @ b).T * scale), the sum in float32, as peft's merge_and_unload",
        }
        (tmp / MERGE_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"merged {len(delta_of)} weights of {base} ({source}) into {out}")
    return out


def cached_merge(base_dir: str | Path, adapter_dir: str | Path, *, source: str = "hf",
                 origin: str | Path | None = None, log: Log = print) -> Path:
    """The merged HF directory of ``base_dir`` + the adapter at ``adapter_dir`` (either format), kept under
    ``<cache>/merged/`` keyed by the base files (path, size, mtime) and the adapter's digest, so a second
    call reuses it. Every check (adapter format, fit) runs before anything is written."""
    base = Path(base_dir).expanduser().absolute()
    cfg = read_hf_config(base)
    adapter, meta = load_any_adapter(adapter_dir, cfg, log=log)
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(base.glob("*.safetensors"))]
    key = digest("merged-v1", str(base), stats, meta.get("sha256") or meta["digest"])[:16]
    out = registry.cache_dir() / "merged" / f"{base.name}-{key}"
    if (out / MERGE_MANIFEST).is_file() and (out / "config.json").is_file():
        log(f"merged model: reusing {out}")
        return out
    return save_merged(out, base, adapter, source=source, origin=origin, meta=meta, log=log)
