"""Beta × masking heatmap of the objective, one panel per model size, annotated mean ± sd over seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from analysis.common import compared_runs
from analysis.style import COLUMN_IN, label, save, setup


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    runs, metric = compared_runs(results)
    stats = runs.groupby(["model.name", "dpo.beta", "masking"])["objective"].agg(["mean", "std", "count"])
    stats = stats.reset_index()
    models = sorted(stats["model.name"].unique())
    fig, axes = plt.subplots(1, len(models), squeeze=False,
                             layout="constrained", figsize=(max(COLUMN_IN, 2.6 * len(models)), 2.6))
    vmin, vmax = stats["mean"].min(), stats["mean"].max()
    for ax, model in zip(axes[0], models, strict=True):
        sub = stats[stats["model.name"] == model]
        mean = sub.pivot(index="dpo.beta", columns="masking", values="mean").sort_index()
        std = sub.pivot(index="dpo.beta", columns="masking", values="std").reindex_like(mean)
        annot = mean.map(lambda v: f"{v:.3f}") + std.fillna(0).map(lambda v: f"\n±{v:.3f}")
        sns.heatmap(mean, annot=annot, fmt="", cmap="viridis", vmin=vmin, vmax=vmax, ax=ax,
                    cbar=ax is axes[0][-1], cbar_kws={"label": label(metric)},
                    annot_kws={"fontsize": 6})
        ax.set(title=f"{model}", xlabel=label("masking"), ylabel=label("dpo.beta"))
    n = int(stats["count"].max())
    fig.suptitle(f"{label(metric)}: mean ± sd over up to {n} seed(s)", fontsize=9)
    return save(fig, out, "heatmap_beta_masking")


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
