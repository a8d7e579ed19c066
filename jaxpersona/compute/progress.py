"""The one progress bar of long work (tqdm; ``enabled=False`` turns it off)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over ``total`` units named ``desc``; disabled (drawn nowhere) unless ``enabled``."""
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
