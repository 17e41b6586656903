"""findings.md: every comparison the study's grid supports, written from its fresh-seed estimates.

For β (within each model size and masking), masking (within each size and β) and model size
(within each β and masking), neighbouring levels are compared by the difference of their mean
objectives with a 95% Welch t-interval. An interval that excludes 0 is reported as a difference
with its direction; one that contains 0 as "not separated (inconclusive)"; a comparison with
fewer than 2 runs on a side has no interval and says so. Cells whose estimate leaves out
diverged or degenerate reruns, or whose best parameters sit at an edge of the searched range,
are listed as caveats.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis.common import compared_runs
from analysis.load import load_study_summaries
from analysis.style import label
from harness import stats

AXES = {  # what is compared: (the varied column, the columns held fixed, how a level is named)
    "β": ("dpo.beta", ["model.name", "masking"], lambda v: f"β {v:g}"),
    "masking": ("masking", ["model.name", "dpo.beta"], str),
    "model size": ("model.name", ["dpo.beta", "masking"], str),
}


def _levels(runs: pd.DataFrame, column: str) -> list:
    if column == "model.name":  # by size, not by name
        return list(runs.groupby(column)["n_params"].first().sort_values().index)
    return sorted(runs[column].unique(), key=lambda v: (str(type(v)), v))


def comparisons(runs: pd.DataFrame) -> list[dict]:
    """One record per comparison of neighbouring levels of each axis, the others held fixed."""
    out = []
    for axis, (column, fixed, name) in AXES.items():
        if column not in runs or runs[column].nunique() < 2:
            continue
        levels = _levels(runs, column)
        for held, group in runs.groupby(fixed, sort=True):
            where = ", ".join(f"{label(f)} {v:g}" if isinstance(v, float) else str(v)
                              for f, v in zip(fixed, held, strict=True))
            for lo, hi in zip(levels, levels[1:], strict=False):
                a = group.loc[group[column] == hi, "objective"].tolist()
                b = group.loc[group[column] == lo, "objective"].tolist()
                if not a or not b:
                    continue
                out.append({"axis": axis, "where": where, "a": name(hi), "b": name(lo),
                            "n_a": len(a), "n_b": len(b), "diff": stats.mean(a) - stats.mean(b),
                            "interval": stats.welch(a, b)})
    return out


def sentence(c: dict, direction: str) -> str:
    head = f"{c['where']}: {c['a']} − {c['b']} = {c['diff']:+.3g}"
    d = c["interval"]
    sizes = f"n {c['n_a']} vs {c['n_b']}"
    if d is None:
        return f"{head} ({sizes}): no interval (fewer than 2 runs on a side), inconclusive"
    verdict = "not separated (inconclusive)"
    if d.separated:
        better = (c["diff"] > 0) == (direction == "maximize")
        verdict = f"{c['a'] if better else c['b']} is better"
    return f"{head} [{d.low:+.3g}, {d.high:+.3g}] ({sizes}): {verdict}"


def caveats(results: Path) -> list[str]:
    cells = load_study_summaries(results)
    out = []
    for _, c in cells.iterrows():
        notes = []
        for col, what in (("seeds_diverged", "diverged"), ("seeds_degenerate", "degenerate")):
            if col in c and c[col] == c[col] and int(c[col]):
                notes.append(f"{int(c[col])} {what} rerun(s) left out")
        if "at_edge" in c and isinstance(c["at_edge"], str) and c["at_edge"]:
            notes.append(f"best parameters at the range edge ({c['at_edge']}): the optimum may lie outside")
        if c.get("status") not in (None, "done"):
            notes.append(f"status {c['status']}")
        if notes:
            out.append(f"{c['study']} / {c['cell']}: " + "; ".join(notes))
    return out


def findings(results: Path) -> str:
    runs, metric = compared_runs(results)
    cells = load_study_summaries(results)
    direction = str(cells["direction"].iloc[0]) if "direction" in cells else "maximize"

    lines = [f"# Findings: {label(metric)} ({metric})", "",
             "Each comparison: difference of mean objectives over fresh seed reruns with a 95% Welch "
             "t-interval; an interval containing 0 is not separated (inconclusive). Written by "
             "`make figures` from the run files.", ""]
    by_axis: dict[str, list[str]] = {}
    for c in comparisons(runs):
        by_axis.setdefault(c["axis"], []).append(sentence(c, direction))
    for axis, sentences in by_axis.items():
        separated = sum("is better" in s for s in sentences)
        lines += [f"## {axis} ({separated} of {len(sentences)} comparisons separated)", ""]
        lines += [f"- {s}" for s in sentences] + [""]
    notes = caveats(results)
    lines += ["## Caveats", ""] + ([f"- {n}" for n in notes] or ["- none"]) + [""]
    return "\n".join(lines)


def draw(results: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "findings.md"
    path.write_text(findings(results))
    return [path]


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
