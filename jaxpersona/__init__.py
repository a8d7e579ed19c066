"""jaxpersona: persona vectors, persona space and interventions for language models, in pure JAX.

A model is a params pytree plus a frozen :class:`ModelConfig`; the forward is a pure function.

    >>> import jaxpersona as jp
    >>> model = jp.load()                       # embedded default: SmolLM2-135M-Instruct
    >>> model.chat("Hi!", system="You are terse.")
    >>> model.resid(["some text"], layers=(0, 10, 30), reduce="mean").shape   # [3, 1, 576]
"""

from jaxpersona import errors
from jaxpersona.config import ModelConfig, from_hf_config
from jaxpersona.generate import GenerateOutput, generate
from jaxpersona.model import Batch, Model, load
from jaxpersona.models.transformer import Capture, ForwardOutput, HookContext, KVCache, forward, init_params

__version__ = "0.1.0"
__all__ = [
    "Batch", "Capture", "ForwardOutput", "GenerateOutput", "HookContext", "KVCache", "Model", "ModelConfig",
    "errors", "forward", "from_hf_config", "generate", "init_params", "load",
]
