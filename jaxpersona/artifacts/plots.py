"""PNG plots of pipeline results (matplotlib, headless ``Agg`` backend; no global style changes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _figure(**kw: Any) -> Any:
    from matplotlib.figure import (
        Figure,  # an explicit Figure: no pyplot state, no display needed
    )

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
                    path: str | Path, *, title: str = "", r: float | None = None,
                    ylabel: str = "judged trait score (0-100)") -> Path:
    """Projection of the last prompt token vs a trait score, coloured by system prompt."""
    fig = _figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    for lab in dict.fromkeys(labels):
        pts = [(p, s) for p, s, l in zip(projection, score, labels) if l == lab and s is not None]
        if pts:
            ax.scatter([p for p, _ in pts], [s for _, s in pts], label=lab, s=18, alpha=0.8)
    ax.set_xlabel("projection of last prompt token onto unit persona vector")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="system prompt")
    ax.set_title(title + (f"\nPearson r = {r:.3f}" if r is not None else ""), fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def steering_judge_free(results: dict[str, dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Per trait (one row each): the judge-free trait score change (left; 95% band at the best layer)
    and the fraction of incoherent generations (right) vs coefficient, one line per layer; the
    coherence cliff of the best layer is a dashed vertical line.

    ``results``: ``{trait: {"table": {layer: {coeff: cell}}, "choice": evaluate.choose_layer(...)}}``."""
    n = len(results)
    fig = _figure(figsize=(10, 3.2 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False)
    for (trait, res), (ax_t, ax_c) in zip(results.items(), axes):
        best, cliff = res["choice"].get("best_layer"), res["choice"].get("cliff")
        for layer, row in res["table"].items():
            cs = sorted(row, key=float)
            xs = [float(c) for c in cs]
            is_best = best is not None and int(layer) == best
            lw = 2.5 if is_best else 1.2
            label = f"resid[{layer}]" + (" (best)" if is_best else "")
            line = ax_t.plot(xs, [row[c]["delta"] for c in cs], marker="o", lw=lw, label=label)[0]
            if is_best:
                ax_t.fill_between(xs, [row[c]["delta_lo"] for c in cs], [row[c]["delta_hi"] for c in cs],
                                  color=line.get_color(), alpha=0.15)
            bad = [c for c in cs if not row[c]["coherent"]]
            ax_t.scatter([float(c) for c in bad], [row[c]["delta"] for c in bad], marker="x", color="k", s=30, zorder=3)
            ax_c.plot(xs, [row[c]["bad_frac"] for c in cs], marker="o", lw=lw, label=label)
        for ax in (ax_t, ax_c):
            if cliff is not None:
                ax.axvline(cliff, ls="--", color="r", lw=1, label=f"cliff (best layer): {cliff:g}")
            ax.set_xlabel("steering coefficient")
            ax.grid(alpha=0.3)
        ax_t.axhline(0, color="grey", lw=0.8)
        ax_t.set_ylabel("Δ lp(pos) − lp(neg) [nats/token]")
        ax_t.set_title(f"{trait}: judge-free trait score (x = incoherent)", fontsize=10)
        ax_c.set_ylabel("fraction of incoherent generations")
        ax_c.set_ylim(-0.03, 1.03)
        ax_c.set_title(f"{trait}: judge-free coherence", fontsize=10)
        ax_t.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return Path(path)


# --- persona space ------------------------------------------------------------------------------
def persona_map(scores: Any, names: Sequence[str], default_pc1: float, default_pc2: float, path: str | Path, *,
                title: str = "") -> Path:
    """Roles on PC1/PC2 (``scores [R, 2]``) with their labels; the default Assistant as a star."""
    import numpy as np

    s = np.asarray(scores, float)
    fig = _figure(figsize=(11, 8), layout="constrained")
    ax = fig.subplots()
    ax.scatter(s[:, 0], s[:, 1], s=14, c=s[:, 0], cmap="coolwarm")
    for (x, y), n in zip(s, names):
        ax.annotate(n, (x, y), fontsize=6, alpha=0.8, xytext=(2, 2), textcoords="offset points")
    ax.scatter([default_pc1], [default_pc2], marker="*", s=250, c="k", label="default Assistant")
    ax.set_xlabel("PC1 (oriented toward the Assistant Axis)")
    ax.set_ylabel("PC2")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def variance_curve(variance_ratio: Any, path: str | Path, *, fraction: float = 0.7, title: str = "") -> Path:
    """Cumulative variance explained by the leading components, with the ``fraction`` line."""
    import numpy as np

    r = np.asarray(variance_ratio, float)
    k = min(len(r), 40)
    cum = np.cumsum(r)[:k]
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(1, k + 1), r[:k], alpha=0.5, label="per component")
    ax.plot(np.arange(1, k + 1), cum, marker="o", ms=3, label="cumulative")
    ax.axhline(fraction, color="gray", ls="--", lw=1, label=f"{fraction:.0%}")
    ax.set_xlabel("component")
    ax.set_ylabel("fraction of variance")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def cos_by_layer(cos: Any, path: str | Path, *, mark: int | None = None, title: str = "") -> Path:
    """``|cos(axis, PC1)|`` per resid point."""
    import numpy as np

    c = np.abs(np.asarray(cos, float))
    fig = _figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(len(c)), c, marker="o", ms=3)
    if mark is not None:
        ax.axvline(mark, color="gray", ls="--", lw=1, label=f"resid[{mark}]")
        ax.legend(fontsize=8)
    ax.set_xlabel("resid index")
    ax.set_ylabel("|cos(Assistant Axis, PC1)|")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def drift_traces(records: Sequence[dict[str, Any]], path: str | Path, *, labels: Sequence[str] = (), title: str = "") -> Path:
    """Per-turn projection of assistant turns, one panel per script, variants overlaid (the probe turn
    marked); one row per monitored point."""
    scripts = list(dict.fromkeys(r["script"] for r in records))
    variants = list(dict.fromkeys(r["variant"] for r in records))
    n_mon = max((len(r["proj"]) for r in records if r["proj"]), default=1)
    fig = _figure(figsize=(3.2 * len(scripts), 2.8 * n_mon), layout="constrained")
    axes = fig.subplots(n_mon, len(scripts), squeeze=False)
    for j, s in enumerate(scripts):
        for i in range(n_mon):
            ax = axes[i][j]
            for v in variants:
                rs = sorted((r for r in records if r["script"] == s and r["variant"] == v and r["proj"]),
                            key=lambda r: r["turn"])
                ax.plot([r["turn"] for r in rs], [r["proj"][i] for r in rs], marker="o", ms=3, label=v)
                probe = [r for r in rs if r["probe"]]
                if probe:
                    ax.scatter([probe[0]["turn"]], [probe[0]["proj"][i]], marker="s", s=30, edgecolors="k")
            ax.set_title(s if i == 0 else "", fontsize=9)
            ax.set_xlabel("assistant turn (last: identity probe)" if i == n_mon - 1 else "")
            if j == 0:
                ax.set_ylabel(f"projection at {labels[i]}" if i < len(labels) else "projection")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def ratio_by_temperature(results: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Within/between variance ratio (with intervals) against the sampling temperature, one line per measure
    (``results``: ``{temperature: {"measures": {name: {ratio, ratio_lo, ratio_hi}}}}``; at most 6 measures)."""
    temps = sorted(results, key=float)
    names = list(next(iter(results.values()))["measures"])[:6]
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for n in names:
        ms = [results[t]["measures"][n] for t in temps]
        x = [float(t) for t in temps]
        ax.errorbar(x, [m["ratio"] for m in ms], yerr=[[m["ratio"] - m["ratio_lo"] for m in ms],
                                                        [m["ratio_hi"] - m["ratio"] for m in ms]],
                    marker="o", capsize=3, label=n)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("within / between persona variance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def regime_cosines(summary: dict[str, Any], path: str | Path) -> Path:
    """Per resid point: cos(prompt-regime, fine-tune-regime vector) with its bootstrap band, the split-half
    nulls within each regime, and the BiPO cosines at their layers."""
    import numpy as np

    per = summary["cosines"]["per_layer"]["prompt_vs_finetune"]
    null = summary["cosines"]["null"]
    x = np.arange(len(per["cos"]))
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(x, per["cos"], marker="o", ms=3, label="prompt vs fine-tune")
    ax.fill_between(x, per["lo"], per["hi"], alpha=0.2)
    for name, style in (("prompt", ":"), ("finetune", "--")):
        ax.plot(x, null[name]["median"], ls=style, color="gray", lw=1, label=f"null: split-half {name}")
    for b in summary["cosines"]["bipo"]:
        ax.errorbar([b["layer"]], [b["prompt_vs_bipo"][0]],
                    yerr=[[b["prompt_vs_bipo"][0] - b["prompt_vs_bipo"][1]], [b["prompt_vs_bipo"][2] - b["prompt_vs_bipo"][0]]],
                    fmt="s", color="C3", label="prompt vs BiPO" if b is summary["cosines"]["bipo"][0] else None)
        ax.errorbar([b["layer"]], [b["finetune_vs_bipo"][0]],
                    yerr=[[b["finetune_vs_bipo"][0] - b["finetune_vs_bipo"][1]], [b["finetune_vs_bipo"][2] - b["finetune_vs_bipo"][0]]],
                    fmt="^", color="C2", label="fine-tune vs BiPO" if b is summary["cosines"]["bipo"][0] else None)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("resid index")
    ax.set_ylabel("cosine")
    ax.set_ylim(-1.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{summary['trait']}: one persona under three regimes ({summary['model']})", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def shift_vs_trait(summary: dict[str, Any], path: str | Path) -> Path:
    """Fine-tuning shift (projection on the prompt vector) vs judge-free trait change, one point per checkpoint."""
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    runs = sorted({p["run"] for p in summary["points"]})
    for i, run in enumerate(runs):
        pts = [p for p in summary["points"] if p["run"] == run]
        ax.errorbar([p["shift"] for p in pts], [p["trait_delta"][0] for p in pts],
                    yerr=[[p["trait_delta"][0] - p["trait_delta"][1] for p in pts],
                          [p["trait_delta"][2] - p["trait_delta"][0] for p in pts]],
                    fmt="o-", ms=4, color=f"C{i}", label=run, alpha=0.8)
    c = summary["correlation"]["response_mean"]
    r = c.get("r")
    ax.set_xlabel("fine-tuning shift along the prompt-regime vector")
    ax.set_ylabel("trait change (contrastive log-lik, judge-free)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{summary['trait']}: r = {'n/a' if r is None else f'{r:.2f}'} over checkpoints", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)
