"""Model size (parameters, log scale) against the objective, one line per beta, one panel per
masking; points are means over seeds with sd error bars."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.ticker import FixedLocator, NullLocator

from analysis.common import beta_label, compared_runs
from analysis.style import COLUMN_IN, MissingData, label, save, setup


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    runs, metric = compared_runs(results)
    if runs["n_params"].nunique() < 2:
        raise MissingData("the model-size figure needs runs of at least two model sizes")
    runs = beta_label(runs)
    maskings = sorted(runs["masking"].dropna().unique())
    fig, axes = plt.subplots(1, len(maskings), squeeze=False, sharey=True,
                             layout="constrained", figsize=(max(COLUMN_IN, 2.4 * len(maskings)), 2.6))
    for j, (ax, masking) in enumerate(zip(axes[0], maskings, strict=True)):
        sub = runs[runs["masking"] == masking]
        sns.lineplot(data=sub, x="n_params", y="objective", hue="β", marker="o", errorbar="sd",
                     err_style="bars", palette="viridis", ax=ax, legend=j == len(maskings) - 1,
                     hue_order=sorted(sub["β"].unique(), key=float))
        ax.set_xscale("log")
        sizes = sorted(runs["n_params"].unique())  # ticks at the model sizes, labelled in millions
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{n / 1e6:.2g}M" for n in sizes])
        ax.set(title=f"masking: {masking}", xlabel=label("n_params"), ylabel=label(metric))
    fig.suptitle("Does it hold as the model grows? (mean ± sd over seeds)", fontsize=9)
    return save(fig, out, "model_size")


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
