"""The OpenAI wire format, plus jaxpersona's ``interventions``, ``mixture``, ``adapter`` and ``persona_readout``
fields.

Parsing turns a request body into engine :class:`~jaxpersona.serve.engine.Sequence` objects (one per
choice) or raises :class:`~jaxpersona.errors.RequestError` naming the offending field; building turns the
engine's events back into OpenAI responses and stream chunks.

An intervention item (a list under ``interventions``; also read from ``extra_body``)::

    {"kind": "steer",  "vector": "evil" | [d_model floats] | [[...]] * n_resid, "layers": 16 | [12, 16],
     "coeff": 4.0, "units": "absolute" | "relative", "positions": "all|prompt|response|assistant"}
    {"kind": "cap",    "vector": ..., "layers": ..., "floor": -2.0, "ceiling": null, "positions": ...}
    {"kind": "ablate", "vector": ..., "layers": ..., "mean": 0.0, "positions": ...}
    {"preset": "assistant_cap"}  or just  "assistant_cap"     # named at server start

``units = "relative"`` makes ``coeff`` a multiple of the residual norm at each layer (recorded in the bank),
so one coefficient means the same strength at every layer. Caps clamp the projection on the unit
vector; an ablation sets it to ``mean``.

A persona mixture (``mixture``; also read from ``extra_body``), the library's
:class:`~jaxpersona.edit.interventions.Mixture` ``h + alpha * sum_k w_k v_k`` per row::

    {"vectors": ["evil", "optimistic", [d_model floats], ...],   # 2 <= K <= max_mixture (default 8)
     "layers": 12 | [12, 16], "alpha": 4.0, "tau": 1.0,          # tau > 0 (default 1)
     "weights": [0.5, 0.5],                                      # optional: a fixed mix instead of
                                                                 #   w = softmax(<h, v̂_k> / tau) per token
     "positions": "all|prompt|response|assistant", "units": "absolute" | "relative"}

At resid point ``l`` the mixture uses each entry's direction at ``l`` (a bank entry's ``vector[l]``; a list of
``d_model`` floats is one direction everywhere). ``units = "relative"`` replaces each entry by its unit direction
times the residual norm the bank recorded at ``l`` (``v̂_k[l] * norm_k[l]``), so ``alpha`` is in residual-norm
units, as a relative steer's ``coeff`` (bank entries with norms only). The softmax always uses the unit
directions. It is applied after the request's ``interventions`` at each resid point. Every bad field is a 400
whose ``param`` names it (``mixture.vectors[1]``, ``mixture.tau``, ...).

Adapters (LoRA, loaded at server start): a request selects one with ``"model": "<adapter name>"`` (vLLM's
way) or ``"adapter": "<name>"`` (also in ``extra_body``); ``"model"`` may be the served name (the base model)
or absent. An unknown name is a 404 ``model_not_found`` listing what is served; ``model`` naming one adapter
and ``adapter`` another is a 400. Responses name the adapter as their ``model``.

Persona readout (``persona_readout``): each generated token's residual at the entry's layer projected on its
unit direction. Non-streamed, ``choices[i]["persona_readout"][name]`` is ``{"layer", "mean_projection",
"tokens", "per_token": [one float per generated token]}``. Streamed, every delta chunk's choice carries
``"persona_projection": {name: [floats]}``: the projections of the tokens whose text that chunk carries, in
order (tokens whose text is held back — an incomplete UTF-8 character, a possible stop string — go with the
next chunk that carries text; the final chunk, the one with ``finish_reason``, carries any rest, e.g. an EOS
token or a stop string's tokens, and ``persona_readout`` with ``layer``, ``mean_projection`` and ``tokens``).
Concatenating a choice's ``persona_projection`` lists gives ``per_token``.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxpersona import errors
from jaxpersona.compute.handle import Model
from jaxpersona.serve.engine import POSITIONS, TOP_LOGPROBS, Item, MixSpec, Sequence

MAX_N = 16
F32_MAX = float(np.finfo(np.float32).max)  # numbers a request may carry (they become float32)
MAX_STOP = 4


def bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> errors.RequestError:
    return errors.RequestError(message, param=param, code=code, status=status)


@dataclasses.dataclass
class Resources:
    """What requests may name: the model's shape, bank vectors (with residual norms), presets and adapters."""

    model_name: str
    n_resid: int
    d_model: int
    vectors: dict[str, np.ndarray]  # name -> [N, D]
    norms: dict[str, np.ndarray | None]  # name -> [N] residual norms, or None
    default_layers: dict[str, int]  # name -> the bank's chosen layer (readout default)
    presets: dict[str, list[Item]] = dataclasses.field(default_factory=dict)
    max_interventions: int = 4
    max_readout: int = 4
    default_positions: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> the bank's chosen steering
    # positions (a steer naming the entry without "positions" uses them)
    adapters: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> path, kind, rank, ...
    adapter_index: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> index in adapter_stack (0 = base)
    adapter_stack: Any = None  # AdapterStack (member 0 the base model), or None without adapters
    max_mixture: int = 8

    def describe(self) -> dict[str, Any]:
        return {"n_resid": self.n_resid, "d_model": self.d_model, "vectors": sorted(self.vectors),
                "presets": sorted(self.presets), "max_interventions": self.max_interventions,
                "max_readout": self.max_readout, "max_mixture": self.max_mixture, "positions": list(POSITIONS),
                "adapters": sorted(self.adapters)}

    def served(self) -> list[str]:
        """The model ids requests may send: the served name (the base model), then the adapters."""
        return [self.model_name, *sorted(self.adapters)]


