"""The study's results table: per cell its status, best trial, parameters and objective over seeds
(diverged and failed runs counted apart, never averaged in); written to summary.csv and logged
to wandb through the tracker interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import cache
from harness.config import TrackingConfig
from harness.sweep import faults
from harness.sweep.schedule import Sweep
from harness.tracking import JOB_TYPES, Tracker, Wandb

SUMMARY_CSV = "summary.csv"


def _seeds(sweep: Sweep, search):
    import optuna

    try:
        return optuna.load_study(study_name=f"{search.study_name}/seeds", storage=sweep.storage)
    except KeyError:
        return None


def _row(sweep: Sweep, cell) -> dict[str, Any]:
    spec = sweep.exp.spec
    search = sweep.search_study(cell)
    trials = search.get_trials(deepcopy=False)
    diverged = [t for t in trials if t.user_attrs.get("outcome") == "diverged"]
    row: dict[str, Any] = {"cell": cell.id, **dict(cell.values), "status": "done", "error": ""}
    row.update({
        "trials": sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials),
        "pruned": sum(t.state.name == "PRUNED" for t in trials) - len(diverged),
        "diverged": len(diverged),
        "failed": sum(faults.real_failure(t) for t in trials),
        "objective": spec.objective.metric,
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
    seeds = _seeds(sweep, search)
    recorded = seeds.user_attrs.get("best_trial") if seeds is not None else None
    best = search.best_trial if recorded is None else next(t for t in trials if t.number == recorded)
    reruns = seeds.get_trials(deepcopy=False) if seeds is not None else []
    done = [t for t in reruns if t.state.name == "COMPLETE"]
    chosen = [best, *done]
    values = [t.value for t in chosen]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    row.update({"best_trial": best.number, "seeds_done": len(values),
                "seeds_diverged": sum(t.user_attrs.get("outcome") == "diverged" for t in reruns),
                "objective_mean": mean, "objective_std": std,
                **{f"param/{k}": v for k, v in best.params.items()},
                "run_dirs": ";".join(r for t in chosen if (r := t.user_attrs.get("run_dir")))})
    if row["status"] == "done" and len(done) + row["seeds_diverged"] < spec.seeds - 1:
        row["status"] = "incomplete"
    return row


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    return [_row(sweep, cell) for cell in sweep.exp.cells]


def write_summary(sweep: Sweep) -> tuple[Path, list[dict[str, Any]]]:
    """summary.csv of the study (atomic), the same table as a wandb Table; returns the path and
    the rows."""
    import pandas as pd

    rows = summary_rows(sweep)
    df = pd.DataFrame(rows)
    path = cache.atomic_file(sweep.study_dir / SUMMARY_CSV, lambda tmp: df.to_csv(tmp, index=False))
    exp = sweep.exp
    tracking = TrackingConfig.model_validate({**exp.base.tracking.model_dump(), "group": exp.study})
    tracker = Tracker([Wandb(path.parent, f"{exp.study}-summary", {"study": exp.study}, tracking,
                             JOB_TYPES["summary"])])
    tracker.table("study/summary", list(df.columns), df.astype(str).values.tolist())
    tracker.close()
    return path, rows
