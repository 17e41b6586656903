"""Load run directories (or synced wandb runs) into tidy pandas DataFrames.

    curves = load_curves("results")   # one row per (run, logged step)
    finals = load_finals("results")   # one row per run
    cells  = load_study_summaries("results")  # the sweeps' summary.csv tables

Every config field becomes a column named by its dotted path (`dpo.beta`, `model.name`, ...), plus
`run` (the run directory relative to the results directory) and the run's labels (harness.rundir
LABELS), copied as written by the harness in config.json's `labels` block: `study`, `cell`,
`trial`, `role` (`search` or `seeds`; None with `study`, `cell` and `trial` for a run outside a
sweep), `masking` (`masked-sum`, `full-mean`, ...), `seed` and `storage` (the Optuna storage the
sweep used). Nothing is derived from run names or other config fields: a run written without labels
(by an older harness) gets None for all of them, and each load prints one warning saying how many
such runs it read. Only the run files are read (config.json, metrics.jsonl, summary.json; their
names are harness.rundir's), never logs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from harness.rundir import (
    CONFIG,
    FINISHED,
    LABELS,
    METRICS,
    SUMMARY,
    SUMMARY_CSV,
    read_metrics,
    split_search,
)
from harness.sweep.estimate import NOT_NEEDED


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


_STUDY: contextvars.ContextVar[str | None] = contextvars.ContextVar("study", default=None)


@contextlib.contextmanager
def only_study(study: str | None) -> Iterator[None]:
    """Inside, every loader sees the runs, summary.csv and baselines of results/<study>/ only
    (None: everything), so that figures and findings never pool two studies."""
    token = _STUDY.set(study)
    try:
        yield
    finally:
        _STUDY.reset(token)


def in_scope(path: Path, results: Path) -> bool:
    """Whether `path` under `results` belongs to the study in scope (any, outside only_study)."""
    study = _STUDY.get()
    return study is None or Path(path).relative_to(results).parts[:1] == (study,)


def studies(results: str | Path) -> list[str]:
    """The studies under `results`: folders holding a sweep's summary.csv, sorted."""
    return sorted(p.parent.name for p in Path(results).glob(f"*/{SUMMARY_CSV}"))


def run_dirs(results: str | Path) -> list[Path]:
    """Every directory under `results` holding a config.json and a metrics.jsonl, sorted (of the
    study in scope, see only_study)."""
    results = Path(results)
    return sorted(p.parent for p in results.rglob(METRICS)
                  if (p.parent / CONFIG).exists() and in_scope(p.parent, results))


def _info(config: dict[str, Any], run: str) -> tuple[dict[str, Any], bool]:
    """Config columns and labels of one run's config, and whether it had a labels block."""
    labels = config.get("labels")
    info = flatten({k: v for k, v in config.items() if k not in ("sweep", "labels")})
    info["run"] = run
    info.update({k: labels.get(k) if isinstance(labels, dict) else None for k in LABELS})
    # a cell's independent searches are one cell, each search a replicate of the procedure
    info["cell"], info["search"] = split_search(info.get("cell"))
    return info, isinstance(labels, dict)


def run_info(run_dir: Path, results: Path) -> dict[str, Any]:
    """Config columns and labels of one run (labels None when its config.json has none)."""
    config = json.loads((Path(run_dir) / CONFIG).read_text())
    return _info(config, str(Path(run_dir).relative_to(results)))[0]


