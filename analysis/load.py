"""Load run directories (or synced wandb runs) into tidy pandas DataFrames.

    curves = load_curves("results")   # one row per (run, logged step)
    finals = load_finals("results")   # one row per run
    cells  = load_study_summaries("results")  # the sweeps' summary.csv tables

Every config field becomes a column named by its dotted path (`dpo.beta`, `model.name`, ...), plus
derived columns: `run` (the run directory relative to the results directory), `masking`
(`masked-mean`, `full-sum`, ...: the sweep's masking axis), `study` and `cell` for sweep runs, and
`seed`. Only the run files are read (config.json, metrics.jsonl, summary.json), never logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd


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


def run_dirs(results: str | Path) -> list[Path]:
    """Every directory under `results` holding a config.json and a metrics.jsonl, sorted."""
    results = Path(results)
    return sorted(p.parent for p in results.rglob("metrics.jsonl") if (p.parent / "config.json").exists())


def run_info(run_dir: Path, results: Path) -> dict[str, Any]:
    """Config columns and derived labels of one run."""
    config = json.loads((run_dir / "config.json").read_text())
    info = flatten({k: v for k, v in config.items() if k != "sweep"})
    info["run"] = str(run_dir.relative_to(results))
    info["masking"] = f"{'masked' if info.get('dpo.mask_prompt', True) else 'full'}-{info.get('dpo.reduction')}"
    info["seed"] = info.get("train.seed")
    info["study"] = info.get("tracking.group")
    name = str(info.get("name", ""))
    info["cell"] = name.split("/")[0] if "/" in name else None
    return info


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            # A run killed mid-write can leave half a last line: skip it, say so.
            if i == len(path.read_text().splitlines()) - 1:
                print(f"warning: {path}: line {i + 1} is incomplete; skipped")
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON: {err}") from None
    return rows


def load_curves(results: str | Path) -> pd.DataFrame:
    """One row per (run, logged step): step, examples_seen, the metrics logged then, config columns."""
    results = Path(results)
    frames = []
    for rd in run_dirs(results):
        rows = read_jsonl(rd / "metrics.jsonl")
        if not rows:
            continue
        df = pd.DataFrame(rows)
        for k, v in run_info(rd, results).items():
            df[k] = v
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).sort_values(["run", "step"], kind="stable", ignore_index=True)


def load_finals(results: str | Path, finished_only: bool = True) -> pd.DataFrame:
    """One row per run: summary.json values and config columns (unfinished runs left out unless asked)."""
    results = Path(results)
    rows = []
    for rd in run_dirs(results):
        path = rd / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        if finished_only and summary.get("status") != "finished":
            continue
        rows.append({**run_info(rd, results), **summary})
    return pd.DataFrame(rows).sort_values("run", ignore_index=True) if rows else pd.DataFrame()


def load_study_summaries(results: str | Path) -> pd.DataFrame:
    """The sweeps' per-cell tables (results/<study>/summary.csv), with a `study` column."""
    frames = []
    for path in sorted(Path(results).glob("*/summary.csv")):
        df = pd.read_csv(path)
        df.insert(0, "study", path.parent.name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_wandb(project: str, entity: str | None = None, group: str | None = None,
               api: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curves, finals) for runs synced to wandb, in the same shape as the run-file frames."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": group} if group else None
    curves, finals = [], []
    for run in api.runs(path, filters=filters):
        info = flatten({k: v for k, v in dict(run.config).items() if k != "sweep"})
        info["run"] = run.name
        info["masking"] = f"{'masked' if info.get('dpo.mask_prompt', True) else 'full'}-{info.get('dpo.reduction')}"
        info["seed"] = info.get("train.seed")
        info["study"] = run.group
        history = pd.DataFrame(list(run.scan_history()))
        if not history.empty:
            history = history.rename(columns={"_step": "step"})
            history = history[[c for c in history.columns if not c.startswith("_")]]
            for k, v in info.items():
                history[k] = v
            curves.append(history)
        finals.append({**info, **{k: v for k, v in dict(run.summary).items() if not k.startswith("_")}})
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return curves_df, pd.DataFrame(finals)