# --- small typed readers ---------------------------------------------------------------------------
def _finite(x: Any, param: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise bad(f"{param} must be a number, got {type(x).__name__}", param)
    if not math.isfinite(x) or abs(x) > F32_MAX:
        raise bad(f"{param} must be finite (and within float32's range), got {x}", param, "non_finite")
    return float(x)


def _number(body: dict, key: str, default: float, lo: float, hi: float, param: str | None = None) -> float:
    v = body.get(key)
    if v is None:
        return default
    x = _finite(v, param or key)
    if not lo <= x <= hi:
        raise bad(f"{param or key} must be in [{lo}, {hi}], got {x}", param or key)
    return x


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key} must be an integer, got {v!r}", key)
    if not lo <= v <= hi:
        raise bad(f"{key} must be in [{lo}, {hi}], got {v}", key)
    return v


def _array(v: Any, param: str) -> np.ndarray:
    try:
        a = np.asarray(v, np.float64)
    except (TypeError, ValueError):
        raise bad(f"{param} must be a list of numbers (or a bank entry name)", param) from None
    if a.dtype == object or a.size == 0:
        raise bad(f"{param} must be a non-empty list of numbers", param)
    if not np.all(np.isfinite(a)) or np.any(np.abs(a) > F32_MAX):
        raise bad(f"{param} contains NaN, infinity or numbers beyond float32's range", param, "non_finite")
    return a.astype(np.float32)


# --- interventions ---------------------------------------------------------------------------------
def _resolve_vector(v: Any, res: Resources, param: str) -> tuple[np.ndarray, str | None]:
    """A bank entry name or a list of numbers (``[D]`` or ``[N, D]``) -> ``([N, D], bank entry name or None)``;
    errors name ``param``."""
    if v is None:
        raise bad(f"{param} is required: a bank entry name or a list of {res.d_model} numbers", param)
    if isinstance(v, str):
        if v not in res.vectors:
            known = ", ".join(sorted(res.vectors)) or "none: start the server with --bank"
            raise bad(f"{param}: unknown vector {v!r}; this server has: {known}", param, "unknown_vector")
        return res.vectors[v], v
    a = _array(v, param)
    if a.ndim == 1 and a.shape[0] == res.d_model:
        return np.broadcast_to(a, (res.n_resid, res.d_model)).copy(), None
    if a.shape == (res.n_resid, res.d_model):
        return a, None
    raise bad(f"{param} has shape {list(a.shape)}; this model needs [{res.d_model}] (d_model) or "
              f"[{res.n_resid}, {res.d_model}] (one per resid point)", param, "wrong_dimension")


