"""Every error jaxpersona raises on bad input. One module, one hierarchy.

Each message says what went wrong *and* what to do about it. The CLI maps any
:class:`JaxPersonaError` to a non-zero exit code with the message on stderr.
"""

from __future__ import annotations


class JaxPersonaError(Exception):
    """Base class of all jaxpersona errors."""

    exit_code: int = 2


# --- files and formats ------------------------------------------------------
class ModelNotFoundError(JaxPersonaError, FileNotFoundError):
    """A model path, registry name or required file does not exist."""


class CorruptCheckpointError(JaxPersonaError):
    """A weights file (GGUF, safetensors) is truncated, corrupt or unreadable."""


class UnsupportedQuantizationError(JaxPersonaError):
    """A GGUF tensor uses a quantization type jaxpersona cannot dequantize."""


# --- models and configs -----------------------------------------------------
class UnsupportedArchitectureError(JaxPersonaError):
    """The model family (HF ``model_type`` / GGUF ``general.architecture``) is not implemented."""


class UnsupportedConfigError(JaxPersonaError):
    """A config field has a value the forward does not honour (would silently change the model)."""


class ShapeMismatchError(JaxPersonaError):
    """Weights do not have the shapes the config implies."""


class UnsupportedDtypeError(JaxPersonaError):
    """A compute dtype other than float32 / bfloat16 was requested."""


# --- inputs -----------------------------------------------------------------
class InputError(JaxPersonaError, ValueError):
    """Bad user input: empty batch, malformed messages, invalid sampling settings, ..."""


class ContextLengthError(InputError):
    """Prompt (+ new tokens) is longer than the model's context window."""


class ChatTemplateError(InputError):
    """The tokenizer has no chat template, or the template rejected the messages."""


class TraitFileError(InputError):
    """A trait file is malformed: missing keys, too few pairs/questions, bad placeholders, ..."""


class FilterError(InputError):
    """No (or too few) contrastive pairs survived the judge filter, so no vector can be extracted."""


class ModelMismatchError(InputError):
    """A vector bank (or other artifact) was made for a different model: d_model or layer count differ."""


# --- remote endpoints ---------------------------------------------------------
class EndpointError(JaxPersonaError):
    """A configured HTTP endpoint (judge, generator) is unreachable, refuses, or returns unusable output
    (e.g. no logprobs). Finished work is kept; rerun to resume."""


class JudgeCheckError(InputError):
    """The judge failed its check on the trait's anchor answers (or could not be checked) while the run
    was configured to rely on it (forced thresholds). Finished work is kept."""


class RoleFileError(InputError):
    """A role file, role directory or question file is malformed (named in the message, with the fix)."""


class ConversationError(InputError):
    """A conversation script or transcript is malformed: non-alternating roles, an empty turn, no turns."""


# --- fine-tuning ----------------------------------------------------------------
class AdapterMismatchError(ModelMismatchError):
    """A LoRA adapter does not fit the model: another model's layer count / widths, or factors whose
    rank or targets disagree."""


class AdapterFormatError(InputError):
    """A peft adapter directory jaxpersona cannot represent or read: a config that is not JSON or asks for
    something beyond plain LoRA on q k v o gate up down (DoRA, ``modules_to_save``, ``lora_bias``, embedding
    LoRA, an init that rewrites the base weights, ...), or tensors that disagree with their config. The
    message names the field; nothing is half-loaded."""


class DatasetError(InputError):
    """A chat JSONL dataset is missing, empty or malformed (the message names file:line)."""


class ResumeMismatchError(InputError):
    """A run directory holds a training checkpoint made with a different config, data or model; resuming
    would silently mix two runs. Use a fresh output directory or the original settings."""


class TrainingError(JaxPersonaError):
    """Training diverged (NaN / inf loss). The message names the step; the last good checkpoint is kept."""


# --- scale ---------------------------------------------------------------------------
class MeshError(InputError):
    """A device mesh that cannot hold the model: larger than the devices present, or an axis that does
    not divide the heads / MLP width / vocabulary (the message says what would fit)."""


class MemoryPlanError(JaxPersonaError):
    """A model / batch / mesh that does not fit the accelerator's memory (found by the plan, before any
    weight is allocated). The message gives the per-device total and what would make it fit."""


class RequestError(InputError):
    """A bad request to ``jaxpersona serve``: answered with HTTP ``status`` and an OpenAI-shaped error body
    (``type``, ``param`` naming the offending field, ``code``); the server keeps serving."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# --- run directories ----------------------------------------------------------
class RunLockedError(JaxPersonaError):
    """Another process holds the run directory (two writers would interleave its caches)."""


class CacheWarning(UserWarning):
    """A cached stage file could not be read (cut short, corrupt) and is recomputed."""
