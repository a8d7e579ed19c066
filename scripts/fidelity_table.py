"""The fidelity table of persona-vector runs: per trait, the chosen steering setting, its held-out gain,
the random-direction control, the dose-response slope, monitoring, and a second scorer the pipeline
never optimises (``configs/fidelity_scorers.toml``, committed before any table was run).

    jaxpersona extract --all-traits --out runs/persona_all                       # one run per model
    python scripts/fidelity_table.py runs/persona_all --label SmolLM2-135M-Instruct [--out fidelity.md]

A cell passes when: the held-out gain's interval is above 0; the trait beats the random direction
(interval of trait - random above 0); the slope's interval is above 0; the second scorer is valid for the
trait (anchor AUROC >= min_auroc) and moves the right way (paired steered - unsteered interval above 0);
and the steered text is coherent (the setting lies below its coherence cliff by construction; its
incoherent share is shown). Every cell is shown; failing ones say which test failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxpersona.data.traits import load_anchors, load_trait
from jaxpersona.measure import stats
from jaxpersona.measure.lexicon import anchor_auroc, load_scorers

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ci(mean: Any, lo: Any, hi: Any, nd: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:+.{nd}f} [{lo:+.{nd}f}, {hi:+.{nd}f}]"


def _above(lo: Any) -> bool:
    return lo is not None and isinstance(lo, (int, float)) and math.isfinite(lo) and lo > 0


def trait_cell(summary: dict[str, Any], steer_rows: list[dict[str, Any]], scorer: Any, min_auroc: float,
               seed: int = 0) -> dict[str, Any]:
    """One trait's cell from its ``summary.json`` entry and ``steering_scored.jsonl`` rows."""
    st = summary.get("setting")
    cell: dict[str, Any] = {"trait": summary["trait"], "setting": st}
    fails = []
    h, c, d = summary.get("heldout") or {}, summary.get("control") or {}, summary.get("dose") or {}
    cell["heldout"] = (h.get("gain"), h.get("lo"), h.get("hi"), h.get("n"), h.get("stable"))
    cell["control"] = (c.get("diff"), c.get("diff_lo"), c.get("diff_hi"))
    cell["slope"] = (d.get("slope"), d.get("lo"), d.get("hi"))
    m = summary["monitor"].get(str(summary.get("best_layer")), {}) if summary.get("best_layer") is not None else {}
    cell["monitor"] = (m.get("r"), m.get("lo"), m.get("hi"), m.get("n"))
    if st is None:
        fails.append("no coherent setting")
    if not _above(h.get("lo")):
        fails.append("held-out gain")
    if not c.get("beats"):
        fails.append("random control")
    if not _above(d.get("lo")):
        fails.append("slope")
    if scorer is None:
        cell["second"] = None
        fails.append("no scorer named")
    else:
        anchors = load_anchors(load_trait(summary["trait"]))
        auroc = anchor_auroc(scorer, anchors) if anchors is not None else None
        cell["auroc"] = auroc
        if auroc is None or auroc < min_auroc:
            cell["second"] = None
            fails.append("no validated scorer")
        elif st is not None:
            how = (st["positions"], st["variant"])
            steered = {r["question"]: r["response"] for r in steer_rows
                       if (r["positions"], r["variant"], r["layer"], r["coeff"]) == (*how, st["layer"], st["coeff"])}
            plain = {r["question"]: r["response"] for r in steer_rows
                     if (r["positions"], r["variant"]) == how and r["coeff"] == 0.0}
            diffs = []
            for q, text in steered.items():
                a, b = scorer.score(text), scorer.score(plain.get(q, ""))
                if a is not None and b is not None:
                    diffs.append(a - b)
            mean, lo, hi = stats.bootstrap_ci(np.asarray(diffs), seed=seed) if diffs else (math.nan,) * 3
            cell["second"] = (mean, lo, hi, len(diffs))
            if not _above(lo):
                fails.append("second scorer")
    if st is not None:
        cell["bad_frac"] = summary["steering"][str(st["layer"])][f"{st['coeff']:g}"]["bad_frac"]
    cell["fails"] = fails
    cell["passed"] = not fails
    return cell


def run_cells(run: Path, scorers_path: Path) -> list[dict[str, Any]]:
    scorers, min_auroc = load_scorers(scorers_path)
    summary = json.loads((run / "summary.json").read_text())
    entries = summary if isinstance(summary, list) else [summary]
    out = []
    for s in entries:
        sub = run / s["trait"] if isinstance(summary, list) else run
        out.append(trait_cell(s, _rows(sub / "steering_scored.jsonl"), scorers.get(s["trait"]), min_auroc))
    return out


def markdown(cells: list[dict[str, Any]], label: str) -> str:
    lines = [f"**{label}**", "",
             "| trait | setting (positions, vector, layer, c) | held-out gain (n, folds agree) | trait − random | "
             "slope per unit c | monitoring r | second scorer: anchor AUROC, Δ steered − unsteered | incoherent | "
             "cell |",
             "|---|---|---|---|---|---|---|---:|---|"]
    for c in cells:
        st = c["setting"]
        where = f"{st['positions']}, {st['variant']}, resid[{st['layer']}], {st['coeff']:g}" if st else "none"
        g, lo, hi, n, stable = c["heldout"]
        held = _ci(g, lo, hi) + (f" (n={n}, {'yes' if stable else 'no'})" if n else "")
        r, rlo, rhi, rn = c["monitor"]
        mon = "–" if r is None else f"{r:.2f} [{rlo:.2f}, {rhi:.2f}] (n={rn})"
        auroc = c.get("auroc")
        if c["second"] is None:
            second = "not named" if "no scorer named" in c["fails"] else f"no validated scorer (AUROC {auroc:.2f})"
        else:
            m, slo, shi, sn = c["second"]
            second = f"AUROC {auroc:.2f}; " + _ci(m, slo, shi, 3) + f" (n={sn})"
        bad = "–" if c.get("bad_frac") is None else f"{100 * c['bad_frac']:.0f}%"
        verdict = "**pass**" if c["passed"] else "fail: " + ", ".join(c["fails"])
        lines.append(f"| {c['trait']} | {where} | {held} | {_ci(*c['control'])} | {_ci(*c['slope'])} | {mon} | "
                     f"{second} | {bad} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="an extract or extract-all run directory")
    ap.add_argument("--label", default=None, help="the table's title (default: the run's model)")
    ap.add_argument("--scorers", type=Path, default=ROOT / "configs" / "fidelity_scorers.toml")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here (and .json beside it)")
    args = ap.parse_args(argv)
    cells = run_cells(args.run, args.scorers)
    label = args.label or json.loads((args.run / "run.json").read_text()).get("model", {}).get("name") or str(args.run)
    text = markdown(cells, label)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(cells, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
