"""Orbax plumbing shared by every checkpoint writer (banks, adapters, trainer state)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


# --------------------------------------------------------------------------------------------------
# persistence helpers
# --------------------------------------------------------------------------------------------------
def load_orbax() -> Any:
    import orbax.checkpoint as ocp

    return ocp


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """Hide orbax's absl INFO/WARNING chatter for the duration of one save/restore (level restored after)."""
    import logging

    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(max(old, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(old)
