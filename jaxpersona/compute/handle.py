"""The user-facing handle: ``load()`` a model by registry name, HF directory or GGUF file, then
chat, generate, score and capture residual activations with a few calls.

``Model`` is a thin shell around the pure functions (``forward``, ``generate``): it owns the
tokenizer and chat template, pads batches on the left, and buckets prompt lengths so repeated
calls reuse compiled code. Everything numerical stays in the pure functions.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpersona import errors
from jaxpersona.artifacts.adapters import adapter_digest
from jaxpersona.artifacts.records import digest
from jaxpersona.compute.batching import BUCKET, Batch, pad_left
from jaxpersona.compute.generate import GenerateOutput, generate
from jaxpersona.data.chat import Message, conversation
from jaxpersona.edit.interventions import check_for_model, check_hook_argument, whole_indices
from jaxpersona.model import registry
from jaxpersona.model.config import ModelConfig, parse_dtype
from jaxpersona.model.loaders.gguf import convert_gguf_to_hf_dir
from jaxpersona.model.loaders.hf import load_hf_dir, load_hf_dir_sharded, load_tokenizer
from jaxpersona.model.lora import Adapter, check_adapter
from jaxpersona.model.params import Params, activation_dtype, matmul_weight_dtype, with_matmul_dtype
from jaxpersona.model.transformer import (
    Capture,
    Hook,
    Reduce,
    check_context,
    check_tokens,
    forward,
)


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "logits"))
def _forward_jit(params, cfg, tokens, valid, capture_mask, hook, adapter, *, capture, logits):
    return forward(params, cfg, tokens, valid=valid, capture=capture, capture_mask=capture_mask, hook=hook, logits=logits,
                   adapter=adapter)


@dataclasses.dataclass
class Model:
    """A loaded model: ``cfg`` (static), ``params`` (pytree of the plain weights), ``tokenizer`` (HF), ``name``,
    and ``adapter``: a LoRA :class:`~jaxpersona.model.lora.Adapter` applied beside the weights (``None``: the
    base model; set it with :meth:`with_adapter`)."""

    cfg: ModelConfig
    params: Params
    tokenizer: Any
    name: str = ""
    adapter: Adapter | None = None

    def base_only(self, what: str) -> None:
        """Raise :class:`~jaxpersona.errors.InputError` when an adapter is set: ``what`` reads ``params`` alone and
        would silently ignore it."""
        if self.adapter is not None:
            raise errors.InputError(f"{what} runs the base weights only; it does not apply a LoRA adapter (model "
                                    f"{self.name}): pass the base model")

    def with_adapter(self, adapter: Adapter, label: str | None = None) -> Model:
        """This model with a LoRA adapter beside its params (no weight copied; ``params`` unchanged): every
        method passes it to the forward / generation. It replaces any adapter already set. The name gains
        ``+label`` (default: the adapter's digest) so cached work never mixes the two."""
        if not isinstance(adapter, Adapter):
            raise errors.InputError(f"with_adapter needs one LoRA Adapter, got {type(adapter).__name__} (an "
                                    "AdapterStack is selected per example: pass it to score_conditions)")
        check_adapter(adapter, self.cfg)
        return dataclasses.replace(self, adapter=adapter,
                                   name=f"{self.name}+{label or 'lora:' + adapter_digest(adapter)}")

    # --- text <-> tokens ------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, self.cfg.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def format_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Render one conversation with the tokenizer's chat template.

        Templates without a system role (Gemma) get the system prompt prefixed to the first user turn.
        """
        import jinja2

        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise errors.ChatTemplateError(
                f"model {self.name or self.cfg.family!r} has no chat template (a base model?); "
                "pass raw text prompts instead (chat=False; on the command line `jaxpersona generate --raw`)"
            )
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise errors.ChatTemplateError(f"each message needs 'role' and 'content', got {m!r}")
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            if messages and messages[0]["role"] == "system" and len(messages) > 1 and messages[1]["role"] == "user":
                merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
                return self.format_chat([merged, *messages[2:]], add_generation_prompt)
            raise errors.ChatTemplateError(f"the chat template rejected the messages: {e}") from e

    def encode(self, texts: list[str] | str, *, chat: bool = False, system: str | None = None,
               bucket: int = BUCKET) -> Batch:
        """Tokenize prompts (one string = a batch of one; ``chat=True``: each text is a user turn, optional
        system prompt)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise errors.InputError("empty batch: give at least one prompt")
        if chat:
            texts = [self.format_chat(conversation(t, system)) for t in texts]
            ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        else:
            ids = [self.tokenizer.encode(t) for t in texts]
        return pad_left(ids, self.pad_id, bucket)

    def chat_ids(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """Token ids of each conversation rendered with the chat template (ending in the assistant's turn prompt)."""
        return [self.tokenizer.encode(self.format_chat(list(c)), add_special_tokens=False) for c in conversations]

    def pair_ids(self, conversations: Sequence[Sequence[Message]], responses: Sequence[str]
                 ) -> list[tuple[list[int], list[int]]]:
        """``(prompt ids, response ids)`` per row; the response is re-tokenized from its text (as persona_vectors
        does; an empty response has no ids)."""
        if len(conversations) != len(responses):  # zip would drop the extra rows without a word
            raise errors.InputError(f"need one response per conversation, got {len(conversations)} conversations and "
                                    f"{len(responses)} responses")
        return [(p, self.tokenizer.encode(r, add_special_tokens=False) if r else [])
                for p, r in zip(self.chat_ids(conversations), responses)]

    def encode_conversations(self, conversations: list[list[Message]], bucket: int = BUCKET) -> Batch:
        """Chat-templated conversations as a left-padded batch."""
        return pad_left(self.chat_ids(conversations), self.pad_id, bucket)

    def content_spans(self, conv: list[Message], add_generation_prompt: bool = True
                      ) -> tuple[str, Any, list[tuple[int, str, int, int]]]:
        """The rendered conversation, its tokenization (with character offsets) and, for each message whose
        content is found in the rendered text (searched in order), ``(message index, role, start, end)``."""
        text = self.format_chat(conv, add_generation_prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, pos = [], 0
        for i, m in enumerate(conv):
            start = text.find(m["content"], pos) if m["content"] else -1
            if start < 0:
                continue
            pos = start + len(m["content"])
            spans.append((i, m["role"], start, pos))
        return text, enc, spans

    def tokens_and_role(self, conv: list[Message], role: str, add_generation_prompt: bool = True
                        ) -> tuple[list[int], list[bool]]:
        """One conversation's token ids and, per token, whether it lies in a ``role`` message's content."""
        _, enc, located = self.content_spans(conv, add_generation_prompt)
        found = {i for i, _, _, _ in located}
        if any(m["role"] == role and m["content"] and i not in found for i, m in enumerate(conv)):
            raise errors.ChatTemplateError(f"could not locate a {role!r} message's content in the rendered chat template")
        spans = [(a, b) for _, r, a, b in located if r == role]
        return list(enc["input_ids"]), [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]

    def role_mask(self, conversations: list[list[Message]], role: str, *, add_generation_prompt: bool = True,
                  bucket: int = BUCKET) -> tuple[Batch, np.ndarray]:
        """Tokens of one chat role's *content* (template tokens excluded): ``(batch, mask [B, T])``.

        Spans come from the rendered template: each message's content is located in the rendered
        text in order, and tokens whose characters fall inside it are selected.
        """
        seqs, masks = zip(*(self.tokens_and_role(conv, role, add_generation_prompt) for conv in conversations))
        batch = pad_left(list(seqs), self.pad_id, bucket)
        mask = np.zeros_like(batch.valid)
        for i, sel in enumerate(masks):
            mask[i, mask.shape[1] - len(sel):] = sel
        return batch, mask

    def decode(self, out: GenerateOutput) -> list[str]:
        toks = np.asarray(out.tokens)
        lengths = np.asarray(out.lengths)
        eos = set(self.eos_ids)
        texts = []
        for row, n in zip(toks, lengths):
            row = [int(t) for t in row[:n] if int(t) not in eos]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    # --- computation ----------------------------------------------------------------------
    def _check_hook(self, hook: Hook | None, batch: Batch) -> None:
        """A hook an argument of the jitted forward can take, fitting this model and ``batch``."""
        if hook is not None:
            check_hook_argument(hook, "hook")
            check_for_model(hook, self.cfg.d_model, self.cfg.n_resid, np.shape(batch.tokens))

    def check_length(self, batch: Batch, new_tokens: int = 0) -> None:
        """Refuse a batch whose longest prompt (valid tokens, not bucket padding) + new tokens
        exceeds the context; also checks shapes and token ids."""
        _, valid = check_tokens(self.cfg, batch.tokens, batch.valid)
        check_context(self.cfg, valid, new_tokens)

    def run(
        self,
        batch: Batch,
        *,
        capture: Capture | None = None,
        capture_mask: np.ndarray | None = None,
        hook: Hook | None = None,
        logits: bool | str = True,
    ):
        """Jitted :func:`~jaxpersona.model.transformer.forward` on a batch. ``logits``: True (every position),
        ``"last"`` or False."""
        self.check_length(batch)
        self._check_hook(hook, batch)
        if capture is not None:
            capture.validate(self.cfg)
        if logits not in (True, False, "last"):
            raise errors.InputError(f"logits must be True, False or 'last', got {logits!r}")
        cmask = batch.valid if capture_mask is None else capture_mask
        if np.shape(cmask) != np.shape(batch.tokens):
            raise errors.InputError(f"capture_mask has shape {np.shape(cmask)}; the batch is {np.shape(batch.tokens)}")
        return _forward_jit(
            self.params, self.cfg, jnp.asarray(batch.tokens), jnp.asarray(batch.valid), jnp.asarray(cmask, bool), hook,
            self.adapter, capture=capture, logits=logits,
        )

    def resid(
        self,
        texts: list[str] | str,
        layers: tuple[int, ...] | list[int],
        reduce: Reduce = "mean",
        *,
        chat: bool = False,
        system: str | None = None,
    ) -> np.ndarray:
        """Residual stream at ``resid[l]`` for each ``l`` in ``layers``: ``[n, B, D]`` (or ``[n, B, T, D]``)."""
        batch = self.encode(texts, chat=chat, system=system)
        idx = tuple(int(l) for l in whole_indices(layers, "resid layers")) if len(layers) else ()  # 1.7 is not resid[1]
        out = self.run(batch, capture=Capture(idx, reduce), logits=False)
        return np.asarray(out.captured.astype(jnp.float32))

    def generate(
        self,
        prompts: list[str] | str,
        *,
        chat: bool = True,
        system: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        hook: Hook | None = None,
    ) -> list[str]:
        """Generate a completion for each prompt (chat-formatted by default). Same seed -> same text."""
        batch = self.encode(prompts, chat=chat, system=system)
        return self.decode(self.generate_tokens(batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                                top_p=top_p, seed=seed, hook=hook))

    def generate_tokens(self, batch: Batch, *, max_new_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, hook: Hook | None = None) -> GenerateOutput:
        self.check_length(batch, max_new_tokens)
        self._check_hook(hook, batch)
        try:
            seed = operator.index(seed)  # an int, a numpy or 0-d JAX integer
        except TypeError:
            raise errors.InputError(f"seed must be an int (the key is made from it), got {type(seed).__name__}") from None
        return generate(
            self.params, self.cfg, batch.tokens, batch.valid, max_new_tokens=max_new_tokens,
            key=jax.random.key(seed), temperature=temperature, top_p=top_p, eos_ids=self.eos_ids,
            pad_id=self.pad_id, hook=hook, adapter=self.adapter,
        )

    def chat(self, message: str | list[Message], *, system: str | None = None, **kw: Any) -> str:
        """One chat reply. ``message``: a user string or a whole conversation (list of messages)."""
        conv = conversation(message, system) if isinstance(message, str) else list(message)
        batch = self.encode_conversations([conv])
        return self.decode(self.generate_tokens(batch, **kw))[0]


def load(name_or_path: str | Path = registry.DEFAULT_MODEL, dtype: Any = "float32", mesh: Any = None,
         matmul_dtype: Any = None) -> Model:
    """Load a registered model name, an HF model directory, or a ``.gguf`` file.

    GGUF files are converted once to an HF directory under :func:`jaxpersona.model.registry.cache_dir`.
    ``mesh``: a ``(data, model)`` mesh (:func:`jaxpersona.model.sharding.make_mesh`) to load the weights onto,
    tensor parallel; each process reads only its own shards (:func:`~jaxpersona.model.loaders.hf.load_hf_dir_sharded`).
    ``dtype``: the activations' (and by default every weight's) dtype. ``matmul_dtype``: store and multiply the
    matmul weights in this dtype instead, accumulating in ``dtype`` — ``dtype="float32", matmul_dtype="bfloat16"``
    is mixed precision (:func:`~jaxpersona.model.params.with_matmul_dtype`): the residual stream, norms, softmax
    and KV cache stay float32, the products take bfloat16 inputs.
    """
    dtype = parse_dtype(dtype)
    mm = parse_dtype(matmul_dtype) if matmul_dtype is not None else dtype
    if jnp.finfo(mm).bits > jnp.finfo(dtype).bits:
        raise errors.UnsupportedDtypeError(f"matmul_dtype {jnp.dtype(mm).name} is wider than dtype {jnp.dtype(dtype).name}; "
                                           "the matmul weights can only be stored narrower than the activations")
    src = weights_source(name_or_path)
    cfg, params = _load_dir(src.path, dtype, mesh)
    if mm != dtype:
        params = with_matmul_dtype(params, mm)
    return Model(cfg, params, load_tokenizer(src.path), str(name_or_path))


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where :func:`load` reads a model from: ``path``, an HF directory; ``kind``: ``"hf"`` (the user's HF
    directory) or ``"gguf"`` (a float32 de-quantisation of the GGUF ``origin``, converted once into the cache)."""

    path: Path
    kind: str
    origin: Path


def weights_source(name_or_path: str | Path = registry.DEFAULT_MODEL) -> WeightsSource:
    """The HF directory a registered name, HF directory or ``.gguf`` file is loaded from (a GGUF is converted on
    first use, as :func:`load` does)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in registry.REGISTRY:
        gguf_path = registry.resolve(name)
    elif path.is_dir():
        return WeightsSource(path, "hf", path)
    elif path.suffix == ".gguf":
        if not path.exists():
            raise errors.ModelNotFoundError(f"GGUF file {path} does not exist")
        gguf_path = path
    else:
        registry.resolve(name)  # raises a clear ModelNotFoundError
        raise AssertionError("unreachable")
    hf_dir = registry.converted_dir(gguf_path)
    if not (hf_dir / "config.json").exists():
        with registry.cache_lock(hf_dir):  # another process converting the same file: wait, then use its work
            if not (hf_dir / "config.json").exists():
                convert_gguf_to_hf_dir(gguf_path, hf_dir)
    return WeightsSource(hf_dir, "gguf", gguf_path)


def _load_dir(path: Path, dtype: Any, mesh: Any) -> tuple[ModelConfig, Params]:
    if mesh is None:
        return load_hf_dir(path, dtype)

    return load_hf_dir_sharded(path, mesh, dtype=dtype)



def model_fingerprint(model: Model) -> str:
    """Identity of a model for cache keys: name, config and a sample of the weights (so a run directory
    reused with another model never serves the first model's generations)."""
    emb = np.asarray(model.params["embed"][:8], np.float32)
    mm = matmul_weight_dtype(model.params)
    # float32 models keep their fingerprints (old run directories resume); a mixed-precision one gets its own
    precision = () if mm == activation_dtype(model.params) else (f"matmul {jnp.dtype(mm).name}",)
    return digest(model.name, repr(model.cfg), emb.tobytes().hex(), *precision)
