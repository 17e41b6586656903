"""findings.md: every comparison the study's grid supports, written from its fresh-seed estimates.

For β (within each model size and masking), masking (within each size and β) and model size
(within each β and masking), neighbouring levels are compared by the difference of their mean
objectives with a 95% Welch t-interval. An interval that excludes 0 is reported as a difference
with its direction; one that contains 0 as "not separated (inconclusive)"; a comparison with
fewer than 2 runs on a side has no interval and says so. Cells whose estimate leaves out
diverged or degenerate reruns, or whose best parameters sit at an edge of the searched range,
are listed as caveats.

A study of more than one method (analysis.methods) holds the method fixed in those comparisons
and adds a "Methods" section: per model size and method its best cell by the sweep's objective
(the metric less the penalty for gen/kl over the KL budget), with its 95% t-interval over seeds;
each method's best cell against DPO's by the same Welch interval; and best-of-N (from
results/<study>/baselines/best_of_n.csv) at the N whose KL is closest to DPO's best cell's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis.common import cell_keys, compared_runs, penalized, scored
from analysis.load import load_study_summaries
from analysis.methods import WITHOUT_BETA, closest_n, compare_fronts, read_best_of_n
from analysis.table import cell_estimates
from harness import stats

AXES = {  # what is compared: (the varied column, how a level is named); every other column of
    # CELL_COLUMNS the runs have is held fixed
    "β": ("dpo.beta", lambda v: f"β {v:g}"),
    "masking": ("masking", str),
    "model size": ("model.name", str),
    "training prompts": ("task.n_train_prompts", lambda v: f"{v:g} prompts"),
    "samples per prompt": ("task.samples_per_prompt", lambda v: f"{v:g} samples/prompt"),
    "epochs": ("train.epochs", lambda v: f"{v:g} epochs"),
}
CELL_COLUMNS = ["model.name", "dpo.beta", "masking", "task.n_train_prompts",
                "task.samples_per_prompt", "train.epochs"]
HELD = {"dpo.beta": "β {:g}", "task.n_train_prompts": "{:g} prompts",
        "task.samples_per_prompt": "{:g} samples/prompt", "train.epochs": "{:g} epochs"}


def _held_name(column: str, value) -> str:
    return HELD[column].format(value) if column in HELD else str(value)


def _levels(runs: pd.DataFrame, column: str) -> list:
    if column == "model.name":  # by size, not by name
        return list(runs.groupby(column)["n_params"].first().sort_values().index)
    return sorted(runs[column].unique(), key=lambda v: (str(type(v)), v))


def comparisons(runs: pd.DataFrame) -> list[dict]:
    """One record per comparison of neighbouring levels of each axis, the others held fixed."""
    out = []
    several = "method" in runs and runs["method"].nunique() > 1
    for axis, (column, name) in AXES.items():
        if column not in runs or runs[column].nunique() < 2:
            continue
        fixed = [c for c in CELL_COLUMNS if c != column and c in runs]
        fixed = [*fixed, "method"] if several else fixed
        fixed = [*fixed, "precision"] if "precision" in runs else fixed  # never across precisions
        levels = _levels(runs, column)
        for held, group in runs.groupby(fixed, sort=True):
            where = ", ".join(_held_name(f, v) for f, v in zip(fixed, held, strict=True)
                              if f in ("model.name", "masking", "method", "dpo.beta")
                              or runs[f].nunique() > 1)  # data settings and precision if they vary
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
        for col, what in (("seeds_diverged", "diverged"), ("seeds_degenerate", "degenerate"),
                          ("other_precision", "other-precision")):
            if col in c and c[col] == c[col] and int(c[col]):
                kept = col == "seeds_degenerate" and c.get("degenerate") == "count"
                notes.append(f"{int(c[col])} {what} rerun(s) " + (
                    "averaged in (the score reads their path)" if kept else "left out"))
        if "at_edge" in c and isinstance(c["at_edge"], str) and c["at_edge"]:
            notes.append(f"best parameters at the range edge ({c['at_edge']}): the optimum may lie outside")
        if c.get("status") not in (None, "done"):
            notes.append(f"status {c['status']}")
        if notes:
            out.append(f"{c['study']} / {c['cell']}: " + "; ".join(notes))
    return out


def _cell_name(cell: pd.Series, keys: list[str]) -> str:
    parts = []
    for k in keys:
        if k == "dpo.beta" and cell["method"] not in WITHOUT_BETA:
            parts.append(f"β {cell[k]:g}")
        elif k == "dpo.label_smoothing" and cell[k] > 0:
            parts.append(f"ε {cell[k]:g}")
        elif k in HELD and k != "dpo.beta":
            parts.append(_held_name(k, cell[k]))
        elif k not in ("model.name", "method", "dpo.beta", "dpo.label_smoothing"):
            parts.append(str(cell[k]))
    return ", ".join(parts)


def best_cells(runs: pd.DataFrame, direction: str) -> list[dict]:
    """Per model size and method the best cell by mean objective: its name, its runs' objective
    values and mean final gen/kl."""
    keys = cell_keys(runs)
    est = cell_estimates(runs, keys).sort_values("mean", ascending=direction != "maximize",
                                                 kind="stable")
    out = []
    by = ["model.name", "method"] + (["precision"] if "precision" in keys else [])
    several = "precision" in keys and runs["precision"].nunique() > 1
    named = [k for k in keys if k != "precision" or several]  # precision named only if it varies
    for _, cell in est.groupby(by, sort=True).head(1).iterrows():
        rows = runs[(runs[keys] == cell[keys]).all(axis=1)]
        out.append({"model": cell["model.name"], "method": cell["method"], "cell": _cell_name(cell, named),
                    "precision": cell.get("precision"),
                    "values": rows["objective"].tolist(), "kl": rows["gen/kl"].mean()
                    if "gen/kl" in rows else float("nan")})
    return out


def _interval(values: list[float]) -> str:
    e = stats.estimate(values)
    spread = "no interval" if e.low is None else f"[{e.low:.3g}, {e.high:.3g}]"
    return f"{e.mean:.3g} {spread} (n {e.n})"


def _best_of_n(results: Path, runs: pd.DataFrame, model: str, kl: float) -> str | None:
    baseline = read_best_of_n(results)
    if baseline is None or kl != kl:
        return None
    rows = baseline[(baseline["model.name"] == model) & baseline["study"].isin(set(runs["study"]))]
    if rows.empty:
        return None
    r = closest_n(rows, kl)
    what = "KL bound" if r["kl_kind"] == "bound" else "KL"
    return (f"{model}: best-of-N at N={r['n']:g} ({what} {r['kl']:.3g} nats, the closest to DPO's "
            f"{kl:.3g}): gen/reward {r['reward']:.3g} ± {r['reward_se']:.3g} (standard error)")


def method_section(results: Path, runs: pd.DataFrame, direction: str, budget: str) -> list[str]:
    """The "Methods" section's lines; none for a study of one method."""
    if "method" not in runs or runs["method"].nunique() < 2:
        return []
    best = best_cells(runs, direction)
    found, compared = [], []
    for b in best:
        kl = f", final gen/kl {b['kl']:.3g} nats" if b["kl"] == b["kl"] else ""
        found.append(f"{b['model']}, {b['method']} ({b['cell']}): {_interval(b['values'])}{kl}")
        dpo = next((d for d in best if d["model"] == b["model"] and d["method"] == "DPO"
                    and d["precision"] == b["precision"]), None)
        if dpo is not None and b is not dpo:
            compared.append(sentence({"where": b["model"], "a": b["method"], "b": "DPO",
                                      "n_a": len(b["values"]), "n_b": len(dpo["values"]),
                                      "diff": stats.mean(b["values"]) - stats.mean(dpo["values"]),
                                      "interval": stats.welch(b["values"], dpo["values"])}, direction))
    for dpo in (b for b in best if b["method"] == "DPO"):
        line = _best_of_n(results, runs, dpo["model"], dpo["kl"])
        compared += [line] if line else []
    if not any(b["method"] == "DPO" for b in best):
        compared.append("no DPO cell to compare with")
    compared += front_lines(results)
    separated = sum("is better" in s for s in compared)
    n_pairs = sum(" − DPO = " in s for s in compared)
    return [f"## Methods ({separated} of {n_pairs} comparisons with DPO separated)", "",
            f"Each method's best cell by the objective{budget}, mean over fresh seeds with its 95% "
            "t-interval; then each against DPO's best cell (95% Welch interval).", "",
            *[f"- {s}" for s in found], "", *[f"- {s}" for s in compared], ""]


