"""Learning-rate ranges from a pre-scan: where each group of cells scores best.

Every finished run of the given studies (search trials and seed reruns alike: each is one run at
one learning rate) gives a point (log10 train.lr, score). Per cell, a quadratic in log10 lr is
fitted by least squares; its peak is the cell's best rate. Per group of cells (by default model
size x masking, whose best rates differ most) the range is a factor `width` wide around the
geometric mean of its cells' peaks, its top held at the group's largest stable rate (below the
first rate at which more than --max-degenerate of the runs ended degenerate), printed as a
`sweep.search_by` block to paste into the experiment, beside a table of what each cell showed. A cell whose fit has no interior peak (not
concave, or peaking outside the rates it scanned) is named and left out of its group's centre: its
best rate lies at or beyond an edge of the scan, which then needs widening.

    .venv/bin/python -m analysis.lr_scan results [--study default-a --study default-b]
        [--by model.name,masking] [--width 5] [--metric gen/reward_at_kl]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import load_finals, only_study
from harness.frontier import SCORE

LR = "train.lr"


def cell_peak(lr: pd.Series, score: pd.Series) -> dict:
    """The quadratic fit of score on log10(lr): its peak rate and fitted score there, or why
    there is none (`peak` None: fewer than 4 runs, no curvature down, or a peak outside the
    scanned rates)."""
    x, y = np.log10(lr.to_numpy(float)), score.to_numpy(float)
    out = {"runs": len(x), "scanned": (float(10 ** x.min()), float(10 ** x.max())) if len(x) else None,
           "peak": None, "at_peak": None, "why": ""}
    if len(x) < 4 or np.ptp(x) == 0:
        out["why"] = f"{len(x)} runs: too few to fit"
        return out
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 >= 0:
        out["why"] = "no peak (the fit curves up): the best rate is at an edge of the scan"
        return out
    top = -c1 / (2 * c2)
    if not x.min() <= top <= x.max():
        out["why"] = f"peak at {10 ** top:.2g}, outside the scanned {10 ** x.min():.2g}..{10 ** x.max():.2g}"
        return out
    out.update(peak=float(10 ** top), at_peak=float(c0 + c1 * top + c2 * top ** 2))
    return out


def scan(finals: pd.DataFrame, by: list[str], metric: str = SCORE) -> pd.DataFrame:
    """One row per cell: its group (`by`), its peak (cell_peak) over the runs with a finite score."""
    missing = [c for c in [LR, metric, "cell", *by] if c not in finals]
    if missing:
        raise ValueError(f"the runs have no {', '.join(missing)} (columns of their config or summary)")
    runs = finals[np.isfinite(pd.to_numeric(finals[metric], errors="coerce"))]
    rows = []
    for cell, g in runs.groupby("cell", sort=True):
        rows.append({**{k: g[k].iloc[0] for k in by}, "cell": cell, **cell_peak(g[LR], g[metric])})
    return pd.DataFrame(rows)


def stable_limit(lr: pd.Series, degenerate: pd.Series, max_share: float = 0.2,
                 decade_bins: int = 10, min_runs: int = 3) -> float | None:
    """The largest stable rate: the lower edge of the first bin of log10 lr (1/decade_bins of a
    decade wide, from the lowest rate up) in which more than `max_share` of at least `min_runs`
    runs ended degenerate (their samples left the language or the KL ceiling); None when no bin
    does (every scanned rate is stable)."""
    x = np.floor(np.log10(lr.to_numpy(float)) * decade_bins)
    bad = degenerate.fillna(False).astype(bool).to_numpy()
    for b in np.unique(x):
        inside = x == b
        if inside.sum() >= min_runs and bad[inside].mean() > max_share:
            return float(10 ** (b / decade_bins))
    return None


def ranges(cells: pd.DataFrame, by: list[str], width: float,
           limits: dict[str, float | None] | None = None) -> list[dict]:
    """Per group: the geometric mean of its cells' peaks and the range `width` wide around it,
    its top held at the group's largest stable rate (`limits`, by group name) when that is
    lower: the range then narrows from above, or, where the stable rate lies within a factor
    sqrt(sqrt(width)) of the peak or below it, spans a factor sqrt(width) below the stable rate.
    A group without a fitted peak but with a stable rate gets that last range too."""
    out = []
    for key, g in cells.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        name = ",".join(map(str, key))
        peaks = g["peak"].dropna()
        limit = (limits or {}).get(name)
        row = {"group": name, "cells": len(g), "fitted": len(peaks), "stable": limit}
        half = math.sqrt(width)
        if len(peaks):
            centre = math.exp(np.log(peaks.to_numpy(float)).mean())
            low, high = centre / half, min(centre * half, limit or math.inf)
            if high < low * math.sqrt(half):  # too little room between the lower bound and the limit
                low = high / half
            row.update(centre=centre, low=low, high=high)
        elif limit is not None:
            row.update(low=limit / half, high=limit)
        out.append(row)
    return out


def group_limits(finals: pd.DataFrame, by: list[str], max_share: float) -> dict[str, float | None]:
    """stable_limit of each group's runs, pooled over its cells (stability is a matter of model
    size and masking more than of beta)."""
    if "degenerate" not in finals:
        return {}
    return {",".join(map(str, k if isinstance(k, tuple) else (k,))):
            stable_limit(g[LR], g["degenerate"], max_share) for k, g in finals.groupby(by, sort=True)}


def report(cells: pd.DataFrame, groups: list[dict], by: list[str], width: float, metric: str) -> str:
    lines = [f"Per cell: a quadratic in log10({LR}) fitted to {metric} over every finished run.", "",
             "| cell | runs | scanned | peak rate | fitted score there |", "| --- | --- | --- | --- | --- |"]
    for r in cells.itertuples():
        scanned = "" if r.scanned is None else f"{r.scanned[0]:.2g}..{r.scanned[1]:.2g}"
        peak = f"{r.peak:.3g}" if r.peak is not None and r.peak == r.peak else f"none: {r.why}"
        at = f"{r.at_peak:.3f}" if r.at_peak is not None and r.at_peak == r.at_peak else ""
        lines.append(f"| {r.cell} | {r.runs} | {scanned} | {peak} | {at} |")
    lines += ["", f"Ranges a factor {width:g} wide around each group's peak (geometric mean of its "
              "cells' peaks), the top held at its largest stable rate (no more than "
              "the given share of runs degenerate below it):", "", "```yaml", "  search_by:",
              f"    {','.join(by)}:"]
    for g in groups:
        stable = "every rate stable" if g.get("stable") is None else f"stable below {g['stable']:.2e}"
        peak = f"peak {g['centre']:.2e} ({g['fitted']} of {g['cells']} cells fitted)" \
            if "centre" in g else "no fitted peak: below the stable rate"
        if "low" in g:
            lines.append(f"      {g['group']}: {{{LR}: {{type: log_float, low: {g['low']:.2e}, "
                         f"high: {g['high']:.2e}}}}}   # {peak}, {stable}")
        else:
            lines.append(f"      # {g['group']}: no cell with an interior peak and no unstable rate: "
                         "widen its scan")
    lines.append("```")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.lr_scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results directory holding the studies")
    ap.add_argument("--study", action="append", help="a study to read (repeatable; default: all)")
    ap.add_argument("--by", default="model.name,masking", help="grid axes that set a range (commas)")
    ap.add_argument("--width", type=float, default=5.0, help="high/low of each range")
    ap.add_argument("--metric", default=SCORE, help="the score (a metric in each run's summary)")
    ap.add_argument("--max-degenerate", type=float, default=0.2,
                    help="a rate is unstable where more than this share of runs end degenerate")
    args = ap.parse_args(argv)
    if args.width <= 1:
        ap.error(f"--width {args.width}: must be > 1 (high / low)")
    frames = []
    for study in args.study or [None]:
        with only_study(study):
            frames.append(load_finals(args.results))
    finals = pd.concat(frames, ignore_index=True)
    if finals.empty:
        ap.error(f"no finished runs under {args.results}" + (f" for {args.study}" if args.study else ""))
    by = [a.strip() for a in args.by.split(",")]
    try:
        cells = scan(finals, by, args.metric)
    except ValueError as err:
        ap.error(str(err))
    limits = group_limits(finals, by, args.max_degenerate)
    print(report(cells, ranges(cells, by, args.width, limits), by, args.width, args.metric), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
