"""Beta × masking heatmap of the objective, one panel per model size, annotated with the mean,
the half-width of its 95% t-interval and n (the fresh seed reruns counted). In a study of several
methods a column is a method and masking."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from analysis.common import compared_runs, methods_apart
from analysis.style import COLUMN_IN, label, save, setup
from analysis.table import cell_estimates


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
    models = list(runs.groupby("model.name")["n_params"].first().sort_values().index)  # by size
    fig, axes = plt.subplots(1, len(models), squeeze=False,
                             layout="constrained", figsize=_size(len(models), runs))
    vmin, vmax = stats["mean"].min(), stats["mean"].max()
    for ax, model in zip(axes[0], models, strict=True):
        sub = stats[stats["model.name"] == model]
        mean = sub.pivot(index="dpo.beta", columns="masking", values="mean").sort_index()
        half = sub.pivot(index="dpo.beta", columns="masking", values="half").reindex_like(mean)
        n = sub.pivot(index="dpo.beta", columns="masking", values="n").reindex_like(mean)
        annot = mean.astype(object)
        for row in mean.index:
            for col in mean.columns:
                v, h, k = mean.loc[row, col], half.loc[row, col], n.loc[row, col]
                annot.loc[row, col] = "" if pd.isna(v) else f"{v:.3f}" + (
                    "" if pd.isna(h) else f"\n±{h:.3f}") + f"\nn={k:.0f}"
        sns.heatmap(mean, annot=annot, fmt="", cmap="viridis", vmin=vmin, vmax=vmax, ax=ax,
                    cbar=ax is axes[0][-1], cbar_kws={"label": label(metric)},
                    annot_kws={"fontsize": 6})
        ax.set(title=f"{model}", xlabel=label("masking"), ylabel=label("dpo.beta"))
        ax.tick_params(axis="x", labelrotation=30 if mean.shape[1] > 3 else 0)
    fig.suptitle(f"{label(metric)}: mean ± 95% t-interval over fresh seeds (n per cell)", fontsize=9)
    return save(fig, out, "heatmap_beta_masking")


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