def front_lines(results: Path) -> list[str]:
    """DPO's front against every other method's, over the KL both cover (analysis.methods.
    compare_fronts on the fronts the frontier figure draws: cell means of eval points)."""
    from analysis.fig_frontier import frontiers, fronts
    from analysis.style import MissingData

    try:
        figures = frontiers(results)
    except MissingData:
        return []
    out = []
    for f in figures:
        by_method = fronts(f.paths, by_masking=False)  # one front per method, maskings pooled
        dpo = by_method[by_method["series"] == "DPO"]
        for series, other in by_method[by_method["series"] != "DPO"].groupby("series", sort=True):
            if dpo.empty:
                break
            c = compare_fronts(dpo, other)
            where = f"{f.study + ' · ' if f.study else ''}{f.model}: DPO's front against {series}'s"
            if c["range"] is None:
                out.append(f"{where}: no KL that both cover (not compared)")
                continue
            lo, hi = c["range"]
            out.append(f"{where} over KL {lo:.2g}–{hi:.2g} nats: above at {c['above']} of {c['n']} "
                       f"front points, its 95% interval wholly above at {c['separated']}; smallest "
                       f"gap {c['min_gap']:+.3g}")
    return out


def arithmetic(runs: pd.DataFrame) -> str:
    """What the compared runs computed in and on what CPU capability, e.g. "Precision: bf16 (12
    runs; cpu AVX512, native bf16)"; several precisions are listed, each compared only with
    itself."""
    parts = []
    for precision, group in runs.groupby("precision", sort=True):
        where = sorted({_capability(r) for r in group.to_dict("records")})
        parts.append(f"{precision} ({len(group)} runs; {', '.join(where)})")
    head = "Precision: " + "; ".join(parts)
    return head + (" (each precision compared only with itself)" if len(parts) > 1 else "")


