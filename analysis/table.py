"""The results table: each cell's best hyperparameters and objective mean ± sd over seeds, computed
from the compared runs' own files, as CSV and Markdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis.common import compared_runs
from analysis.load import load_study_summaries


def results_table(results: Path) -> pd.DataFrame:
    runs, metric = compared_runs(results)
    keys = ["model.name", "dpo.beta", "masking"]
    agg = runs.groupby(keys)["objective"].agg(["mean", "std", "count"]).reset_index()
    agg = agg.rename(columns={"mean": f"{metric} mean", "std": f"{metric} sd", "count": "seeds"})
    cells = load_study_summaries(results)
    params = [c for c in cells.columns if c.startswith("param/")] if not cells.empty else []
    if params:
        best = runs.sort_values("run").groupby(keys).first().reset_index()
        for p in params:
            field = p.removeprefix("param/")
            if field in best:
                agg = agg.merge(best[keys + [field]], on=keys, how="left")
    return agg.sort_values(keys, ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

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
