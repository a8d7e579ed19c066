"""The frozen model config shared by every family, and its translation from HF configs.

One :class:`ModelConfig` describes Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3: the
families differ only in a handful of switches (biases, q/k norms, sandwich norms, soft-caps,
sliding windows, rope tables). ``from_hf_config`` refuses any HF setting the forward does not
honour, so a loaded model is never silently a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona import errors

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
_MODEL_TYPE_TO_FAMILY = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES: dict[str, Any] = {"float32": np.float32, "fp32": np.float32, "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_dtype(dtype: Any) -> Any:
    """``"float32"``/``"bfloat16"`` (or the jnp dtypes) -> a jnp dtype; anything else is an error."""
    import jax.numpy as jnp

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise errors.UnsupportedDtypeError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
        return jnp.dtype(_DTYPES[dtype])
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise errors.UnsupportedDtypeError(f"dtype {dtype!r} is not supported; use float32 or bfloat16") from e
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise errors.UnsupportedDtypeError(f"dtype {dt} is not supported; use float32 or bfloat16")
    return dt


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention type. ``inv_freq()`` gives ``[head_dim // 2]``."""

    theta: float = 10000.0
    kind: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
        if self.kind == "linear":
            return (inv / self.factor).astype(np.float32)
        if self.kind == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer; hashable, so usable as a jit static arg."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_position: int
    rms_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # rope of sliding layers when it differs (Gemma 3)
    sliding_window: int | None = None
    layer_sliding: tuple[bool, ...] = ()  # per layer: True = sliding-window attention
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma 2/3: extra norms after attention and after the MLP
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: float = 1.0  # Gemma: sqrt(d_model)
    activation: str = "silu"  # "silu" | "gelu_tanh"
    query_scale: float | None = None  # default head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise errors.UnsupportedArchitectureError(
                f"unknown family {self.family!r}; jaxpersona implements {', '.join(FAMILIES)}"
            )
        if not self.layer_sliding:
            object.__setattr__(self, "layer_sliding", (False,) * self.n_layers)
        if len(self.layer_sliding) != self.n_layers:
            raise errors.UnsupportedConfigError(
                f"layer_sliding has {len(self.layer_sliding)} entries for {self.n_layers} layers"
            )
        if any(self.layer_sliding) and not self.sliding_window:
            raise errors.UnsupportedConfigError("sliding layers need a positive sliding_window")
        if self.n_heads % self.n_kv_heads:
            raise errors.UnsupportedConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def n_resid(self) -> int:
        """Number of residual-stream points: ``resid[0]`` (embeddings) .. ``resid[L]``."""
        return self.n_layers + 1

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        for k in ("rope", "rope_local"):
            if d.get(k) is not None:
                d[k] = RopeConfig(**d[k])
        for k in ("layer_sliding", "eos_token_ids"):
            d[k] = tuple(d[k])
        return cls(**d)