def _vector(spec: dict, res: Resources, param: str) -> tuple[np.ndarray, str | None]:
    """``spec["vector"]`` -> ``([N, D], bank entry name or None)``."""
    return _resolve_vector(spec.get("vector"), res, f"{param}.vector")


def _layer_weights(spec: dict, res: Resources, param: str) -> np.ndarray:
    raw = spec.get("layers", spec.get("layer"))
    if raw is None:
        raise bad(f"{param}.layers is required (resid indices 0..{res.n_resid - 1})", f"{param}.layers")
    items = raw if isinstance(raw, list) else [raw]
    if not items or any(isinstance(x, bool) or not isinstance(x, int) for x in items):
        raise bad(f"{param}.layers must be an integer or a non-empty list of integers, got {raw!r}", f"{param}.layers")
    out_of = [x for x in items if not 0 <= x < res.n_resid]
    if out_of:
        raise bad(f"{param}.layers {out_of} out of range: this model has resid[0..{res.n_resid - 1}] (resid[0] = "
                  "embeddings, resid[l] = output of block l-1)", f"{param}.layers", "layer_out_of_range")
    w = np.zeros(res.n_resid, np.float32)
    w[items] = 1.0
    return w


def _norm_units(vec: np.ndarray, entry: str | None, res: Resources, param: str, needs: str) -> np.ndarray:
    """``vec [N, D]`` in relative units: its unit direction times the bank entry's residual norm at each resid
    point (a 400 naming ``{param}.units`` when ``entry`` has no recorded norms; ``needs`` says what it needs)."""
    norms = res.norms.get(entry) if entry else None
    if norms is None:
        raise bad(f"{param}.units 'relative' needs {needs}", f"{param}.units")
    return vec / np.maximum(np.linalg.norm(vec, axis=-1, keepdims=True), 1e-12) * norms[:, None]