def _run_infos(results: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(run dir, run_info) of every run under `results`; one warning if some lack labels."""
    out, unlabelled = [], 0
    for rd in run_dirs(results):
        info, labelled = _info(json.loads((rd / CONFIG).read_text()), str(rd.relative_to(results)))
        unlabelled += not labelled
        out.append((rd, info))
    _warn_unlabelled(unlabelled, len(out), str(results))
    return out


def _warn_unlabelled(n: int, total: int, where: str) -> None:
    if n:
        print(f"warning: {n} of {total} runs under {where} have no labels (written by an older "
              f"harness): their {', '.join(LABELS)} are None, so sweep figures leave them out")


def load_curves(results: str | Path) -> pd.DataFrame:
    """One row per (run, logged step): step, examples_seen, the metrics logged then, config columns
    and labels."""
    results = Path(results)
    frames = []
    for rd, info in _run_infos(results):
        rows = read_metrics(rd)
        if not rows:
            continue
        df = pd.DataFrame(rows)
        for k, v in info.items():
            df[k] = v
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).sort_values(["run", "step"], kind="stable", ignore_index=True)


def load_finals(results: str | Path, finished_only: bool = True) -> pd.DataFrame:
    """One row per run: summary.json values, config columns and labels (unfinished runs left out
    unless asked). The labels come from config.json; summary.json repeats them."""
    results = Path(results)
    rows = []
    for rd, info in _run_infos(results):
        path = rd / SUMMARY
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        if finished_only and summary.get("status") != FINISHED:
            continue
        rows.append({**summary, **info})
    return pd.DataFrame(rows).sort_values("run", ignore_index=True) if rows else pd.DataFrame()


def load_study_summaries(results: str | Path) -> pd.DataFrame:
    """The sweeps' per-cell tables (results/<study>/summary.csv), with a `study` column."""
    frames = []
    for path in sorted(Path(results).glob(f"*/{SUMMARY_CSV}")):
        if not in_scope(path, Path(results)):
            continue
        df = pd.read_csv(path)
        df.insert(0, "study", path.parent.name)
        frames.append(fold_searches(df) if "search" in df else df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


_SUMMED = ["trials", "pruned", "diverged", "failed", "seeds_done", "seeds_diverged",
           "seeds_degenerate", "other_precision", "estimate_n"]


def _joined(values: pd.Series) -> str:
    return "; ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values
                     if v == v and v != "")


def fold_searches(df: pd.DataFrame) -> pd.DataFrame:
    """summary.csv rows of a cell's independent searches (`<cell>,search=<r>`) folded into one row
    per cell: counts summed, status `done` only when every search is, each search's best
    parameters, search value and edge flags listed (`; `), run_dirs joined; `searches` counts
    them. An adaptive search the cell did not need (status `not needed`: its interval had reached
    sweep.target_halfwidth) is no search of it."""
    df = df[df["status"].astype(str) != NOT_NEEDED].copy()
    df["cell"] = [split_search(c)[0] for c in df["cell"]]
    rows = []
    for _, group in df.groupby(["study", "cell"], sort=False):
        row = group.iloc[0].to_dict()
        row["searches"] = len(group)
        for c in _SUMMED:
            if c in group:
                row[c] = group[c].fillna(0).sum()
        statuses = sorted(set(group["status"].astype(str)))
        row["status"] = statuses[0] if len(statuses) == 1 else ", ".join(statuses)
        for c in [c for c in group if c.startswith("param/")] + ["search_value", "at_edge", "best_trial", "error"]:
            if c in group:
                row[c] = _joined(group[c])
        if "run_dirs" in group:
            row["run_dirs"] = ";".join(str(d) for d in group["run_dirs"] if d == d and d)
        rows.append(row)
    return pd.DataFrame(rows).drop(columns=["search"])


def _wandb_config(config: dict[str, Any]) -> dict[str, Any]:
    """A wandb run's config with its labels as one `labels` block, whether wandb kept the block
    nested (`labels: {study: ...}`) or flattened it into `labels.study`, ... keys."""
    config = dict(config)
    flat = {k.removeprefix("labels."): config.pop(k) for k in list(config) if k.startswith("labels.")}
    if flat:
        config["labels"] = {**(config.get("labels") or {}), **flat}
    return config


def load_wandb(project: str, entity: str | None = None, group: str | None = None,
               api: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curves, finals) for runs synced to wandb, in the same shape as the run-file frames: config
    columns, `run` (the wandb run name) and the labels from the run config's `labels` block."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": group} if group else None
    curves, finals, unlabelled = [], [], 0
    for run in api.runs(path, filters=filters):
        info, labelled = _info(_wandb_config(dict(run.config)), run.name)
        unlabelled += not labelled
        history = pd.DataFrame(list(run.scan_history()))
        if not history.empty:
            history = history.rename(columns={"_step": "step"})
            history = history[[c for c in history.columns if not c.startswith("_")]]
            for k, v in info.items():
                history[k] = v
            curves.append(history)
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        finals.append({**summary, **info})
    _warn_unlabelled(unlabelled, len(finals), f"wandb project {path}")
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return curves_df, pd.DataFrame(finals)
