"""Loss, reward margin and reward accuracy on the validation split against examples seen, coloured by
beta, one column per masking (per method and masking in a study of several methods), bands = sd
over seeds (the runs each cell is compared on)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from analysis.common import best_runs, beta_label, curves_or_fail, methods_apart
from analysis.style import COLUMN_IN, label, save, setup

METRICS = ["eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"]


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    curves = beta_label(methods_apart(best_runs(results, curves_or_fail(results, ["eval/loss"]))))
    curves = curves.dropna(subset=["eval/loss"])
    paths = []
    for model, frame in curves.groupby("model.name", sort=True):
        maskings = sorted(frame["masking"].dropna().unique())
        fig, axes = plt.subplots(len(METRICS), len(maskings), squeeze=False, sharex=True,
                                 sharey="row", layout="constrained", figsize=(max(COLUMN_IN, 1.9 * len(maskings)), 5.2))
        hue_order = sorted(frame["β"].unique(), key=float)
        for j, masking in enumerate(maskings):
            sub = frame[frame["masking"] == masking]
            for i, metric in enumerate(METRICS):
                ax = axes[i, j]
                sns.lineplot(data=sub, x="examples_seen", y=metric, hue="β", hue_order=hue_order,
                             errorbar="sd", ax=ax, legend=(i == 0 and j == len(maskings) - 1),
                             palette="viridis")
                ax.set(xlabel=label("examples_seen") if i == len(METRICS) - 1 else "",
                       # the title says validation: the split-free label
                       ylabel=label(metric.removeprefix("eval/")) if j == 0 else "")
                if i == 0:
                    ax.set_title(f"masking: {masking}")
        fig.suptitle(f"{model}: validation curves by β (band = sd over seeds)", fontsize=9)
        paths += save(fig, out, f"curves_{model}")
    return paths


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
