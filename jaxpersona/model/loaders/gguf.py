"""Read llama.cpp GGUF checkpoints into HF-layout float32 tensors, an HF config and a tokenizer.

``read_gguf`` turns a ``.gguf`` file into what an HF model directory holds: a transformers
``config.json`` dict, float32 numpy tensors under HF parameter names in HF's ``[out, in]`` layout,
and the data to rebuild the tokenizer. ``convert_gguf_to_hf_dir`` writes exactly that as a normal
HF directory, so GGUF models load through the same path as HF ones.

It mirrors transformers' own GGUF loader (``modeling_gguf_pytorch_utils.load_gguf_checkpoint``),
which needs torch: the same tensor names, llama.cpp's q/k row permutation undone for ``llama``,
the ``+1`` llama.cpp bakes into Gemma norms taken off again, and the tokenizer built by
transformers' ``convert_gguf_tokenizer`` from the ``tokenizer.*`` metadata. Dequantization is the
``gguf`` package's own (``gguf.quants.dequantize``). No torch anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxpersona import errors

if TYPE_CHECKING:  # pragma: no cover
    import gguf as _gguf
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "GGUFModel",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_QUANT_TYPES",
    "convert_gguf_to_hf_dir",
    "load_gguf_tokenizer",
    "read_gguf",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")

# ggml types we dequantize (with gguf.quants.dequantize). Q2_K / Q3_K are cross-checked against
# transformers' independent torch dequantizer in the tests; the IQ*, TQ*, MXFP4 ... families are not.
SUPPORTED_QUANT_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)

_DAMAGED = "The file is damaged (truncated or corrupt): delete it and re-install / re-download it."

_MODEL_TYPE = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",  # a GGUF holds only Gemma 3's text backbone
}
_HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_GEMMA = ("gemma2", "gemma3")

# GGUF -> HF tensor names (what transformers' get_gguf_hf_weights_map yields for these families).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_ARCH_LAYER_NAMES = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "qwen3": {
        "ffn_norm": "post_attention_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
    "gemma2": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
}
# Per-layer weights every file of the family must have (biases and q/k norms are checked separately).
_REQUIRED_LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm")
# Tensors llama.cpp writes that are not HF parameters; they are read into the config instead.
_CONFIG_TENSORS = ("rope_freqs.weight",)

# Token texts llama.cpp treats as end-of-generation (llama-vocab.cpp, special_eog_ids auto-detection).
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)

# GGUF tokenizer.* key -> transformers name (transformers' GGUF_TOKENIZER_MAPPING).
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
_TOKENIZER_CONFIG_KEYS = {
    "ggml.add_bos_token": "add_bos_token",
    "ggml.add_eos_token": "add_eos_token",
}
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class GGUFModel:
    """A GGUF checkpoint translated to HF terms (see :func:`read_gguf`).

    Attributes:
        architecture: GGUF ``general.architecture`` (``"llama"``, ``"qwen2"``, ``"gemma3"``, ...).
        hf_config: a transformers ``config.json`` dict describing the same model.
        tensors: HF parameter name -> float32 array in HF's ``[out, in]`` layout.
        tokenizer_kwargs: keyword arguments for ``PreTrainedTokenizerFast`` besides the backend:
            special tokens, ``chat_template``, ``add_bos_token`` / ``add_eos_token``,
            ``padding_side="left"``.
        tokenizer_data: the ``tokenizer_dict`` transformers' ``convert_gguf_tokenizer`` takes
            (tokens, scores, token types, merges, ...).
        eog_token_ids: ids that end generation, as llama.cpp detects them (eos, eot, eom and
            tokens such as ``<end_of_turn>`` / ``<|im_end|>``); HF keeps these in
            ``generation_config.json``.
        tensor_types: HF parameter name -> the GGUF storage type it was read from (``"Q4_K"``, ...).
        path: the file read.
    """

    architecture: str
    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer_kwargs: dict[str, Any]
    tokenizer_data: dict[str, Any]
    eog_token_ids: tuple[int, ...]
    tensor_types: dict[str, str]
    path: str

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """The fast tokenizer this file describes (what ``AutoTokenizer(gguf_file=...)`` builds)."""
        return _build_tokenizer(self.architecture, self.tokenizer_data, self.tokenizer_kwargs)

    def generation_config(self) -> dict[str, Any]:
        """A ``generation_config.json`` dict: bos / pad ids and every end-of-generation id."""
        cfg: dict[str, Any] = {}
        for key in ("bos_token_id", "pad_token_id"):
            if self.hf_config.get(key) is not None:
                cfg[key] = self.hf_config[key]
        eos = list(self.eog_token_ids)
        if eos:
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return cfg


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Read a GGUF file: HF config dict, dequantized float32 HF-named tensors, tokenizer data.

    Raises:
        ModelNotFoundError: the file does not exist.
        CorruptCheckpointError: the file is truncated, corrupt, unreadable or lacks tensors.
        UnsupportedArchitectureError: ``general.architecture`` (or a tensor) is not implemented.
        UnsupportedQuantizationError: a tensor is stored in a type we cannot dequantize.
        UnsupportedConfigError: a setting (e.g. a rope scaling) that has no HF equivalent here.
        ShapeMismatchError: a tensor's shape disagrees with the metadata.
    """
    path = _check_path(path)
    reader = _open_reader(path)
    try:
        meta = _Metadata(reader, path)
        arch = meta.architecture
        by_name = {t.name: t for t in reader.tensors}
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
        hf_config = _build_hf_config(arch, meta, shapes, by_name, path)
        name_map = _tensor_name_map(arch, hf_config["num_hidden_layers"])

        unknown = sorted(n for n in by_name if n not in name_map and n not in _CONFIG_TENSORS)
        if unknown:
            shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise errors.UnsupportedArchitectureError(
                f"{path}: this {arch!r} GGUF holds tensors jaxpersona does not implement ({shown}); "
                "it is probably a variant of the family (e.g. mixture-of-experts) that is not supported."
            )
        _check_required(arch, hf_config, by_name, path)

        # Refuse unsupported storage types before spending time on dequantization.
        for t in reader.tensors:
            if t.name in name_map and t.tensor_type.name not in SUPPORTED_QUANT_TYPES:
                raise errors.UnsupportedQuantizationError(
                    f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which jaxpersona cannot "
                    f"dequantize (supported: {', '.join(sorted(SUPPORTED_QUANT_TYPES))}). "
                    "Use a GGUF with a different quantization, e.g. Q8_0, Q6_K, Q5_K_M or Q4_K_M."
                )

        n_heads = hf_config["num_attention_heads"]
        n_kv = hf_config["num_key_value_heads"]
        tensors: dict[str, np.ndarray] = {}
        tensor_types: dict[str, str] = {}
        for t in reader.tensors:
            hf_name = name_map.get(t.name)
            if hf_name is None:
                continue
            w = _dequantize(t, reader.data, path)
            if w.shape != shapes[t.name]:
                raise errors.CorruptCheckpointError(
                    f"{path}: tensor {t.name!r} dequantized to shape {w.shape}, expected {shapes[t.name]}. "
                    + _DAMAGED
                )
            if arch == "llama":
                # llama.cpp interleaves the rotary halves of q/k rows (and biases); undo it as
                # transformers' LlamaTensorProcessor does.
                if ".attn_q." in t.name:
                    w = _reverse_permute(w, n_heads, n_heads)
                elif ".attn_k." in t.name:
                    w = _reverse_permute(w, n_heads, n_kv)
            if arch in _GEMMA and "norm.weight" in t.name:
                w = w - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w) norms as w + 1
            tensors[hf_name] = np.ascontiguousarray(w, dtype=np.float32)
            tensor_types[hf_name] = t.tensor_type.name
        _check_shapes(hf_config, tensors, path)

        tokenizer_data, tokenizer_kwargs = _tokenizer_parts(meta)
        eog = _eog_token_ids(meta, tokenizer_data)
    finally:
        del reader
    return GGUFModel(
        architecture=arch,
        hf_config=hf_config,
        tensors=tensors,
        tokenizer_kwargs=tokenizer_kwargs,
        tokenizer_data=tokenizer_data,
        eog_token_ids=eog,
        tensor_types=tensor_types,
        path=str(path),
    )


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """The fast tokenizer a GGUF file describes, without reading its tensors.

    Same ids as ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``; ``padding_side="left"``;
    BOS is added exactly when ``tokenizer.ggml.add_bos_token`` says so.
    """
    path = _check_path(path)
    reader = _open_reader(path)
    try:
        meta = _Metadata(reader, path)
        tokenizer_data, tokenizer_kwargs = _tokenizer_parts(meta)
        arch = meta.architecture
    finally:
        del reader
    return _build_tokenizer(arch, tokenizer_data, tokenizer_kwargs)


