"""jaxpersona: persona vectors, persona space and interventions for language models, in pure JAX.

A model is a params pytree plus a frozen :class:`ModelConfig`; the forward is a pure function.
Everything a user composes in Python is importable from here (``__all__``); each name lives in its
layer (``model``, ``edit``, ``artifacts``, ``compute``, ``pipelines``):

    >>> import jaxpersona as jp
    >>> model = jp.load()                       # embedded default: SmolLM2-135M-Instruct
    >>> model.chat("Hi!", system="You are terse.")
    >>> model.resid(["some text"], layers=(0, 10, 30), reduce="mean").shape   # [3, 1, 576]
    >>> v = jp.contrast_vectors(model, ["You are joyful."], ["You are gloomy."])  # [L+1, D]
"""

import importlib as _importlib
import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any


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
from jaxpersona.artifacts.bank import VectorBank  # noqa: E402
from jaxpersona.compute.activations import contrast_vectors  # noqa: E402
from jaxpersona.compute.batching import Batch  # noqa: E402
from jaxpersona.compute.generate import GenerateOutput, generate  # noqa: E402
from jaxpersona.compute.handle import Model, load  # noqa: E402
from jaxpersona.compute.scoring import ScoringSet  # noqa: E402
from jaxpersona.compute.sweep import Grid, run_sweep  # noqa: E402
from jaxpersona.compute.train import TrainConfig, train  # noqa: E402
from jaxpersona.edit.capping import CapConfig  # noqa: E402
from jaxpersona.edit.interventions import (  # noqa: E402
    Ablate,
    Cap,
    Chain,
    Mixture,
    Positions,
    Steer,
    ablate,
    cap,
    layer_weights,
    steer,
)
from jaxpersona.model.config import ModelConfig, from_hf_config  # noqa: E402
from jaxpersona.model.lora import Adapter, LoraConfig  # noqa: E402
from jaxpersona.model.params import init_params  # noqa: E402
from jaxpersona.model.transformer import (  # noqa: E402
    Capture,
    ForwardOutput,
    HookContext,
    KVCache,
    forward,
)
from jaxpersona.version import __version__  # noqa: E402

# The pipelines load on first use (PEP 562 ``__getattr__``): they pull in their whole stack (optax for
# BiPO, TOML configs, judges), which a program that only steers, captures or sweeps never needs, and
# ``import jaxpersona`` stays as cheap as the model layer.
_LAZY = {
    "run_extract": "jaxpersona.pipelines.persona", "run_extract_all": "jaxpersona.pipelines.persona",
    "ExtractConfig": "jaxpersona.pipelines.persona", "run_space": "jaxpersona.pipelines.space",
    "SpaceConfig": "jaxpersona.pipelines.space", "run_consistency": "jaxpersona.pipelines.consistency",
    "ConsistencyConfig": "jaxpersona.pipelines.consistency", "run_regimes": "jaxpersona.pipelines.regimes",
    "RegimesConfig": "jaxpersona.pipelines.regimes", "screen_dataset": "jaxpersona.pipelines.screen",
}

if _TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from jaxpersona.pipelines.consistency import ConsistencyConfig, run_consistency
    from jaxpersona.pipelines.persona import ExtractConfig, run_extract, run_extract_all
    from jaxpersona.pipelines.regimes import RegimesConfig, run_regimes
    from jaxpersona.pipelines.screen import screen_dataset
    from jaxpersona.pipelines.space import SpaceConfig, run_space


def __getattr__(name: str) -> _Any:
    """A pipeline name, imported from its module on first use (then cached in the package namespace)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxpersona' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    # the model: load one, or build one from a config; the pure forward and what it returns
    "load", "Model", "ModelConfig", "from_hf_config", "init_params", "forward", "ForwardOutput", "Capture",
    "KVCache", "HookContext", "Batch", "generate", "GenerateOutput",
    # interventions on the residual stream
    "Steer", "Ablate", "Cap", "Chain", "Mixture", "Positions", "steer", "ablate", "cap", "layer_weights",
    "CapConfig",
    # vectors, sweeps, training
    "VectorBank", "contrast_vectors", "Grid", "ScoringSet", "run_sweep", "LoraConfig", "Adapter", "train",
    "TrainConfig",
    # the pipelines, each a function with its config
    "run_extract", "run_extract_all", "ExtractConfig", "run_space", "SpaceConfig", "run_consistency",
    "ConsistencyConfig", "run_regimes", "RegimesConfig", "screen_dataset",
    # errors and version
    "errors", "__version__",
]
