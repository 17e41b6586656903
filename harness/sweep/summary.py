"""The study's results table: per cell, its best trial, parameters and objective over seeds;
written to summary.csv and logged to wandb through the tracker interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import cache
from harness.config import TrackingConfig
from harness.sweep.schedule import Sweep
from harness.tracking import Tracker, Wandb

SUMMARY_CSV = "summary.csv"


def _seed_trials(sweep: Sweep, search) -> list:
    import optuna
    from optuna.trial import TrialState

    try:
        seeds = optuna.load_study(study_name=f"{search.study_name}/seeds", storage=sweep.storage)
    except KeyError:
        return []
    return [t for t in seeds.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    spec = sweep.exp.spec
    rows = []
    for cell in sweep.exp.cells:
        search = sweep.search_study(cell)
        trials = search.get_trials(deepcopy=False)
        row: dict[str, Any] = {"cell": cell.id, **dict(cell.values)}
        row.update({
            "trials": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "objective": spec.objective.metric,
        })
        if any(t.state == TrialState.COMPLETE for t in trials):
            best = search.best_trial
            chosen = [best, *_seed_trials(sweep, search)]
            values = [t.value for t in chosen]
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
            row.update({"best_trial": best.number, "seeds_done": len(values),
                        "objective_mean": mean, "objective_std": std,
                        **{f"param/{k}": v for k, v in best.params.items()},
                        "run_dirs": ";".join(r for t in chosen if (r := t.user_attrs.get("run_dir")))})
        rows.append(row)
    return rows


def write_summary(sweep: Sweep) -> Path:
    """summary.csv of the study (atomic), and the same table as a wandb Table."""
    import pandas as pd

    df = pd.DataFrame(summary_rows(sweep))
    path = cache.atomic_file(sweep.study_dir / SUMMARY_CSV, lambda tmp: df.to_csv(tmp, index=False))
    exp = sweep.exp
    tracking = TrackingConfig.model_validate({**exp.base.tracking.model_dump(), "group": exp.study})
    tracker = Tracker([Wandb(path.parent, f"{exp.study}-summary", {"study": exp.study}, tracking)])
    tracker.table("study/summary", list(df.columns), df.astype(str).values.tolist())
    tracker.close()
    return path