def parse_item(spec: Any, res: Resources, param: str) -> list[Item]:
    """One entry of ``interventions`` -> engine items (a preset may expand to several)."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, dict):
        raise bad(f"{param} must be an object (or a preset name), got {type(spec).__name__}", param)
    positions = spec.get("positions", "all")
    if positions not in POSITIONS:
        raise bad(f"{param}.positions {positions!r}; use one of {', '.join(POSITIONS)}", f"{param}.positions")
    if "preset" in spec:
        name = spec["preset"]
        if name not in res.presets:
            known = ", ".join(sorted(res.presets)) or "none: start the server with --preset NAME=FILE"
            raise bad(f"{param}: unknown preset {name!r}; this server has: {known}", f"{param}.preset", "unknown_preset")
        return [dataclasses.replace(it, positions=spec.get("positions", it.positions)) for it in res.presets[name]]
    kind = spec.get("kind")
    if kind not in ("steer", "cap", "ablate"):
        raise bad(f"{param}.kind must be 'steer', 'cap' or 'ablate', got {kind!r}", f"{param}.kind")
    vec, entry = _vector(spec, res, param)
    w = _layer_weights(spec, res, param)
    if kind == "steer":
        if "coeff" not in spec:
            raise bad(f"{param}.coeff is required for a steer", f"{param}.coeff")
        coeff = _finite(spec["coeff"], f"{param}.coeff")
        units = spec.get("units", "absolute")
        if units == "relative":
            vec = _norm_units(vec, entry, res, param, "a bank vector with recorded residual norms")
        elif units != "absolute":
            raise bad(f"{param}.units must be 'absolute' or 'relative', got {units!r}", f"{param}.units")
        if "positions" not in spec and entry:  # the positions the bank's steering setting was chosen at
            positions = res.default_positions.get(entry, positions)
        return [Item(vec.astype(np.float32), coeff, steer_w=w, positions=positions)]
    if np.any(np.linalg.norm(vec, axis=-1)[w > 0] == 0):
        raise bad(f"{param}.vector is zero at a chosen layer: it has no direction to {kind}", f"{param}.vector")
    if kind == "ablate":
        m = _finite(spec.get("mean", 0.0), f"{param}.mean")
        return [Item(vec, lo=np.full(res.n_resid, m, np.float32), hi=np.full(res.n_resid, m, np.float32), cap_w=w,
                     positions=positions)]
    lo_v, hi_v = spec.get("floor"), spec.get("ceiling")
    if lo_v is None and hi_v is None:
        raise bad(f"{param}: a cap needs a floor and/or a ceiling", f"{param}.floor")
    lo = -np.inf if lo_v is None else _finite(lo_v, f"{param}.floor")
    hi = np.inf if hi_v is None else _finite(hi_v, f"{param}.ceiling")
    if lo > hi:
        raise bad(f"{param}: floor {lo} is above the ceiling {hi}", f"{param}.floor")
    return [Item(vec, lo=np.full(res.n_resid, lo, np.float32), hi=np.full(res.n_resid, hi, np.float32), cap_w=w,
                 positions=positions)]


def parse_interventions(value: Any, res: Resources, param: str = "interventions") -> list[Item]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad(f"{param} must be a list of intervention objects", param)
    items = [it for i, spec in enumerate(value) for it in parse_item(spec, res, f"{param}[{i}]")]
    if len(items) > res.max_interventions:
        raise bad(f"{param}: {len(items)} interventions (presets expanded); this server takes at most "
                  f"{res.max_interventions} per request (--max-interventions)", param, "too_many_interventions")
    return items


def parse_readout(value: Any, res: Resources, param: str = "persona_readout") -> list[tuple[str, int, np.ndarray]]:
    """``["evil", {"vector": "optimistic", "layer": 12}, {"name": "x", "vector": [...], "layer": 8}]`` (or
    ``{"vectors": [...], "layer": L}``) -> ``(name, layer, unit [D])``."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = [{"vector": v, "layer": value.get("layer")} if isinstance(v, str) else v
                 for v in value.get("vectors", [])]
    if not isinstance(value, list) or not value:
        raise bad(f"{param} must be a non-empty list of bank vector names or objects", param)
    if len(value) > res.max_readout:
        raise bad(f"{param}: at most {res.max_readout} directions per request (--max-readout)", param)
    out = []
    for i, spec in enumerate(value):
        p = f"{param}[{i}]"
        spec = {"vector": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict):
            raise bad(f"{p} must be a vector name or an object", p)
        vec, entry = _vector(spec, res, p)
        layer = spec.get("layer")
        if layer is None:
            layer = res.default_layers.get(entry) if entry else None
            if layer is None:
                raise bad(f"{p}.layer is required (the bank records no chosen layer for it)", f"{p}.layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < res.n_resid:
            raise bad(f"{p}.layer must be an integer in 0..{res.n_resid - 1}, got {layer!r}", f"{p}.layer",
                      "layer_out_of_range")
        v = vec[layer]
        norm = float(np.linalg.norm(v))
        if norm == 0:
            raise bad(f"{p}.vector is zero at layer {layer}", f"{p}.vector")
        out.append((str(spec.get("name", entry or f"vector{i}")), layer, (v / norm).astype(np.float32)))
    return out


MIXTURE_KEYS = ("vectors", "layers", "layer", "alpha", "tau", "weights", "positions", "units")


def parse_mixture(value: Any, res: Resources, max_k: int, param: str = "mixture") -> MixSpec | None:
    """``{"vectors": [...], "layers": .., "alpha": .., "tau": .., "weights": .., "positions": .., "units": ..}``
    -> a :class:`~jaxpersona.serve.engine.MixSpec` (``vectors [K, N, D]``, ``2 <= K <= max_k``); None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"{param} must be an object with vectors, layers and alpha", param)
    unknown = sorted(set(value) - set(MIXTURE_KEYS))
    if unknown:
        raise bad(f"{param}: unknown field {unknown[0]!r}; a mixture takes {', '.join(MIXTURE_KEYS)}",
                  f"{param}.{unknown[0]}")
    raw = value.get("vectors")
    if not isinstance(raw, list) or not 2 <= len(raw) <= max_k:
        got = f"{len(raw)} vectors" if isinstance(raw, list) else repr(raw)
        raise bad(f"{param}.vectors must be a list of 2..{max_k} bank entry names or lists of {res.d_model} numbers "
                  f"(got {got}; this server mixes at most {max_k})", f"{param}.vectors",
                  "too_many_vectors" if isinstance(raw, list) and len(raw) > max_k else None)
    w = _layer_weights(value, res, param)
    units = value.get("units", "absolute")
    if units not in ("absolute", "relative"):
        raise bad(f"{param}.units must be 'absolute' or 'relative', got {units!r}", f"{param}.units")
    vecs = []
    for i, v in enumerate(raw):
        p = f"{param}.vectors[{i}]"
        vec, entry = _resolve_vector(v, res, p)
        if np.any(np.linalg.norm(vec, axis=-1)[w > 0] == 0):
            raise bad(f"{p} is zero at a chosen layer: it has no direction to mix", p)
        if units == "relative":
            vec = _norm_units(vec, entry, res, param, f"bank vectors with recorded residual norms; {p} is "
                              f"{'a list of numbers' if entry is None else f'bank entry {entry!r}, which has none'}")
        vecs.append(vec.astype(np.float32))
    if "alpha" not in value:
        raise bad(f"{param}.alpha is required (the strength of the mix)", f"{param}.alpha")
    alpha = _finite(value["alpha"], f"{param}.alpha")
    tau = _finite(value.get("tau", 1.0), f"{param}.tau")
    if tau <= 0:
        raise bad(f"{param}.tau must be > 0 (the softmax temperature), got {tau}", f"{param}.tau")
    weights = value.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(raw):
            raise bad(f"{param}.weights must be a list of {len(raw)} non-negative numbers (one per vector)",
                      f"{param}.weights")
        for i, x in enumerate(weights):
            if _finite(x, f"{param}.weights[{i}]") < 0:
                raise bad(f"{param}.weights[{i}] must be >= 0, got {x}", f"{param}.weights[{i}]")
        weights = np.asarray(weights, np.float32)
    positions = value.get("positions", "all")
    if positions not in POSITIONS:
        raise bad(f"{param}.positions {positions!r}; use one of {', '.join(POSITIONS)}", f"{param}.positions")
    return MixSpec(np.stack(vecs), alpha, w, tau, weights, positions)


def select_adapter(body: dict, res: Resources) -> tuple[str | None, int]:
    """The adapter a request selects — ``"model": "<adapter>"`` (vLLM's way) or ``"adapter": "<name>"`` (also in
    ``extra_body``) — as ``(name or None for the base model, index into the stack)``."""
    served = ", ".join(repr(s) for s in res.served())

    def pick(value: Any, param: str) -> str | None:
        if not isinstance(value, str):
            raise bad(f"{param} must be a string (one of {served})", param)
        if value == res.model_name:
            return None
        if value not in res.adapter_index:
            raise bad(f"{param} {value!r} is not served here; this server has: {served} (see /v1/models)", param,
                      "model_not_found", 404)
        return value

    model = body.get("model")
    chosen = None if model is None else pick(model, "model")
    requested = extension(body, "adapter")
    if requested is not None:
        ad = pick(requested, "adapter")
        if chosen is not None and ad != chosen:
            raise bad(f"model {model!r} is an adapter and adapter {requested!r} names another; select one (set model "
                      f"to {res.model_name!r} or leave adapter out)", "adapter")
        chosen = ad
    return chosen, (res.adapter_index[chosen] if chosen is not None else 0)


# --- whole requests --------------------------------------------------------------------------------
@dataclasses.dataclass
class Parsed:
    """A validated request: its choices (engine sequences) and how to answer."""

    kind: str  # "chat" or "completion"
    seqs: list[Sequence]
    events: queue.Queue
    stream: bool
    include_usage: bool
    prompt_tokens: int
    seed: int
    id: str
    created: int
    token_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"
    adapter: str | None = None  # the selected adapter (None = the base model); responses name it as "model"
    mixture: MixSpec | None = None


def extension(body: dict, key: str) -> Any:
    """A jaxpersona field of a request body: top level, or inside ``extra_body`` (how the OpenAI SDK sends it)."""
    if key in body:
        return body[key]
    extra = body.get("extra_body")
    return extra.get(key) if isinstance(extra, dict) else None


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        c = m.get("content")
        if isinstance(c, list):  # content parts: keep the text ones
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in c):
                raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            c = "".join(str(p.get("text", "")) for p in c)
        if not isinstance(c, str):
            raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": c})
    return out


def _stop(body: dict) -> tuple[str, ...]:
    s = body.get("stop")
    if s is None:
        return ()
    s = [s] if isinstance(s, str) else s
    if not isinstance(s, list) or len(s) > MAX_STOP or any(not isinstance(x, str) or not x for x in s):
        raise bad(f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return tuple(s)


def parse_request(kind: str, body: Any, res: Resources, model: Model, engine: Any) -> Parsed:
    """Validate a ``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions`` body."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    adapter, adapter_id = select_adapter(body, res)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be > 0", "top_p")
    n = _integer(body, "n", 1, 1, MAX_N)
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    seed = secrets.randbits(31) if seed is None else seed
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    stop = _stop(body)
    items = parse_interventions(extension(body, "interventions"), res)
    mix = parse_mixture(extension(body, "mixture"), res, min(res.max_mixture, engine.ecfg.max_mixture))
    readout = parse_readout(extension(body, "persona_readout"), res)
    if kind == "chat":
        max_tokens = _integer(body, "max_completion_tokens", None, 1, 1 << 30)
        max_tokens = _integer(body, "max_tokens", max_tokens, 1, 1 << 30)
        lp = body.get("logprobs", False)
        if not isinstance(lp, bool):
            raise bad("logprobs must be true or false for chat completions", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
        if top and not lp:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = top if lp else None
        msgs = _messages(body)
        try:
            ids, asst = model.tokens_and_role(msgs, "assistant")
        except errors.ChatTemplateError as e:
            raise bad(str(e), "messages") from None
        prompts, masks = [ids], [np.asarray(asst, bool)]
    elif kind == "completion":
        max_tokens = _integer(body, "max_tokens", 16, 1, 1 << 30)
        logprobs = _integer(body, "logprobs", None, 0, TOP_LOGPROBS)
        p = body.get("prompt")
        texts = [p] if isinstance(p, str) else p
        if not isinstance(texts, list) or not texts or any(not isinstance(t, str) or not t for t in texts):
            raise bad("prompt must be a non-empty string or a list of them", "prompt")
        if len(texts) * n > MAX_N:
            raise bad(f"{len(texts)} prompts x n={n} choices exceeds {MAX_N}", "prompt")
        prompts = [list(model.tokenizer.encode(t)) for t in texts]
        masks = [None] * len(prompts)
    else:  # pragma: no cover - the app only routes these two
        raise AssertionError(kind)
    for ids in prompts:
        if not ids:
            raise bad("the prompt encodes to no tokens", "prompt" if kind == "completion" else "messages")
    if max_tokens is None:  # chat default: whatever room the longest prompt leaves
        longest = max(len(ids) for ids in prompts)
        max_tokens = max(1, min(engine.ecfg.max_context - longest, 512))
    for ids in prompts:
        engine.check_fits(len(ids), max_tokens, "messages" if kind == "chat" else "prompt")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    events: queue.Queue = queue.Queue()
    base = jax.random.key(seed % (2**63))
    seqs = []
    for pi, (ids, mask) in enumerate(zip(prompts, masks)):
        for j in range(n):
            index = pi * n + j
            key = np.asarray(jax.random.key_data(jax.random.fold_in(base, index)), np.uint32)
            seqs.append(Sequence(index, ids, max_tokens, events, temperature=temperature, top_p=top_p, key=key,
                                 stop=stop, logprobs=logprobs, items=items, assistant_mask=mask, readout=readout,
                                 ignore_eos=ignore_eos, adapter=adapter, adapter_id=adapter_id, mixture=mix))
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    as_ids = body.get("return_tokens_as_token_ids", False)
    if not isinstance(as_ids, bool):
        raise bad("return_tokens_as_token_ids must be true or false", "return_tokens_as_token_ids")
    return Parsed(kind, seqs, events, stream, include_usage, sum(len(p) for p in prompts), seed,
                  prefix + uuid.uuid4().hex[:24], int(time.time()), as_ids, adapter, mix)


# --- answers ---------------------------------------------------------------------------------------
class Tokens:
    """Token ids -> the strings logprobs report (their text, or ``token_id:N`` when asked for ids)."""

    def __init__(self, tokenizer: Any, as_ids: bool) -> None:
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def name(self, tok: int) -> str:
        return f"token_id:{tok}" if self.as_ids else self.text(tok)

    def entry(self, tok: int, lp: float) -> dict[str, Any]:
        return {"token": self.name(tok), "logprob": lp, "bytes": list(self.text(tok).encode("utf-8"))}


def chat_logprobs(tokens: Tokens, entries: list[tuple]) -> dict[str, Any]:
    return {"content": [{**tokens.entry(t, lp), "top_logprobs": [tokens.entry(i, v) for i, v in tops]}
                        for t, lp, tops in entries]}


def completion_logprobs(tokens: Tokens, entries: list[tuple], offset: int = 0) -> dict[str, Any]:
    names, offs, pos = [], [], offset
    for t, _, _ in entries:
        names.append(tokens.name(t))
        offs.append(pos)
        pos += len(tokens.text(t))
    return {"tokens": names, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tokens.name(i): v for i, v in tops} for _, _, tops in entries], "text_offset": offs}


