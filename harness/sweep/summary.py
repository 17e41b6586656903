"""The study's results table: per cell its status, precision, best trial, parameters (flagged when
at an edge of the cell's range) and the objective estimated over fresh seed reruns (mean, median,
sd, 95% t-interval; diverged, degenerate and failed runs, and runs computed in another precision
than the study's, counted apart, never averaged in); written to summary.csv and logged to wandb
through the tracker interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import atomic, rundir, stats
from harness.config import TrackingConfig
from harness.sweep import faults
from harness.sweep.schedule import Sweep
from harness.sweep.status import find_study
from harness.tracking import JOB_TYPES, Tracker, Wandb


def _row(sweep: Sweep, cell) -> dict[str, Any]:
    spec = sweep.exp.spec
    search = sweep.search_study(cell)
    trials = search.get_trials(deepcopy=False)
    diverged = [t for t in trials if t.user_attrs.get("outcome") == "diverged"]
    row: dict[str, Any] = {"cell": cell.id, **dict(cell.values), "status": "done", "error": "",
                           "precision": sweep.precision}
    if cell.search is not None:  # one of the cell's independent searches (sweep.searches)
        row["search"] = cell.search
    row.update({
        "trials": sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials),
        "pruned": sum(t.state.name == "PRUNED" for t in trials) - len(diverged),
        "diverged": len(diverged),
        "failed": sum(faults.real_failure(t) for t in trials),
        "objective": spec.objective.metric, "direction": spec.objective.direction,
        "kl_budget": spec.objective.kl_budget, "kl_penalty": spec.objective.kl_penalty,
    })
    failure = faults.cell_failure(search, spec.max_failures)
    if failure:
        row.update({"status": "failed", "error": failure})
    elif row["trials"] < spec.trials:
        row["status"] = "incomplete"
    if not any(t.state.name == "COMPLETE" for t in trials):
        if row["status"] == "done":  # every trial pruned or diverged: nothing to report
            row.update({"status": "no result", "error": "no trial completed"})
        return row
    seeds = find_study(sweep.storage, f"{search.study_name}/seeds")
    recorded = seeds.user_attrs.get("best_trial") if seeds is not None else None
    best = search.best_trial if recorded is None else next(t for t in trials if t.number == recorded)
    reruns = seeds.get_trials(deepcopy=False) if seeds is not None else []
    done = [t for t in reruns if t.state.name == "COMPLETE"]
    space = sweep.exp.space(cell)
    edges = [f"{k}={e}" for k, v in best.params.items() if k in space and (e := space[k].at_edge(v))]
    row.update({"best_trial": best.number, "search_value": best.value,
                **{f"param/{k}": v for k, v in best.params.items()},
                "at_edge": ";".join(edges),
                "seeds_done": len(done),
                "seeds_diverged": sum(t.user_attrs.get("outcome") == "diverged" for t in reruns),
                "seeds_degenerate": sum(bool(t.user_attrs.get("degenerate")) for t in done)})
    row["degenerate"] = spec.objective.degenerate
    row.update(_estimate(best, done, spec.seeds, selected=spec.trials > 1, precision=sweep.precision,
                         keep_degenerate=spec.objective.degenerate == "count"))
    if row["status"] == "done" and len(done) + row["seeds_diverged"] < spec.seeds - 1:
        row["status"] = "incomplete"
    return row


def _estimate(best, done: list, seeds: int, selected: bool = True,
              precision: str | None = None, keep_degenerate: bool = False) -> dict[str, Any]:
    """The cell's reported value: from its fresh seed reruns only (never the search trial that
    picked the parameters: its value is biased upward by the selection), degenerate runs left out
    and counted (averaged in, and counted, with `keep_degenerate`). With one trial per cell (`selected` False) nothing was picked, so that trial is
    one more fresh seed and counts too. A study without reruns (seeds: 1) reports its search
    trial, saying so. With the study's `precision` given, a run that computed in another one (or
    recorded none: an older harness) is left out and counted in `other_precision`."""
    def kept(trials: list) -> list:
        return trials if keep_degenerate else [t for t in trials if not t.user_attrs.get("degenerate")]

    counted = kept(done)
    source = "seed reruns"
    if seeds == 1:
        counted, source = [best], "search trial"
    elif not selected:
        counted = kept([best]) + counted
        source = "every seed (one trial: no selection)"
    apart = [precision is not None and t.user_attrs.get("precision") != precision for t in counted]
    other = [t for t, a in zip(counted, apart, strict=True) if a]
    counted = [t for t, a in zip(counted, apart, strict=True) if not a]
    out: dict[str, Any] = {"estimate_from": source, "estimate_n": len(counted),
                           "other_precision": len(other)}
    if counted:
        e = stats.estimate([t.value for t in counted])
        out.update({"objective_mean": e.mean, "objective_median": e.median, "objective_sd": e.sd,
                    "objective_ci_low": e.low, "objective_ci_high": e.high})
    out["run_dirs"] = ";".join(r for t in counted if (r := t.user_attrs.get("run_dir")))
    return out


def phase_totals(sweep: Sweep) -> dict[str, float]:
    """Seconds per phase (harness.phases) summed over every run of the study on this machine,
    finished or cut off: where the study's worker time went."""
    import json

    from harness import phases

    totals = dict.fromkeys(phases.NAMES, 0.0)
    for run_dir in rundir.study_run_dirs(sweep.study_dir):
        try:
            summary = json.loads((run_dir / rundir.SUMMARY).read_text())
        except (OSError, ValueError):
            continue
        for name in phases.NAMES:
            totals[name] += float(summary.get(f"perf/phase/{name}_s") or 0.0)
    return totals


def phase_line(totals: dict[str, float]) -> str:
    total = sum(totals.values())
    parts = [f"{name} {s:.0f}s ({s / total:.0%})" for name, s in totals.items() if s] if total else []
    return f"worker time {total:.0f}s: " + ", ".join(parts) if parts else "no run timings yet"


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    return [_row(sweep, cell) for cell in sweep.exp.cells]


def write_summary(sweep: Sweep) -> tuple[Path, list[dict[str, Any]]]:
    """summary.csv of the study (atomic), the same table as a wandb Table; returns the path and
    the rows."""
    import pandas as pd

    rows = summary_rows(sweep)
    df = pd.DataFrame(rows)
    path = atomic.atomic_file(sweep.study_dir / rundir.SUMMARY_CSV, lambda tmp: df.to_csv(tmp, index=False))
    exp = sweep.exp
    tracking = TrackingConfig.model_validate({**exp.base.tracking.model_dump(), "group": exp.study})
    tracker = Tracker([Wandb(path.parent, f"{exp.study}-summary", {"study": exp.study}, tracking,
                             JOB_TYPES["summary"])])
    tracker.table("study/summary", list(df.columns), df.astype(str).values.tolist())
    tracker.close()
    return path, rows