# what a conversion writes (transformers' tokenizer files vary with its version; the written ones are added)
CONVERTED_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                             "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model"})


def _check_replaceable(out: Path, written: set[str] = set()) -> None:  # noqa: B006 (read only)
    """Refuse to replace ``out`` unless it is absent, an empty directory, or a directory of converted-model files."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise errors.InputError(f"{out} exists and is not a directory: refusing to replace it with a converted model "
                                "(choose another output directory)")
    foreign = sorted(p.name for p in out.iterdir() if not p.is_file() or p.name not in CONVERTED_FILES | written)
    if foreign:
        raise errors.InputError(f"{out} holds files that are not a converted model's ({', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}): refusing to replace it; choose another (or an "
                                "empty) output directory")


def convert_gguf_to_hf_dir(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF file into a normal HF model directory and return its path.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32) and the
    tokenizer files. The directory is built under a temporary name next to ``out_dir`` and moved
    into place with ``os.replace``, so an interrupted conversion never leaves a half-written
    ``out_dir``. An existing ``out_dir`` is replaced only when it is empty or an earlier conversion (its files
    all among those a conversion writes); anything else there is a user's, and
    :class:`~jaxpersona.errors.InputError` is raised before any work.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir).absolute()
    _check_replaceable(out)
    model = read_gguf(gguf_path)
    tokenizer = model.build_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(model.hf_config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(model.generation_config(), indent=2, sort_keys=True) + "\n"
        )
        save_file(model.tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        _check_replaceable(out, {f.name for f in tmp.iterdir()})
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        _fsync(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise errors.ModelNotFoundError(f"GGUF file not found: {p}")
    if p.is_dir():
        raise errors.ModelNotFoundError(f"{p} is a directory; expected a .gguf file")
    return p


def _reader_classes() -> tuple[type, ...]:
    """A GGUFReader that slices a plain ndarray view of its memmap (3x faster on big vocabularies),
    and the stock class as a fallback should gguf's internals change."""
    import gguf

    class _FastGGUFReader(gguf.GGUFReader):
        # np.memmap slicing runs Python-level __array_finalize__ per call, and the reader makes one
        # call per metadata array element (262k tokens + scores + types for Gemma).
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain_data")
            if plain is None:
                plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
            count = int(count)
            dt = np.dtype(dtype)
            arr = plain[offset : offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return (_FastGGUFReader, gguf.GGUFReader)


def _open_reader(path: Path) -> _gguf.GGUFReader:
    """Open ``path`` with gguf's reader, mapping any parse failure to CorruptCheckpointError."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise errors.CorruptCheckpointError(f"{path}: cannot read the file ({e}).") from e
    if size < 24:
        raise errors.CorruptCheckpointError(f"{path}: only {size} bytes, too short for a GGUF file. " + _DAMAGED)
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise errors.CorruptCheckpointError(f"{path}: cannot read the file ({e}).") from e
    if magic[:4] != b"GGUF":
        raise errors.CorruptCheckpointError(
            f"{path}: not a GGUF file (magic bytes {magic[:4]!r}, expected b'GGUF'). " + _DAMAGED
        )
    version = int.from_bytes(magic[4:8], "little")
    if version not in (2, 3) and int.from_bytes(magic[4:8], "big") not in (2, 3) and 3 < version < 64:
        import gguf

        raise errors.CorruptCheckpointError(
            f"{path}: GGUF version {version} is newer than the installed gguf package reads "
            f"(gguf {getattr(gguf, '__version__', '?')} reads v2 and v3); upgrade it with `pip install -U gguf`."
        )
    fast, stock = _reader_classes()
    try:
        try:
            return fast(str(path), "r")
        except (TypeError, AttributeError, NotImplementedError):
            return stock(str(path), "r")  # gguf's internals moved: the plain reader still works
    except MemoryError:
        raise
    except Exception as e:  # the reader raises ValueError/IndexError/KeyError/... on bad bytes
        raise errors.CorruptCheckpointError(
            f"{path}: cannot parse the GGUF file ({type(e).__name__}: {e}). " + _DAMAGED
        ) from e


def _dequantize(t: Any, file_data: np.ndarray, path: Path) -> np.ndarray:
    """One tensor as float32 in numpy (HF) order, with gguf's own dequantizer; never a file view."""
    from gguf.quants import dequantize

    expected = int(t.n_bytes)
    if int(t.data.nbytes) != expected or t.data_offset + expected > file_data.nbytes:
        raise errors.CorruptCheckpointError(
            f"{path}: tensor {t.name!r} runs past the end of the file. " + _DAMAGED
        )
    try:
        with np.errstate(all="ignore"):  # bad scales overflow; caught by the finiteness check below
            w = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, KeyError) as e:
        raise errors.UnsupportedQuantizationError(
            f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which gguf cannot dequantize ({e})."
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # bad block bytes that numpy cannot even reshape
        raise errors.CorruptCheckpointError(
            f"{path}: cannot decode tensor {t.name!r} ({type(e).__name__}: {e}). " + _DAMAGED
        ) from e
    w = np.asarray(w)
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    elif np.may_share_memory(w, file_data):
        w = w.copy()  # F32 tensors come back as views of the memory-mapped file
    if not np.isfinite(w).all():
        raise errors.CorruptCheckpointError(
            f"{path}: tensor {t.name!r} contains NaN or infinite values. " + _DAMAGED
        )
    return w


def _reverse_permute(weights: np.ndarray, n_head: int, num_kv_heads: int | None = None) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (transformers' ``LlamaTensorProcessor._reverse_permute_weights``)."""
    if num_kv_heads is not None and n_head != num_kv_heads:
        n_head = num_kv_heads
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


_MISSING = object()


class _Metadata:
    """The file's key/value metadata as plain Python values."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields = reader.fields
        self.path = path
        self.data: np.ndarray = reader.data  # the memory-mapped file
        arch = self.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise errors.CorruptCheckpointError(f"{path}: no general.architecture in the GGUF metadata. " + _DAMAGED)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise errors.UnsupportedArchitectureError(
                f"{path}: GGUF architecture {arch!r} is not supported; jaxpersona reads "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        self.architecture: str = arch

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def keys(self) -> list[str]:
        return list(self._fields)

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # undecodable string, bad array
            raise errors.CorruptCheckpointError(
                f"{self.path}: cannot decode GGUF metadata {key!r} ({e}). " + _DAMAGED
            ) from e

    def arch(self, key: str, default: Any = _MISSING) -> Any:
        """``{architecture}.{key}``; required unless a default is given."""
        full = f"{self.architecture}.{key}"
        value = self.get(full, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise errors.CorruptCheckpointError(
                    f"{self.path}: required GGUF metadata {full!r} is missing. " + _DAMAGED
                )
            return default
        return value


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def _f32(x: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(x)))


def _per_layer_scalar(meta: _Metadata, key: str, value: Any) -> int:
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise errors.UnsupportedConfigError(
                f"{meta.path}: {meta.architecture}.{key} varies per layer ({value[:8]}...), which is not supported."
            )
        value = value[0]
    return int(value)


def _build_hf_config(
    arch: str, meta: _Metadata, shapes: Mapping[str, tuple[int, ...]], by_name: Mapping[str, Any], path: Path
) -> dict[str, Any]:
    """The transformers config dict for this file (see transformers' GGUF_CONFIG_MAPPING)."""
    hidden = int(meta.arch("embedding_length"))
    n_layers = int(meta.arch("block_count"))
    n_heads = _per_layer_scalar(meta, "attention.head_count", meta.arch("attention.head_count"))
    n_kv = _per_layer_scalar(meta, "attention.head_count_kv", meta.arch("attention.head_count_kv", n_heads))
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise errors.CorruptCheckpointError(f"{path}: bad head counts {n_heads} / {n_kv}. " + _DAMAGED)

    key_length = meta.arch("attention.key_length", None)
    value_length = meta.arch("attention.value_length", None)
    if key_length is not None and value_length is not None and int(key_length) != int(value_length):
        raise errors.UnsupportedConfigError(
            f"{path}: key_length {key_length} != value_length {value_length} is not supported."
        )
    rope_dims = meta.arch("rope.dimension_count", None)
    if key_length is not None:
        head_dim = int(key_length)
    elif arch == "llama" and rope_dims is not None:
        head_dim = int(rope_dims)  # transformers maps llama's rope.dimension_count to head_dim
    else:
        head_dim = hidden // n_heads
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise errors.UnsupportedConfigError(
            f"{path}: rope over {rope_dims} of {head_dim} head dims (partial rotary) is not supported."
        )

    n_tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = meta.arch("vocab_size", None)
    if vocab_size is None:
        if n_tokens is None:
            embd = shapes.get("token_embd.weight")
            if embd is None:
                raise errors.CorruptCheckpointError(f"{path}: no vocabulary and no token_embd.weight. " + _DAMAGED)
            vocab_size = embd[0]
        else:
            vocab_size = len(n_tokens)

    cfg: dict[str, Any] = {
        "model_type": _MODEL_TYPE[arch],
        "architectures": [_HF_ARCHITECTURE[arch]],
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.arch("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.arch("rope.freq_base", 10000.0)),  # llama.cpp's default
        "max_position_embeddings": int(meta.arch("context_length")),
        "vocab_size": int(vocab_size),
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in by_name,
        "dtype": "float32",
    }
    for key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
        ("unk_token_id", "unknown_token_id"),
    ):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            cfg[key] = int(value)

    has_bias = "blk.0.attn_q.bias" in by_name
    if arch == "llama":
        cfg["hidden_act"] = "silu"
        cfg["attention_bias"] = has_bias
        cfg["mlp_bias"] = False
        rope_scaling = _rope_scaling(meta, by_name, cfg, path)
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
    elif arch == "qwen2":
        cfg["hidden_act"] = "silu"
        cfg["use_sliding_window"] = False  # llama.cpp never uses a window for qwen2
    elif arch == "qwen3":
        cfg["hidden_act"] = "silu"
        cfg["attention_bias"] = has_bias
        cfg["use_sliding_window"] = False
    elif arch in _GEMMA:
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["sliding_window"] = int(meta.arch("attention.sliding_window", 4096))  # HF's default
        # llama.cpp: Q is scaled by 1/sqrt(head_dim), except the 27B models (46 layers for Gemma 2,
        # 62 for Gemma 3) which use 1/sqrt(hidden/heads) -- HF's query_pre_attn_scalar.
        big = n_layers == (46 if arch == "gemma2" else 62)
        cfg["query_pre_attn_scalar"] = hidden // n_heads if big else head_dim
        if arch == "gemma2":
            # llama.cpp gemma2: layer i slides iff i is even.
            cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            cfg["attn_logit_softcapping"] = _f32(meta.arch("attn_logit_softcapping", 50.0))
            cfg["final_logit_softcapping"] = _f32(meta.arch("final_logit_softcapping", 30.0))
        else:
            # llama.cpp gemma3: every 6th layer (5, 11, ...) is global, the rest slide.
            cfg["layer_types"] = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)
            ]
            cfg["rope_local_base_freq"] = 10000.0
            rope_scaling = _rope_scaling(meta, by_name, cfg, path)
            if rope_scaling is not None:
                cfg["rope_scaling"] = rope_scaling
    return cfg


def _rope_scaling(
    meta: _Metadata, by_name: Mapping[str, Any], cfg: Mapping[str, Any], path: Path
) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` or llama.cpp's llama3 ``rope_freqs`` tensor."""
    kind = meta.arch("rope.scaling.type", None)
    factor = meta.arch("rope.scaling.factor", None)
    if "rope_freqs.weight" in by_name:
        if kind not in (None, "none"):
            raise errors.UnsupportedConfigError(
                f"{path}: both rope.scaling.type={kind!r} and a rope_freqs tensor; not supported."
            )
        freqs = _dequantize(by_name["rope_freqs.weight"], meta.data, path)
        return _llama3_rope_from_factors(freqs.reshape(-1), cfg, path)
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
        orig = meta.arch("rope.scaling.original_context_length", None)
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ("rope.scaling.attn_factor", "attention_factor"),
        ):
            value = meta.arch(gguf_key, None)
            if value is not None:
                scaling[hf_key] = _f32(value)
        return scaling
    raise errors.UnsupportedConfigError(f"{path}: rope scaling type {kind!r} is not supported.")


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as ``rope_freqs`` for rope_type llama3."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = orig / low, orig / high
    out = []
    for f in freqs.astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float64)


def _llama3_rope_from_factors(factors: np.ndarray, cfg: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    """Recover HF's llama3 ``rope_scaling`` from a ``rope_freqs`` tensor (it stores only the result).

    The divisors fix ``factor`` (their maximum); the other three parameters are found among the
    values Llama 3.x uses and accepted only if they reproduce every divisor.
    """
    head_dim = int(cfg["head_dim"])
    if factors.shape != (head_dim // 2,):
        raise errors.ShapeMismatchError(f"{path}: rope_freqs has shape {factors.shape}, expected ({head_dim // 2},).")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    theta = float(cfg["rope_theta"])
    for orig in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0, 16.0):
                if high <= low:
                    continue
                ref = _llama3_factors(theta, head_dim, factor, low, high, orig)
                if np.allclose(ref, factors, rtol=1e-4, atol=1e-5):
                    return {
                        "rope_type": "llama3",
                        "factor": _f32(factor),
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": orig,
                    }
    raise errors.UnsupportedConfigError(
        f"{path}: the rope_freqs tensor matches no llama3 rope scaling jaxpersona can express."
    )


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------
def _tensor_name_map(arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name for every tensor this family may hold."""
    layer = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES[arch]}
    out = dict(_GLOBAL_NAMES)
    for i in range(n_layers):
        for gguf_leaf, hf_leaf in layer.items():
            out[f"blk.{i}.{gguf_leaf}.weight"] = f"model.layers.{i}.{hf_leaf}.weight"
            if gguf_leaf.startswith("attn_") and "norm" not in gguf_leaf:  # q/k/v/o biases only
                out[f"blk.{i}.{gguf_leaf}.bias"] = f"model.layers.{i}.{hf_leaf}.bias"
    return out


def _check_required(arch: str, cfg: Mapping[str, Any], by_name: Mapping[str, Any], path: Path) -> None:
    """Every tensor the HF model has must be in the file."""
    layer = list(_REQUIRED_LAYER) + [k for k in _ARCH_LAYER_NAMES[arch] if "q_norm" not in k and "k_norm" not in k]
    if arch in ("qwen3", "gemma3"):
        layer += ["attn_q_norm", "attn_k_norm"]
    required = ["token_embd.weight", "output_norm.weight"]
    for i in range(int(cfg["num_hidden_layers"])):
        required += [f"blk.{i}.{leaf}.weight" for leaf in layer]
        if arch == "qwen2" or cfg.get("attention_bias"):
            required += [f"blk.{i}.attn_{x}.bias" for x in ("q", "k", "v")]
        if cfg.get("attention_bias") and arch in ("llama", "qwen3"):
            required.append(f"blk.{i}.attn_output.bias")
    missing = [n for n in required if n not in by_name]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise errors.CorruptCheckpointError(
            f"{path}: {len(missing)} tensor(s) the {arch!r} model needs are missing ({shown}). " + _DAMAGED
        )
    n_layers = int(cfg["num_hidden_layers"])
    extra = sorted({int(n.split(".")[1]) for n in by_name if n.startswith("blk.")} - set(range(n_layers)))
    if extra:
        raise errors.CorruptCheckpointError(
            f"{path}: tensors for layer(s) {extra[:8]} but block_count is {n_layers}. " + _DAMAGED
        )


def _check_shapes(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """Shapes the config implies, in HF's [out, in] layout."""
    d, hd = int(cfg["hidden_size"]), int(cfg["head_dim"])
    nh, nkv, ff = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["intermediate_size"])
    expected: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (int(cfg["vocab_size"]), d),
        "model.norm.weight": (d,),
    }
    if "lm_head.weight" in tensors:
        expected["lm_head.weight"] = (int(cfg["vocab_size"]), d)
    per_layer = {
        "self_attn.q_proj.weight": (nh * hd, d),
        "self_attn.k_proj.weight": (nkv * hd, d),
        "self_attn.v_proj.weight": (nkv * hd, d),
        "self_attn.o_proj.weight": (d, nh * hd),
        "self_attn.q_proj.bias": (nh * hd,),
        "self_attn.k_proj.bias": (nkv * hd,),
        "self_attn.v_proj.bias": (nkv * hd,),
        "self_attn.o_proj.bias": (d,),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (ff, d),
        "mlp.up_proj.weight": (ff, d),
        "mlp.down_proj.weight": (d, ff),
    }
    for name, w in tensors.items():
        shape = expected.get(name)
        if shape is None and name.startswith("model.layers."):
            leaf = name.split(".", 3)[3]
            shape = per_layer.get(leaf, (d,) if leaf.endswith("layernorm.weight") else None)
        if shape is not None and tuple(w.shape) != shape:
            raise errors.ShapeMismatchError(
                f"{path}: {name} has shape {tuple(w.shape)} but the GGUF metadata implies {shape}."
            )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def _tokenizer_parts(meta: _Metadata) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tokenizer_dict, tokenizer kwargs)`` as transformers' ``get_gguf_tokenizer`` builds them."""
    data = {name: meta.get(f"tokenizer.{key}") for key, name in _TOKENIZER_KEYS.items()}
    data = {k: v for k, v in data.items() if v is not None}
    if not data.get("tokens"):
        raise errors.CorruptCheckpointError(
            f"{meta.path}: the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens). " + _DAMAGED
        )
    kwargs = {name: meta.get(f"tokenizer.{key}") for key, name in _TOKENIZER_CONFIG_KEYS.items()}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if data.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        kwargs.setdefault("add_bos_token", True)
    elif data.get("tokenizer_type") == "gemma4":
        kwargs["add_bos_token"] = False  # as transformers: the chat template writes <bos> itself
    tokens = data["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        kwargs[name] = tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None
    template = meta.get("tokenizer.chat_template")
    named = {
        k[len("tokenizer.chat_template.") :]: meta.get(k)
        for k in meta.keys()
        if k.startswith("tokenizer.chat_template.")
    }
    if named:
        templates = dict(named)
        if template is not None:
            templates["default"] = template
        kwargs["chat_template"] = templates
    elif template is not None:
        kwargs["chat_template"] = template
    kwargs["padding_side"] = "left"
    return data, kwargs


def _eog_token_ids(meta: _Metadata, tokenizer_data: Mapping[str, Any]) -> tuple[int, ...]:
    """End-of-generation ids: eos, eot, eom, then control tokens llama.cpp recognises by text."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    types = tokenizer_data.get("token_type") or []
    for i, token in enumerate(tokenizer_data["tokens"]):
        # only tokens marked CONTROL (3) or USER_DEFINED (4), as llama.cpp
        if token in _EOG_TEXTS and i not in ids and (not types or types[i] in (3, 4)):
            ids.append(i)
    return tuple(ids)


def _build_tokenizer(
    architecture: str, tokenizer_data: Mapping[str, Any], tokenizer_kwargs: Mapping[str, Any]
) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer

    try:
        backend, additional = convert_gguf_tokenizer(architecture, dict(tokenizer_data))
    except (ValueError, KeyError, NotImplementedError) as e:
        raise errors.UnsupportedArchitectureError(
            f"cannot build the {tokenizer_data.get('tokenizer_type')!r} tokenizer of this {architecture!r} GGUF: {e}"
        ) from e
    kwargs = dict(tokenizer_kwargs)
    kwargs.update(additional or {})
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _fsync(p: Path) -> None:
    """Flush a file or directory to disk (best effort; not every filesystem allows it on dirs)."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
