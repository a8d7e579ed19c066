"""jaxpersona: persona vectors, persona space and interventions for language models, in pure JAX.

A model is a params pytree plus a frozen :class:`ModelConfig`; the forward is a pure function.

    >>> import jaxpersona as jp
    >>> model = jp.load()                       # embedded default: SmolLM2-135M-Instruct
    >>> model.chat("Hi!", system="You are terse.")
    >>> model.resid(["some text"], layers=(0, 10, 30), reduce="mean").shape   # [3, 1, 576]
"""

import logging as _logging


def _drop_pytorch_not_found(record: _logging.LogRecord) -> bool:
    """transformers announces "PyTorch was not found. Models won't be available ..." on import when torch
    is absent. jaxpersona never uses transformers' (torch) models, so that advice is noise here; this
    filter drops exactly that record and nothing else (other transformers warnings still show)."""
    try:
        return not str(record.msg).startswith("PyTorch was not found")
    except Exception:  # noqa: BLE001 - a filter must never break logging
        return True


# The record is logged by the "transformers" logger itself, so a filter there (installed before
# transformers is first imported, which happens lazily inside jaxpersona) catches it.
_logging.getLogger("transformers").addFilter(_drop_pytorch_not_found)

from jaxpersona import errors  # noqa: E402
from jaxpersona.compute.batching import Batch  # noqa: E402
from jaxpersona.compute.generate import GenerateOutput, generate  # noqa: E402
from jaxpersona.compute.handle import Model, load  # noqa: E402
from jaxpersona.model.config import ModelConfig, from_hf_config  # noqa: E402
from jaxpersona.model.params import init_params  # noqa: E402
from jaxpersona.model.transformer import (  # noqa: E402
    Capture,
    ForwardOutput,
    HookContext,
    KVCache,
    forward,
)
from jaxpersona.version import __version__  # noqa: E402

__all__ = [
    "Batch", "Capture", "ForwardOutput", "GenerateOutput", "HookContext", "KVCache", "Model", "ModelConfig",
    "__version__", "errors", "forward", "from_hf_config", "generate", "init_params", "load",
]