# --- HF translation ---------------------------------------------------------------------------
def _rope_from_params(p: Mapping[str, Any], max_position: int, where: str) -> RopeConfig:
    kind = p.get("rope_type", p.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise errors.UnsupportedConfigError(
            f"{where}: rope type {kind!r} is not implemented (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
        raise errors.UnsupportedConfigError(f"{where}: partial_rotary_factor != 1 is not implemented")
    return RopeConfig(
        theta=float(p["rope_theta"]),
        kind=kind,
        factor=float(p.get("factor", 1.0) or 1.0),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position=int(p.get("original_max_position_embeddings") or max_position),
    )


def eos_tuple(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _transformers_config(hf: Any) -> tuple[Any, str, str]:
    """``(transformers config, family, model_type)`` of a config object, dict or path (Gemma 3's multimodal
    wrapper: its text config)."""
    import transformers  # lazy: transformers is heavy and only configs need it here

    if isinstance(hf, (str, Path)):
        path = Path(hf)
        path = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise errors.ModelNotFoundError(f"no config.json at {path}")
        hf = json.loads(path.read_text())
    if isinstance(hf, Mapping):
        d = dict(hf)
        model_type = d.pop("model_type", None)
        if model_type not in _MODEL_TYPE_TO_FAMILY:
            raise errors.UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; jaxpersona implements "
                f"{', '.join(sorted(_MODEL_TYPE_TO_FAMILY))}"
            )
        if model_type == "gemma3":  # multimodal wrapper: take its text config
            d = dict(d.get("text_config") or {})
            model_type = "gemma3_text"
        hf = transformers.AutoConfig.for_model(model_type, **d)
    model_type = getattr(hf, "model_type", None)
    family = _MODEL_TYPE_TO_FAMILY.get(model_type or "")
    if family is None:
        raise errors.UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; jaxpersona implements "
            f"{', '.join(sorted(_MODEL_TYPE_TO_FAMILY))}"
        )
    if model_type == "gemma3":
        hf = hf.get_text_config()
    return hf, family, str(model_type)


def _rope_pair(get: Callable[..., Any], max_position: int, where: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(global rope, local rope or None). v5 configs standardise to ``rope_parameters`` (per layer type for Gemma 3)."""
    rp = get("rope_parameters")
    if rp is None:
        rp = dict(get("rope_scaling") or {})
        rp.setdefault("rope_theta", get("rope_theta", 10000.0))
    if "full_attention" in rp or "sliding_attention" in rp:
        rope = _rope_from_params(rp["full_attention"], max_position, where)
        local = _rope_from_params(rp["sliding_attention"], max_position, where) if "sliding_attention" in rp else None
        return rope, None if local == rope else local
    return _rope_from_params(rp, max_position, where), None


def _sliding_layers(get: Callable[..., Any], family: str, n_layers: int, where: str) -> tuple[tuple[bool, ...], Any]:
    """(per-layer sliding flags, the window or None when no layer slides)."""
    layer_types = get("layer_types")
    window = get("sliding_window")
    if family == "mistral":
        layer_types = ["sliding_attention" if window else "full_attention"] * n_layers
    elif family in ("qwen2", "qwen3") and not get("use_sliding_window", False):
        layer_types = ["full_attention"] * n_layers
    if layer_types is None:
        layer_types = ["full_attention"] * n_layers
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise errors.UnsupportedConfigError(f"{where}: layer types {sorted(unknown)} are not implemented")
    layer_sliding = tuple(t == "sliding_attention" for t in layer_types)
    return layer_sliding, window if any(layer_sliding) else None


def from_hf_config(hf: Any) -> ModelConfig:
    """Build a :class:`ModelConfig` from a ``transformers`` config object, a config dict or a path.

    Raises :class:`~jaxpersona.errors.UnsupportedArchitectureError` for unknown model types and
    :class:`~jaxpersona.errors.UnsupportedConfigError` for settings the forward does not honour.
    """
    hf, family, model_type = _transformers_config(hf)
    where = f"{model_type} config"

    def get(name: str, default: Any = None) -> Any:
        return getattr(hf, name, default)

    # Refuse what we do not honour.
    act = get("hidden_activation") or get("hidden_act")
    act_map = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in act_map:
        raise errors.UnsupportedConfigError(f"{where}: activation {act!r} is not implemented")
    if get("mlp_bias", False):
        raise errors.UnsupportedConfigError(f"{where}: mlp_bias=True is not implemented")
    if get("use_bidirectional_attention", False):
        raise errors.UnsupportedConfigError(f"{where}: bidirectional attention is not implemented")
    if get("pretraining_tp", 1) not in (1, None):
        raise errors.UnsupportedConfigError(f"{where}: pretraining_tp != 1 is not implemented")

    n_layers = int(get("num_hidden_layers"))
    n_heads = int(get("num_attention_heads"))
    d_model = int(get("hidden_size"))
    head_dim = int(get("head_dim", None) or d_model // n_heads)
    max_position = int(get("max_position_embeddings"))

    rope, rope_local = _rope_pair(get, max_position, where)
    layer_sliding, window = _sliding_layers(get, family, n_layers, where)

    gemma = family in ("gemma2", "gemma3")
    qps = get("query_pre_attn_scalar")
    qkv_bias = bool(get("attention_bias", False)) or family == "qwen2"
    return ModelConfig(
        family=family,
        vocab_size=int(get("vocab_size")),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(get("num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        d_ff=int(get("intermediate_size")),
        max_position=max_position,
        rms_eps=float(get("rms_norm_eps", 1e-6)),
        rope=rope,
        rope_local=rope_local,
        sliding_window=int(window) if window else None,
        layer_sliding=layer_sliding,
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=bool(get("attention_bias", False)) and family in ("llama", "mistral", "qwen3", "gemma2", "gemma3"),
        qk_norm=family in ("qwen3", "gemma3"),
        sandwich_norm=gemma,
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=float(d_model**0.5) if gemma else 1.0,
        activation=act_map[act],
        query_scale=float(qps) ** -0.5 if (gemma and qps) else None,
        attn_softcap=float(get("attn_logit_softcapping")) if get("attn_logit_softcapping") else None,
        final_softcap=float(get("final_logit_softcapping")) if get("final_logit_softcapping") else None,
        bos_token_id=get("bos_token_id"),
        eos_token_ids=eos_tuple(get("eos_token_id")),
        pad_token_id=get("pad_token_id"),
    )