class Abandoned(Exception):
    """The request was given up (its client left, or it timed out) while a reader waited for its events."""


ABANDON = ("abandon", -1)  # put on a request's events to wake a reader that should stop (see :func:`abandon`)


def abandon(req: Parsed) -> None:
    """Give a request up: its choices are cancelled (each frees its row at the engine's next step, or is
    dropped from the queue) and a reader blocked in :func:`iter_events` raises :class:`Abandoned`."""
    for s in req.seqs:
        s.cancelled.set()
    req.events.put(ABANDON)


def iter_events(req: Parsed) -> Iterator[tuple]:
    """The request's engine events until every choice is done; an engine failure raises a 500 (503 when the
    server is shutting down); :func:`abandon` raises :class:`Abandoned`."""
    left = len(req.seqs)
    while left:
        ev = req.events.get()
        if ev[0] == "abandon":
            raise Abandoned()
        if ev[0] == "error" and "shutting down" in ev[2]:
            raise errors.RequestError(ev[2], status=503, kind="server_error", code="shutting_down")
        if ev[0] == "error":
            raise errors.RequestError(ev[2], status=500, kind="server_error", code="engine_failed")
        if ev[0] == "done":
            left -= 1
        yield ev


def _usage(req: Parsed, completion: int) -> dict[str, int]:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion,
            "total_tokens": req.prompt_tokens + completion}


