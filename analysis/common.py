"""Selections shared by the figure scripts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.load import load_curves, load_finals, load_study_summaries
from analysis.methods import add_method
from analysis.style import MissingData
from harness.rundir import FINISHED, METRICS, SUMMARY

KEYS = ["model.name", "dpo.beta", "masking"]  # what a study's cells differ in, in table order
DATA_KEYS = ["task.n_train_prompts", "task.samples_per_prompt", "train.epochs"]  # when they vary


def cell_keys(runs: pd.DataFrame) -> list[str]:
    """The KEYS the runs have, with `method` after the model when they hold more than one method
    and `dpo.label_smoothing` when it varies (cDPO cells with different ε)."""
    keys = [k for k in KEYS if k in runs]
    if "method" in runs and runs["method"].nunique() > 1:
        keys.insert(1 if "model.name" in keys else 0, "method")
    if "dpo.label_smoothing" in runs and runs["dpo.label_smoothing"].nunique() > 1:
        keys.append("dpo.label_smoothing")
    keys += [k for k in DATA_KEYS if k in runs and runs[k].nunique() > 1]  # a data-scaling study
    if "precision" in runs:  # bf16 and fp32 runs are different experiments: never one estimate
        keys.append("precision")
    return keys


def methods_apart(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with `method`; when it holds several methods, `masking` becomes "method · masking",
    so that figures with a panel or column per masking never average over methods."""
    frame = add_method(frame)
    if frame["method"].nunique() > 1 and "masking" in frame:
        frame["masking"] = frame["method"] + " · " + frame["masking"].fillna("").astype(str)
    return frame


def best_runs(results: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the runs each sweep cell is compared on (the runs its estimate counts: the fresh
    seed reruns of its best parameters, degenerate ones left out; its best trial in a study
    without reruns); runs outside any sweep are all kept."""
    if frame.empty:
        return frame
    cells = load_study_summaries(results)
    keep: set[str] = set()
    if not cells.empty and "run_dirs" in cells:
        for study, dirs in cells[["study", "run_dirs"]].dropna().itertuples(index=False):
            for d in str(dirs).split(";"):
                keep.add(_under_results(Path(d), Path(results), study))
    in_sweep = frame["cell"].notna() if "cell" in frame else pd.Series(False, index=frame.index)
    return frame[~in_sweep | frame["run"].isin(keep)]


def _under_results(run_dir: Path, results: Path, study: str) -> str:
    """A summary's run directory as a path under `results` (`<study>/runs/...`): directly when it
    lies there; else (written relative to where the sweep ran) from its study folder on."""
    resolved, root = run_dir.resolve(), results.resolve()
    if resolved.is_relative_to(root):
        return str(resolved.relative_to(root))
    parts = run_dir.parts
    return str(Path(*parts[parts.index(study):])) if study in parts else str(run_dir)


def curves_or_fail(results: Path, needed: list[str]) -> pd.DataFrame:
    curves = load_curves(results)
    if curves.empty:
        raise MissingData(f"no runs under {results} (no {METRICS} found)")
    missing = [m for m in needed if m not in curves]
    if missing:
        raise MissingData(f"the runs under {results} log none of {missing}")
    return curves


def finals_or_fail(results: Path) -> pd.DataFrame:
    finals = load_finals(results)
    if finals.empty:
        raise MissingData(f"no finished runs under {results} (no {SUMMARY} with status {FINISHED})")
    return finals


def beta_label(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["β"] = frame["dpo.beta"].map(lambda b: f"{b:g}")
    return frame


def compared_runs(results: Path) -> tuple[pd.DataFrame, str]:
    """One row per compared run (see best_runs) with its final
    `objective` value, its `method` (analysis.methods) and `precision`, and the objective's
    metric name.
    Without sweeps: every finished run, scored on eval/rewards/accuracies."""
    finals = add_method(best_runs(results, finals_or_fail(results)))
    cells = load_study_summaries(results)
    metric = str(cells["objective"].iloc[0]) if not cells.empty else "eval/rewards/accuracies"
    if metric not in finals:
        raise MissingData(f"the finished runs under {results} have no final {metric!r}")
    finals = finals.dropna(subset=[metric]).copy()
    finals["objective"] = finals[metric].astype(float)
    # What each run computed in (summary.json); "unknown" for runs of an older harness.
    finals["precision"] = finals["precision"].fillna("unknown") if "precision" in finals else "unknown"
    budget = cells["kl_budget"].dropna() if "kl_budget" in cells else pd.Series(dtype=float)
    if len(budget):  # the sweep's score: the metric less kl_penalty per nat of gen/kl over budget
        from harness.config import ObjectiveSpec
        from harness.sweep.study import objective_value

        spec = ObjectiveSpec(metric=metric, direction=str(cells["direction"].iloc[0]),
                             kl_budget=float(budget.iloc[0]),
                             kl_penalty=float(cells["kl_penalty"].dropna().iloc[0]))
        finals["objective"] = [objective_value(spec, row) for row in finals.to_dict("records")]
        finals = finals.dropna(subset=["objective"])
    return finals, metric


def penalized(cells: pd.DataFrame, metric: str) -> str | None:
    """The sweep's score when it is a metric less a KL penalty, in words ("gen/reward less 1 per
    nat of gen/kl over the 4-nat KL budget"); None when the score is the metric itself."""
    if "kl_budget" not in cells or not cells["kl_budget"].notna().any():
        return None
    return (f"{metric} less {cells['kl_penalty'].dropna().iloc[0]:g} per nat of gen/kl over the "
            f"{cells['kl_budget'].dropna().iloc[0]:g}-nat KL budget")


def scored(cells: pd.DataFrame, metric: str) -> tuple[str, str]:
    """(what the objective is, what a cell's estimate is over), named exactly for titles, from
    the studies' summary tables: e.g. ("gen/reward less 1 per nat of gen/kl over the 4-nat KL
    budget", "fresh seed reruns") or ("reward at matched KL (...) (gen/reward_at_kl)",
    "independent searches (one fresh-seed rerun each)")."""
    from analysis.style import label

    what = penalized(cells, metric) or f"{label(metric)} ({metric})"
    several = "searches" in cells and cells["searches"].fillna(1).max() > 1
    over = "independent searches (one fresh-seed rerun each)" if several else "fresh seed reruns"
    return what, over
