"""PNG plots of pipeline results (matplotlib, headless ``Agg`` backend; no global style changes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _figure(**kw: Any) -> Any:
    from matplotlib.figure import Figure  # an explicit Figure: no pyplot state, no display needed

    return Figure(**kw)


def steering_curves(steering: dict[str, dict[str, dict[str, Any]]], path: str | Path, *, title: str = "",
                    best: int | None = None) -> Path:
    """Trait score (left) and coherence (right) vs steering coefficient, one line per layer.

    ``steering``: ``{layer: {coeff: {"trait": float|None, "coherence": float|None}}}``.
    """
    fig = _figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for layer, row in steering.items():
        cs = sorted(row, key=float)
        for ax, key in zip(axes, ("trait", "coherence")):
            xs = [float(c) for c in cs if row[c][key] is not None]
            ys = [row[c][key] for c in cs if row[c][key] is not None]
            lw = 2.5 if best is not None and int(layer) == best else 1.2
            ax.plot(xs, ys, marker="o", lw=lw, label=f"resid[{layer}]" + (" (best)" if lw > 2 else ""))
    for ax, key in zip(axes, ("trait score", "coherence")):
        ax.set_xlabel("steering coefficient")
        ax.set_ylabel(f"mean judged {key} (0-100)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def monitor_scatter(projection: Sequence[float], score: Sequence[float | None], labels: Sequence[str],
                    path: str | Path, *, title: str = "", r: float | None = None) -> Path:
    """Projection of the last prompt token vs judged trait score, coloured by system prompt."""
    fig = _figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    for lab in dict.fromkeys(labels):
        pts = [(p, s) for p, s, l in zip(projection, score, labels) if l == lab and s is not None]
        if pts:
            ax.scatter([p for p, _ in pts], [s for _, s in pts], label=lab, s=18, alpha=0.8)
    ax.set_xlabel("projection of last prompt token onto unit persona vector")
    ax.set_ylabel("judged trait score (0-100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="system prompt")
    ax.set_title(title + (f"\nPearson r = {r:.3f}" if r is not None else ""), fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)