def _capability(run: dict) -> str:
    native = {True: "native bf16", False: "bf16 emulated"}.get(run.get("bf16_native"), "bf16 unknown")
    isa = run.get("cpu_isa")
    device = str(run.get("device") or "?").split(":")[0]
    return f"{device} {isa}, {native}" if isinstance(isa, str) else f"{device}, {native}"


def findings(results: Path) -> str:
    runs, metric = compared_runs(results)
    cells = load_study_summaries(results)
    direction = str(cells["direction"].iloc[0]) if "direction" in cells else "maximize"

    what, over = scored(cells, metric)
    lines = [f"# Findings: {what}", "",
             f"Each comparison: difference of mean objectives over {over} with a 95% Welch "
             "t-interval; an interval containing 0 is not separated (inconclusive). Written by "
             "`make figures` from the run files.", "", arithmetic(runs), ""]
    by_axis: dict[str, list[str]] = {}
    for c in comparisons(runs):
        by_axis.setdefault(c["axis"], []).append(sentence(c, direction))
    for axis, sentences in by_axis.items():
        separated = sum("is better" in s for s in sentences)
        lines += [f"## {axis} ({separated} of {len(sentences)} comparisons separated)", ""]
        lines += [f"- {s}" for s in sentences] + [""]
    budget = f" ({penalty})" if (penalty := penalized(cells, metric)) else ""
    lines += method_section(results, runs, direction, budget)
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
