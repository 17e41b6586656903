"""Model size (parameters, log scale) against the objective, one line per beta, one panel per
masking (per method and masking in a study of several methods); points are means over fresh seed
reruns with 95% t-interval error bars."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.ticker import FixedLocator, NullLocator

from analysis.common import beta_label, compared_runs, methods_apart
from analysis.style import COLUMN_IN, MissingData, label, save, setup
from analysis.table import cell_estimates


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    runs, metric = compared_runs(results)
    if runs["n_params"].nunique() < 2:
        raise MissingData("the model-size figure needs runs of at least two model sizes")
    runs = beta_label(methods_apart(runs))
    maskings = sorted(runs["masking"].dropna().unique())
    fig, axes = plt.subplots(1, len(maskings), squeeze=False, sharey=True,
                             layout="constrained", figsize=(max(COLUMN_IN, 2.4 * len(maskings)), 2.6))
    est = cell_estimates(runs, ["masking", "β", "n_params"])
    betas = sorted(est["β"].unique(), key=float)
    colours = dict(zip(betas, sns.color_palette("viridis", len(betas)), strict=True))
    for j, (ax, masking) in enumerate(zip(axes[0], maskings, strict=True)):
        for beta in betas:
            sub = est[(est["masking"] == masking) & (est["β"] == beta)].sort_values("n_params")
            low = (sub["mean"] - sub["ci95 low"]).fillna(0)
            high = (sub["ci95 high"] - sub["mean"]).fillna(0)
            ax.errorbar(sub["n_params"], sub["mean"], yerr=[low, high], marker="o", ms=3,
                        capsize=2, lw=1, color=colours[beta], label=beta)
        if j == len(maskings) - 1:
            ax.legend(title="β", fontsize=6)
        ax.set_xscale("log")
        sizes = sorted(runs["n_params"].unique())  # ticks at the model sizes, labelled in millions
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{n / 1e6:.2g}M" for n in sizes])
        ax.set(title=f"masking: {masking}", xlabel=label("n_params"), ylabel=label(metric))
    fig.suptitle("Does it hold as the model grows? (mean, 95% t-interval over fresh seeds)",
                 fontsize=9)
    return save(fig, out, "model_size")


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
