"""Beta × masking heatmap of the objective, one panel per model size, annotated with the mean,
the half-width of its 95% t-interval and n (the fresh seed reruns counted). A cell none of whose
runs counts (every rerun degenerate or diverged) is grey, "n=0" with what left its runs out. In a
study of several methods a column is a method and masking."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from analysis.common import compared_runs, methods_apart, scored
from analysis.load import load_study_summaries
from analysis.style import COLUMN_IN, label, save, setup
from analysis.table import cell_estimates, results_table


def _empty_cells(results: Path) -> pd.DataFrame:
    """The results table's cells with n 0, in the heatmap's columns, with `left out`: what
    excluded their runs ("3 degenerate")."""
    table = results_table(results)
    empty = table[table["n"] == 0].copy()
    if empty.empty or not {"model.name", "dpo.beta", "masking"} <= set(empty):
        return empty.iloc[0:0]
    if "method" in empty and table["method"].nunique() > 1:
        empty["masking"] = empty["method"] + " · " + empty["masking"].fillna("").astype(str)

    def left_out(row) -> str:
        parts = [f"{row.get(col, 0):.0f} {word}" for col, word in
                 (("degenerate reruns", "degenerate"), ("diverged reruns", "diverged"))
                 if pd.notna(row.get(col)) and row.get(col, 0) > 0]
        return ", ".join(parts) or "no run"

    empty["left out"] = [left_out(r) for r in empty.to_dict("records")]
    return empty[["model.name", "dpo.beta", "masking", "n", "left out"]]


def _size(n_models: int, runs) -> tuple[float, float]:
    """Room for every column and β: a panel widens past 3 columns (method · masking columns)."""
    cols = runs["masking"].nunique()
    panel = max(2.6, 0.8 * cols + 0.8)
    return max(COLUMN_IN, panel * n_models), 2.6 + (0.8 if cols > 3 else 0)


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    runs, metric = compared_runs(results)
    runs = methods_apart(runs)
    stats = cell_estimates(runs, ["model.name", "dpo.beta", "masking"])
    stats["half"] = (stats["ci95 high"] - stats["ci95 low"]) / 2
    stats = pd.concat([stats, _empty_cells(results)], ignore_index=True)
    models = list(runs.groupby("model.name")["n_params"].first().sort_values().index)  # by size
    fig, axes = plt.subplots(1, len(models), squeeze=False,
                             layout="constrained", figsize=_size(len(models), runs))
    vmin, vmax = stats["mean"].min(), stats["mean"].max()
    for ax, model in zip(axes[0], models, strict=True):
        sub = stats[stats["model.name"] == model]
        mean = sub.pivot(index="dpo.beta", columns="masking", values="mean").sort_index()
        half = sub.pivot(index="dpo.beta", columns="masking", values="half").reindex_like(mean)
        n = sub.pivot(index="dpo.beta", columns="masking", values="n").reindex_like(mean)
        left = (sub.pivot(index="dpo.beta", columns="masking", values="left out").reindex_like(mean)
               if "left out" in sub else None)
        annot = mean.astype(object)
        for row in mean.index:
            for col in mean.columns:
                v, h, k = mean.loc[row, col], half.loc[row, col], n.loc[row, col]
                why = left.loc[row, col] if left is not None else None
                if pd.isna(v):
                    annot.loc[row, col] = f"n=0\n{why}" if isinstance(why, str) else ""
                    continue
                annot.loc[row, col] = f"{v:.3f}" + (
                    "" if pd.isna(h) else f"\n±{h:.3f}") + f"\nn={k:.0f}"
        ax.set_facecolor("0.88")  # cells without an estimate
        sns.heatmap(mean, annot=annot, fmt="", cmap="viridis", vmin=vmin, vmax=vmax, ax=ax,
                    cbar=ax is axes[0][-1], cbar_kws={"label": metric},
                    annot_kws={"fontsize": 6})
        # seaborn leaves NaN cells unannotated: say what the grey cells are.
        for i, row in enumerate(mean.index):
            for j, col in enumerate(mean.columns):
                if pd.isna(mean.loc[row, col]) and annot.loc[row, col]:
                    ax.text(j + 0.5, i + 0.5, annot.loc[row, col], ha="center", va="center",
                            fontsize=6, color="0.25")
        ax.grid(False)
        ax.set(title=f"{model}", xlabel=label("masking"), ylabel=label("dpo.beta"))
        ax.tick_params(axis="x", labelrotation=30 if mean.shape[1] > 3 else 0)
    what, over = scored(load_study_summaries(results), metric)
    fig.suptitle(f"{what}\nmean ± 95% t-interval over {over} (n per cell)", fontsize=8)
    return save(fig, out, "heatmap_beta_masking")


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
