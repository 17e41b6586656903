"""The reward-versus-KL frontier of the controlled task (the DPO paper's Figure 2, left): every
evaluation point of every run as gen/kl against gen/reward, coloured by beta, SFT reference marked."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from analysis.common import beta_label, curves_or_fail
from analysis.style import COLUMN_IN, MissingData, label, save, setup

REFERENCE = "gen/ref_reward"  # the SFT reference's reward on the same prompts


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    try:
        curves = curves_or_fail(results, ["gen/reward", "gen/kl"])
    except MissingData as err:
        raise MissingData(f"reward-vs-KL frontier: {err} (only the controlled task has a "
                          "ground-truth reward; the seed data has none)") from None
    points = beta_label(curves.dropna(subset=["gen/reward", "gen/kl"]))
    paths = []
    for model, frame in points.groupby("model.name", sort=True):
        fig, ax = plt.subplots(layout="constrained", figsize=(COLUMN_IN + 1.1, 2.7))
        sns.scatterplot(data=frame, x="gen/kl", y="gen/reward", hue="β", style="masking",
                        palette="viridis", s=14, alpha=0.8, ax=ax,
                        hue_order=sorted(frame["β"].unique(), key=float))
        if REFERENCE in frame and frame[REFERENCE].notna().any():
            ref = frame[REFERENCE].dropna().mean()
            ax.scatter([0], [ref], marker="*", s=120, color="crimson", zorder=5, label="SFT reference")
            ax.axhline(ref, color="crimson", lw=0.6, ls="--")
        ax.set(xlabel=label("gen/kl"), ylabel=label("gen/reward"),
               title=f"{model}: reward vs KL, every eval point")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
        paths += save(fig, out, f"frontier_{model}")
    return paths


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
