"""The reward-versus-KL frontier of the controlled task (the DPO paper's Figure 2, left), one
figure per study and model size (`frontier_<study>_<model>`): x = gen/kl, y = gen/reward, and
where the task has a language (the controlled task) two panels beside it on the same KL axis: the
reward of the samples that parse (gen/reward_parsed) and the fraction that parse (gen/parsed), so
a reward that stalls because samples leave the language shows as such.

Drawn for the runs each cell is compared on (analysis.common.best_runs) and the cells' degenerate
seed reruns, which are shown hollow, never dropped: each run's path through its eval points (thin,
light), its final point with gen/kl_se and gen/reward_se error bars, and per method the Pareto
front over the cells' final points averaged over seeds (degenerate and diverged runs left out of
the mean), each front point with the 95% t-intervals of its cell's reward and KL over seeds. Colour =
method (analysis.methods), marker = β, line style = masking (when the figure holds more than one,
each masking has its own front). The SFT reference is a star at KL 0 (its gen/ref_reward);
best-of-N from results/<study>/baselines/best_of_n.csv is a solid black line with a point per N at
its KL estimated from samples (± se), its closed-form KL bound a dashed line beside it, or the
legend says the file is missing. The KL axis ends a
little past the unflagged runs and best-of-N: a degenerate run far beyond (hundreds of nats) is
drawn at the right edge as a hollow triangle, and the figure says how many and how far."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D

from analysis import methods
from analysis.common import best_runs, curves_or_fail
from analysis.load import load_finals
from analysis.style import COLUMN_IN, MissingData, label, save, setup
from harness.stats import estimate

REFERENCE = "gen/ref_reward"  # the SFT reference's reward on the same prompts
X, Y = "gen/kl", "gen/reward"
PARSED, Y_PARSED = "gen/parsed", "gen/reward_parsed"  # the task's language, where it has one
BETA_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
NO_BETA_MARKER = "p"
MASKING_LINES = ["-", "--", ":", "-."]
CELL = ["method", "β", "masking", "study", "cell"]  # what a cell's mean is taken over


@dataclass
class Frontier:
    """What one model's figure plots (every frame has the columns the plot reads)."""
    study: str  # "" for runs outside a sweep
    model: str
    paths: pd.DataFrame  # every eval point of every shown run
    finals: pd.DataFrame  # one row per run: its last eval point, `flag` degenerate/diverged/""
    fronts: pd.DataFrame  # cell means on a front, with `series` (method, or method · masking)
    reference: float | None  # mean gen/ref_reward
    baseline: pd.DataFrame | None  # best-of-N rows of this model, by N
    baseline_note: str  # legend text for best-of-N

    @property
    def name(self) -> str:
        """<study>_<model>, or <model> for runs outside a sweep: the figure's file name part."""
        return f"{self.study}_{self.model}" if self.study else self.model


def _true(value) -> bool:
    """A summary.json flag read back by pandas (True, numpy True, None or NaN)."""
    return value is not None and value == value and bool(value)


def _flags(results: Path) -> pd.DataFrame:
    """Per run: `flag` = degenerate (summary.json says so), diverged (its status), else ''."""
    finals = load_finals(results, finished_only=False)
    if finals.empty:
        return pd.DataFrame(columns=["run", "flag"])
    degenerate = finals["degenerate"] if "degenerate" in finals else pd.Series(False, index=finals.index)
    flag = ["degenerate" if _true(d) else "diverged" if s == "diverged" else ""
            for d, s in zip(degenerate, finals["status"], strict=True)]
    return pd.DataFrame({"run": finals["run"], "flag": flag})


def shown_points(results: Path) -> pd.DataFrame:
    """Every eval point with gen/reward and gen/kl of the compared runs and all seed reruns, with
    `method`, `β` ('' for methods without one) and `flag` columns."""
    try:
        curves = curves_or_fail(results, [Y, X])
    except MissingData as err:
        raise MissingData(f"reward-vs-KL frontier: {err} (only the controlled task has a "
                          "ground-truth reward; the seed data has none)") from None
    kept = best_runs(results, curves)["run"]
    seeds = curves["run"][curves["role"] == "seeds"] if "role" in curves else kept.iloc[:0]
    pts = curves[curves["run"].isin(set(kept) | set(seeds))].dropna(subset=[X, Y])
    pts = methods.add_method(pts).merge(_flags(results), on="run", how="left")
    pts["flag"] = pts["flag"].fillna("")
    pts["β"] = [("" if m in methods.WITHOUT_BETA else f"{b:g}")
                for m, b in zip(pts["method"], pts["dpo.beta"], strict=True)]
    for col in ("masking", "study", "cell"):
        pts[col] = pts[col].fillna("") if col in pts else ""
    return pts