def projection_fields(seq: Sequence, projections: list[list[float]] | None) -> dict[str, list[float]]:
    """Per-token readout ``[tokens][R]`` -> ``{readout name: [one float per token]}``."""
    rows = projections or []
    return {name: [p[j] for p in rows] for j, (name, _, _) in enumerate(seq.readout)}


def collect(req: Parsed, tokenizer: Any, model_name: str) -> dict[str, Any]:
    """A whole (non-streamed) response (``model``: the selected adapter, else ``model_name``)."""
    model_name = req.adapter or model_name
    tokens, n = Tokens(tokenizer, req.token_ids), len(req.seqs)
    texts, entries, finish, extra = [""] * n, [[] for _ in range(n)], [None] * n, [{} for _ in range(n)]
    for ev in iter_events(req):
        if ev[0] == "delta":
            texts[ev[1]] += ev[2]
            if ev[3] is not None:
                entries[ev[1]].append(ev[3])
        else:
            finish[ev[1]], extra[ev[1]] = ev[2], ev[3]
    choices = []
    for i in range(n):
        want = req.seqs[i].logprobs is not None
        c: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
        if req.kind == "chat":
            c["message"] = {"role": "assistant", "content": texts[i]}
            c["logprobs"] = chat_logprobs(tokens, entries[i]) if want else None
        else:
            c["text"] = texts[i]
            c["logprobs"] = completion_logprobs(tokens, entries[i]) if want else None
        if extra[i].get("readout"):
            c["persona_readout"] = extra[i]["readout"]
        choices.append(c)
    completion = sum(e.get("completion_tokens", 0) for e in extra)
    return {"id": req.id, "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": req.created, "model": model_name, "choices": choices, "usage": _usage(req, completion),
            "system_fingerprint": f"jaxpersona-seed-{req.seed}"}


