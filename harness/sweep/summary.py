"""The study's results table (one row per cell, harness.sweep.estimate), written to summary.csv
and logged to wandb through the tracker interface; where the study's worker time went."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import atomic, rundir
from harness.config import TrackingConfig
from harness.sweep.estimate import cell_row
from harness.sweep.schedule import Sweep
from harness.tracking import JOB_TYPES, Tracker, Wandb


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
    return [cell_row(sweep, cell) for cell in sweep.exp.cells]


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
