"""Reward at matched KL against preference pairs seen: does more data move DPO's frontier?
(`scaling_<study>`, for a study whose cells vary the data: task.n_train_prompts,
task.samples_per_prompt or train.epochs.)

Top row: the reward at KL ≤ `KL_NATS` nats (gen/reward_at_kl_4: the best reward on a run's own
(gen/kl, gen/reward) path so far within the KL budget, harness.frontier) at each eval point, against
the pairs the run has trained on (examples_seen, log scale); bottom row: the fraction of samples
that parse at the same points. One column per method and β, one line per data setting (mean over
the runs each cell is compared on), its last point with the 95% t-interval over those runs.
Degenerate runs (past the KL ceiling, or samples mostly unparsed at the end) stay in the mean, as
the reward within the KL budget reads their path before they left it, and are also drawn on their
own (thin, dotted) so that they show; diverged runs are left out of the mean and drawn. Two
settings whose lines lie on one another at equal pairs seen say that the pairs seen, not how
they were drawn (prompts, samples per prompt, epochs), is what moved the frontier."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from analysis import methods
from analysis.common import best_runs, curves_or_fail
from analysis.fig_frontier import _flags
from analysis.style import COLUMN_IN, MissingData, label, save, setup
from harness.stats import estimate

KL_NATS = 4
SCORE = f"gen/reward_at_kl_{KL_NATS}"
PARSED = "gen/parsed"
AXES = ["task.n_train_prompts", "task.samples_per_prompt", "train.epochs"]  # the data settings
SHORT = {"task.n_train_prompts": "prompts", "task.samples_per_prompt": "samples/prompt",
         "train.epochs": "epochs"}


def scaling_points(results: Path) -> pd.DataFrame:
    """Eval points of the compared runs and seed reruns of studies whose cells vary the data, with
    `method`, `β`, `setting` (e.g. "4096 prompts · 4 samples/prompt · 1 epochs") and `flag`."""
    try:
        curves = curves_or_fail(results, [SCORE, "examples_seen"])
    except MissingData as err:
        raise MissingData(f"data-scaling figure: {err}") from None
    if "study" not in curves:
        raise MissingData("data-scaling figure: no sweep runs (it compares a study's cells)")
    kept = set(best_runs(results, curves)["run"])
    seeds = set(curves["run"][curves["role"] == "seeds"]) if "role" in curves else set()
    pts = curves[curves["run"].isin(kept | seeds) & curves["study"].notna()]
    axes = [a for a in AXES if a in pts]
    varying = {s for s, g in pts.groupby("study") if any(g[a].nunique() > 1 for a in axes)}
    pts = pts[pts["study"].isin(varying)].dropna(subset=[SCORE])
    if pts.empty:
        raise MissingData("data-scaling figure: no study varies task.n_train_prompts, "
                          "task.samples_per_prompt or train.epochs")
    pts = methods.add_method(pts).merge(_flags(results), on="run", how="left")
    pts["flag"] = pts["flag"].fillna("")
    pts["β"] = [("" if m in methods.WITHOUT_BETA else f"β {b:g}")
                for m, b in zip(pts["method"], pts["dpo.beta"], strict=True)]
    pts["column"] = (pts["method"] + " " + pts["β"]).str.strip()
    pts["setting"] = [" · ".join(f"{int(r[a])} {SHORT[a]}" for a in axes) for _, r in pts.iterrows()]
    pts["size"] = pts[axes].prod(axis=1)  # orders the settings (prompts × samples × epochs)
    return pts


def _final_interval(frame: pd.DataFrame, y: str) -> tuple[float, float, float, float] | None:
    """(pairs seen, mean, low, high) of the runs' last points; None without a value."""
    last = frame.sort_values("examples_seen").groupby("run").tail(1)
    values = last[y].dropna().tolist()
    if not values:
        return None
    e = estimate(values)
    return (last["examples_seen"].max(), e.mean, e.low if e.low is not None else e.mean,
            e.high if e.high is not None else e.mean)


def _draw_panel(ax, frame: pd.DataFrame, y: str, colours: dict) -> None:
    for setting, g in frame.groupby("setting", sort=False):
        ok, off = g[g["flag"] != "diverged"], g[g["flag"] != ""]
        for _, run in off.groupby("run"):
            ax.plot(run["examples_seen"], run[y], color=colours[setting], lw=0.6, ls=":", alpha=0.7)
        if ok.empty:
            continue
        mean = ok.groupby("examples_seen")[y].mean()
        ax.plot(mean.index, mean.values, color=colours[setting], lw=1.2, marker=".", ms=3)
        end = _final_interval(ok, y)
        if end is not None:
            x, m, lo, hi = end
            ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]], color=colours[setting], capsize=2.5,
                        elinewidth=1.0, marker="o", ms=3.5)
    ax.set_xscale("log")


def plot(study: str, pts: pd.DataFrame):
    columns = sorted(pts["column"].unique())
    order = pts.drop_duplicates("setting").sort_values("size")["setting"].tolist()
    colours = dict(zip(order, sns.color_palette("viridis", len(order)), strict=True))
    has_parsed = PARSED in pts and pts[PARSED].notna().any()
    rows = 2 if has_parsed else 1
    fig, axes = plt.subplots(rows, len(columns), squeeze=False, sharex=True, sharey="row",
                             layout="constrained", figsize=(max(COLUMN_IN, 2.5 * len(columns)) + 1.6,
                                                            2.3 * rows))
    for j, col in enumerate(columns):
        frame = pts[pts["column"] == col]
        _draw_panel(axes[0][j], frame, SCORE, colours)
        axes[0][j].set(title=col, ylabel=label(SCORE) if j == 0 else None)
        if has_parsed:
            _draw_panel(axes[1][j], frame, PARSED, colours)
            axes[1][j].set(ylabel=label(PARSED) if j == 0 else None, ylim=(-0.02, 1.02))
        axes[-1][j].set_xlabel("preference pairs seen")
    handles = [plt.Line2D([], [], color=colours[s], lw=1.2, label=s) for s in order]
    handles += [plt.Line2D([], [], color="grey", lw=0.6, ls=":", label="a degenerate (in the mean) or diverged run"),
                plt.Line2D([], [], color="grey", marker="o", ls="none",
                           label="end: mean, 95% t-interval over seeds")]
    axes[0][-1].legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{study}: reward at KL ≤ {KL_NATS} nats against pairs seen", fontsize=9)
    return fig


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    paths = []
    for study, pts in scaling_points(results).groupby("study", sort=True):
        paths += save(plot(str(study), pts), out, f"scaling_{study}")
    return paths


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