def stream_chunks(req: Parsed, tokenizer: Any, model_name: str) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed response (``data:`` payloads before ``[DONE]``); ``model``: the selected
    adapter, else ``model_name``. With a readout every delta chunk's choice has ``persona_projection``."""
    model_name = req.adapter or model_name
    tokens = Tokens(tokenizer, req.token_ids)
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    head = {"id": req.id, "object": obj, "created": req.created, "model": model_name,
            "system_fingerprint": f"jaxpersona-seed-{req.seed}"}
    if req.kind == "chat":
        for s in req.seqs:
            yield {**head, "choices": [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
    completion, offsets = 0, [0] * len(req.seqs)
    for ev in iter_events(req):
        i = ev[1]
        if ev[0] == "delta":
            if not ev[2] and ev[3] is None:  # a token whose text is held back and no logprobs: nothing to send
                continue
            entry = [ev[3]] if ev[3] is not None else []
            if req.kind == "chat":
                c = {"index": i, "delta": {"content": ev[2]},
                     "logprobs": chat_logprobs(tokens, entry) if entry else None, "finish_reason": None}
            else:
                c = {"index": i, "text": ev[2], "finish_reason": None,
                     "logprobs": completion_logprobs(tokens, entry, offsets[i]) if entry else None}
                offsets[i] += len(ev[2])
            if req.seqs[i].readout:
                c["persona_projection"] = projection_fields(req.seqs[i], ev[4] if len(ev) > 4 else None)
            yield {**head, "choices": [c]}
        else:
            completion += ev[3].get("completion_tokens", 0)
            c = {"index": i, "finish_reason": ev[2], "logprobs": None}
            c.update({"delta": {}} if req.kind == "chat" else {"text": ""})
            if req.seqs[i].readout:
                c["persona_projection"] = projection_fields(req.seqs[i], ev[3].get("projection_rest"))
            if ev[3].get("readout"):  # per_token went out chunk by chunk
                c["persona_readout"] = {name: {k: v for k, v in r.items() if k != "per_token"}
                                        for name, r in ev[3]["readout"].items()}
            yield {**head, "choices": [c]}
    if req.include_usage:
        yield {**head, "choices": [], "usage": _usage(req, completion)}
