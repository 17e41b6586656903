"""The seed notebook's two plots: DPO loss and reward margin (train and validation) against
examples seen, one figure per study (mean over its compared runs, band = sd) or per single run.

The notebook's "reward margin" is the log-ratio margin without β (`logratios/margins`)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from analysis.common import best_runs, curves_or_fail
from analysis.style import COLUMN_IN, label, save, setup


def tidy(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    parts = []
    for split, name in (("train", "train"), ("eval", "validation")):
        col = f"{split}/{metric}"
        if col in curves:
            part = curves[["run", "examples_seen", col]].dropna().rename(columns={col: "value"})
            part["split"] = name
            parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    curves = best_runs(results, curves_or_fail(results, ["train/loss"]))
    curves["group"] = curves["study"].fillna(curves["run"])
    paths = []
    for group, frame in curves.groupby("group", sort=True):
        fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(2 * COLUMN_IN, 2.4))
        for ax, metric, title in ((axes[0], "loss", "DPO loss"),
                                  (axes[1], "logratios/margins", "Reward margin (notebook units, no β)")):
            data = tidy(frame, metric)
            sns.lineplot(data=data, x="examples_seen", y="value", hue="split", errorbar="sd", ax=ax,
                         hue_order=["train", "validation"])
            ax.set(title=title, xlabel=label("examples_seen"), ylabel=label(metric))
        n = frame["run"].nunique()
        fig.suptitle(f"{group} ({n} run{'s' if n > 1 else ''}{', band = sd' if n > 1 else ''})", fontsize=9)
        safe = str(group).replace("/", "_")
        paths += save(fig, out, f"notebook_{safe}")
    return paths


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
