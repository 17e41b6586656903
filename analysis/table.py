"""The results table: per cell (and per precision: bf16 and fp32 runs are never pooled) the
objective estimated from the runs the study counts (its fresh seed reruns, never the search trial
that picked the parameters), computed from those runs' own files: n, mean, median, sd and the 95% t-interval; beside it what is not averaged in (diverged
and degenerate reruns), the search trial's own value and the best parameters, flagged when they
sit at an edge of the cell's range. A study of several methods has a `method` column (see
analysis.methods). CSV and Markdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis.common import cell_keys, compared_runs
from analysis.load import load_study_summaries
from harness import stats

BESIDE = ("gen/reward", "gen/kl")  # shown beside the score, each a mean over the same runs
# Columns copied from the sweep's summary.csv (what the runs' files cannot say).
FROM_STUDY = {"search_value": "search trial", "seeds_diverged": "diverged reruns", "seeds_degenerate":
              "degenerate reruns", "other_precision": "other-precision reruns",
              "at_edge": "at range edge", "estimate_from": "estimate from",
              "degenerate": "degenerate reruns in the mean"}


def cell_estimates(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """n, mean, median, sd and 95% interval of `objective` per group of `keys`; beside the score,
    the mean final gen/reward and gen/kl of the same runs (where they log them), so that reward
    and KL are read apart from the score that combines them."""
    rows = []
    for values, group in runs.groupby(keys, sort=True):
        e = stats.estimate(group["objective"].tolist())
        rows.append({**dict(zip(keys, values, strict=True)), "n": e.n, "mean": e.mean,
                     "ci95 low": e.low, "ci95 high": e.high, "median": e.median, "sd": e.sd,
                     **{f"final {m}": group[m].mean() for m in BESIDE if m in group}})
    return pd.DataFrame(rows)


def results_table(results: Path) -> pd.DataFrame:
    runs, metric = compared_runs(results)
    keys = cell_keys(runs)
    cells = load_study_summaries(results)
    # A loss axis of the grid is in summary.csv as dpo.loss: match on it, show it as `method`.
    loss = ["dpo.loss"] if "dpo.loss" in cells and "dpo.loss" in runs and runs["dpo.loss"].notna().all() \
        else []
    # Runs that all name their sweep cell are matched to summary.csv by (study, cell): exact, also
    # for a list of grids, whose rows leave the axes a cell's grid does not set empty.
    by_cell = not cells.empty and {"study", "cell"} <= set(runs) and runs[["study", "cell"]].notna().all().all()
    ids = ["study", "cell"] if by_cell else []
    table = cell_estimates(runs, keys + loss + ids).rename(columns={"mean": "objective mean"})
    on = ids or [k for k in keys + loss if k in cells]
    if cells.empty or not on:
        return table.drop(columns=loss)
    params = {c: c.removeprefix("param/") for c in cells if c.startswith("param/")}
    cells = cells.rename(columns={**FROM_STUDY, **params})
    extra = [c for c in [*FROM_STUDY.values(), *params.values()] if c in cells]
    table = table.merge(cells[on + extra].drop_duplicates(on), on=on, how="left")
    # A cell none of whose runs counts (every rerun degenerate or diverged, or the cell failed)
    # is a row with n 0 and its counts, not a missing row.
    if "estimate_n" in cells:
        shown = [k for k in keys if k in cells]
        empty = cells[cells["estimate_n"].fillna(0) == 0][list(dict.fromkeys(shown + on + extra))]
        table = pd.concat([table, empty.assign(n=0)], ignore_index=True) if len(empty) else table
    return table.drop(columns=[*loss, *ids]).sort_values(keys, ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def draw(results: Path, out: Path) -> list[Path]:
    table = results_table(results)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / "results_table.csv", out / "results_table.md"
    table.to_csv(csv, index=False, float_format="%.6g", lineterminator="\n")
    md.write_text(to_markdown(table))
    return [csv, md]


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