def fronts(paths: pd.DataFrame, by_masking: bool) -> pd.DataFrame:
    """Per series the Pareto front over the cells' mean eval points: every cell's runs averaged at
    each number of pairs seen (the DPO paper's Figure 2 takes every run's checkpoints), with the
    95% t-interval half-widths of reward and KL over its seeds; degenerate and diverged runs left
    out. The SFT reference (0 pairs seen) starts every front."""
    ok = paths[paths["flag"] == ""]
    if ok.empty:
        return pd.DataFrame(columns=[*CELL, "examples_seen", X, Y, "n", "x_half", "y_half", "series"])
    cells = ok.groupby([*CELL, "examples_seen"], sort=True).agg(
        **{X: (X, "mean"), Y: (Y, "mean"), "n": ("run", "size"), "x_half": (X, _half),
           "y_half": (Y, _half)}).reset_index()
    cells["series"] = cells["method"] + (" · " + cells["masking"] if by_masking else "")
    start = cells["examples_seen"] == 0  # every cell's first point is the same SFT reference
    cells = cells[~start | ~cells.duplicated(["series", "examples_seen"])]
    return pd.concat([methods.pareto_front(g) for _, g in cells.groupby("series", sort=True)],
                     ignore_index=True)


def _half(values: pd.Series) -> float:
    """Half the width of the 95% t-interval of the mean (0 for a single value)."""
    e = estimate(values.dropna().tolist()) if values.notna().any() else None
    return 0.0 if e is None or e.low is None else (e.high - e.low) / 2


def frontiers(results: Path) -> list[Frontier]:
    """One Frontier per study and model size, in name order."""
    pts = shown_points(results)
    baseline = methods.read_best_of_n(results)
    out = []
    for (study, model), frame in pts.groupby(["study", "model.name"], sort=True):
        finals = frame.groupby("run", sort=True).tail(1).reset_index(drop=True)
        ref = frame[REFERENCE].dropna().mean() if REFERENCE in frame else None
        if baseline is None:
            bon, note = None, "best-of-N: no baselines/best_of_n.csv"
        else:
            mine = (baseline["model.name"] == model) & (baseline["study"] == study)
            bon = baseline[mine].sort_values("n", ignore_index=True)
            bound = (bon["kl_kind"] == "bound").all()
            note = f"best-of-N{' (KL: upper bound)' if bound else ' (KL from samples)'}" if len(bon) \
                else "best-of-N: none for this model"
            bon = bon if len(bon) else None
        out.append(Frontier(str(study), str(model), frame, finals, fronts(frame, frame["masking"].nunique() > 1),
                            None if ref is None or pd.isna(ref) else float(ref), bon, note))
    return out


def _styles(f: Frontier) -> tuple[dict, dict, dict]:
    """Colour per method, marker per β, line style per masking."""
    betas = sorted((b for b in f.paths["β"].unique() if b), key=float)
    markers = dict(zip(betas, BETA_MARKERS * 3, strict=False)) | {"": NO_BETA_MARKER}
    maskings = sorted(f.paths["masking"].unique())
    return (methods.colours(f.paths["method"]), markers,
            dict(zip(maskings, MASKING_LINES * 3, strict=False)))


def _draw_runs(ax, f: Frontier, colour: dict, marker: dict, line: dict, y: str = Y) -> None:
    """Each run's path and final point on (gen/kl, y); the fronts only on the reward panel."""
    for _, path in f.paths.dropna(subset=[y]).groupby("run", sort=True):
        first = path.iloc[0]
        ax.plot(path[X], path[y], color=colour[first["method"]], ls=line[first["masking"]],
                lw=0.6, alpha=0.3, zorder=1)
    for _, r in f.finals.dropna(subset=[y]).iterrows():
        c = colour[r["method"]]
        xerr = r.get("gen/kl_se") if pd.notna(r.get("gen/kl_se")) else None
        yerr = r.get("gen/reward_se") if y == Y and pd.notna(r.get("gen/reward_se")) else None
        ax.errorbar([r[X]], [r[y]], xerr=xerr, yerr=yerr, marker=marker[r["β"]], ms=4,
                    color=c, mfc="none" if r["flag"] else c, elinewidth=0.6, capsize=1.5,
                    alpha=0.8, ls="none", zorder=2)
    if y != Y:
        return
    for _, front in f.fronts.groupby("series", sort=True):
        first = front.iloc[0]
        ax.errorbar(front[X], front[Y], xerr=front["x_half"], yerr=front["y_half"],
                    color=colour[first["method"]], ls=line[first["masking"]], lw=1.6,
                    elinewidth=1.0, capsize=2.0, zorder=3)


def _draw_baselines(ax, f: Frontier) -> None:
    if f.reference is not None:
        ax.scatter([0], [f.reference], marker="*", s=120, color="black", zorder=5)
    if f.baseline is not None:
        b, colour = f.baseline, methods.PALETTE[methods.BEST_OF_N]
        estimated = (b["kl_kind"] != "bound").all()
        ax.errorbar(b["kl"], b["reward"], xerr=b["kl_se"] if estimated else None, yerr=b["reward_se"],
                    color=colour, ls="-" if estimated else "--", lw=1.0, marker=".", ms=4,
                    capsize=1.5, elinewidth=0.6, zorder=4)
        if estimated:  # the closed-form bound beside the estimate
            ax.plot(b["kl_bound"], b["reward"], color=colour, ls="--", lw=0.8, alpha=0.6, zorder=4)
        for _, r in b.iterrows():
            ax.annotate(f"N={r['n']:g}", (r["kl"], r["reward"]), fontsize=5,
                        textcoords="offset points", xytext=(3, -6))


def _legend(ax, f: Frontier, colour: dict, marker: dict, line: dict) -> None:
    def entry(text, **kw):
        return Line2D([], [], color=kw.pop("color", "grey"), label=text, **kw)

    handles = [entry(m, color=c, lw=1.6) for m, c in colour.items()]
    handles += [entry(f"β {b}", marker=mk, ls="none") for b, mk in marker.items()
                if b and b in set(f.paths["β"])]
    if (f.paths["β"] == "").any():
        handles.append(entry(f"no β ({', '.join(sorted(methods.WITHOUT_BETA))})",
                             marker=NO_BETA_MARKER, ls="none"))
    if len(line) > 1:
        handles += [entry(f"masking {m}", ls=ls) for m, ls in line.items()]
    if (f.finals["flag"] != "").any():
        handles.append(entry("hollow: degenerate or diverged run", marker="o", mfc="none", ls="none"))
    handles += [entry("thin: a run's eval points", lw=0.6), entry("thick: front of cell means", lw=1.6)]
    if f.reference is not None:
        handles.append(entry("SFT reference", color="black", marker="*", ms=8, ls="none"))
    if f.baseline is not None and (f.baseline["kl_kind"] != "bound").all():
        handles += [entry(f.baseline_note, color="black", marker=".", lw=1.0),
                    entry("best-of-N at its KL bound", color="black", ls="--", lw=0.8)]
    else:
        handles.append(entry(f.baseline_note, color="black", ls="--" if f.baseline is not None else "none"))
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside


def kl_limit(f: Frontier) -> float:
    """Where the KL axis ends: 15% past the fronts, the unflagged runs' final points and best-of-N
    (at least 1 nat), or past every point when that is within twice as far. A path that runs on
    past it is cut at the edge, a final point beyond is marked there (_draw_beyond)."""
    ok = [*f.finals[f.finals["flag"] == ""][X].tolist(), *f.fronts[X].tolist()]
    inside = max([*ok, *(f.baseline["kl"].tolist() if f.baseline is not None else []), 1.0])
    every = max(f.paths[X].max(), inside)
    return 1.15 * (every if every <= 2 * inside else inside)


def _draw_beyond(ax, f: Frontier, xmax: float, colour: dict) -> None:
    """Final points past the axis end: a hollow triangle at the edge, and how many and how far."""
    far = f.finals[f.finals[X] > xmax]
    if far.empty:
        return
    for _, r in far.iterrows():
        ax.plot([xmax], [r[Y]], marker=">", ms=5, mfc="none", color=colour[r["method"]],
                ls="none", zorder=2, clip_on=False)
    ax.annotate(f"{len(far)} run(s) beyond, KL up to {far[X].max():.0f} nats", (0.99, 0.02),
                xycoords="axes fraction", ha="right", va="bottom", fontsize=6)


def language_panels(f: Frontier) -> list[str]:
    """The extra panels this frontier has data for: reward over parsed samples, fraction parsed."""
    return [y for y in (Y_PARSED, PARSED) if y in f.paths and f.paths[y].notna().any()]


def plot(f: Frontier):
    """The figure of one model's Frontier: reward vs KL, then the language panels."""
    extra = language_panels(f)
    fig, axes = plt.subplots(1, 1 + len(extra), layout="constrained", sharex=True, squeeze=False,
                             figsize=(COLUMN_IN + 2.4 + 2.6 * len(extra), 3.0))
    ax = axes[0][0]
    colour, marker, line = _styles(f)
    _draw_runs(ax, f, colour, marker, line)
    _draw_baselines(ax, f)
    xmax = kl_limit(f)
    ax.set_xlim(min(-0.03 * xmax, f.paths[X].min()), xmax)
    _draw_beyond(ax, f, xmax, colour)
    ax.set(xlabel=label(X), ylabel=label(Y), title=f"{f.study + ' · ' if f.study else ''}{f.model}: reward vs KL")
    for panel, y in zip(axes[0][1:], extra, strict=True):
        _draw_runs(panel, f, colour, marker, line, y)
        start = f.paths[f.paths["step"] == 0][y].dropna() if "step" in f.paths else pd.Series([])
        if len(start):  # step 0: the policy is the SFT reference
            panel.scatter([0], [start.mean()], marker="*", s=120, color="black", zorder=5)
        panel.set(xlabel=label(X), ylabel=label(y), title="of the samples that parse" if y == Y_PARSED
                  else "samples that parse (the task's language)")
        if y == PARSED:
            panel.set_ylim(-0.02, 1.02)
    _legend(axes[0][-1], f, colour, marker, line)
    return fig


def draw(results: Path, out: Path) -> list[Path]:
    setup()
    paths = []
    for f in frontiers(results):
        paths += save(plot(f), out, f"frontier_{f.name}")
    return paths


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
