"""replication.md: two independent runs of one study (harness replicate) side by side.

Per cell: each replica's estimate (n, mean, 95% t-interval over the runs its summary counts) and
whether the two intervals overlap. Per finding (every comparison analysis.findings makes in
either replica): whether it **replicates** (separated in both, the same way), **flips**
(separated in both, opposite ways), is **inconclusive in one** (separated in one replica only)
or is **not separated in either**.

    python -m analysis.replication RESULTS STUDY_A STUDY_B [OUT.md] [--took STUDY=SECONDS]
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from analysis.common import cell_keys, compared_runs
from analysis.findings import arithmetic, comparisons
from analysis.load import only_study
from analysis.table import cell_estimates

VERDICTS = ("replicates", "flips", "inconclusive in one", "not separated in either")


@dataclass
class Replica:
    """One study as replication.md reads it: its compared runs, the keys that name a cell, its
    per-cell estimates, and the objective's metric."""

    study: str
    runs: pd.DataFrame
    keys: list[str]
    estimates: pd.DataFrame
    metric: str


def load(results: Path, study: str) -> Replica:
    with only_study(study):
        runs, metric = compared_runs(results)
    keys = [k for k in cell_keys(runs) if k != "precision"]
    est = cell_estimates(runs, keys) if len(runs) else pd.DataFrame()
    if est.empty:  # no run counted (every rerun degenerate, say): a table with no rows
        est = pd.DataFrame(columns=[*keys, "n", "mean", "ci95 low", "ci95 high"])
    return Replica(study, runs, keys, est, metric)


def _name(values) -> str:
    """A cell's name from its key values: "tiny-xs, 0.1, masked-sum"."""
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _interval(row) -> str:
    if row is None or row["n"] == 0:
        return "no runs"
    if row["ci95 low"] is None or pd.isna(row["ci95 low"]):
        return f"n {row['n']}, {row['mean']:.3g} (no interval)"
    return f"n {row['n']}, {row['mean']:.3g} [{row['ci95 low']:.3g}, {row['ci95 high']:.3g}]"


def overlap(a, b) -> bool | None:
    """Whether two estimates' intervals overlap; None when either has none."""
    if a is None or b is None or pd.isna(a["ci95 low"]) or pd.isna(b["ci95 low"]):
        return None
    return bool(a["ci95 low"] <= b["ci95 high"] and b["ci95 low"] <= a["ci95 high"])


def cell_rows(est_a: pd.DataFrame, est_b: pd.DataFrame, keys: list[str]) -> list[dict]:
    """One record per cell of either replica: its name, both estimates, whether they overlap."""
    both = pd.concat([est_a[keys], est_b[keys]]).drop_duplicates().sort_values(keys)
    out = []
    for _, cell in both.iterrows():
        pick = [e[(e[keys] == cell[keys]).all(axis=1)] for e in (est_a, est_b)]
        a, b = (p.iloc[0] if len(p) else None for p in pick)
        out.append({"cell": _name(cell[keys]),
                    "a": _interval(a), "b": _interval(b), "overlap": overlap(a, b)})
    return out


def verdict(a: dict | None, b: dict | None) -> str:
    """How one comparison fares in the two replicas (each a findings.comparisons record)."""
    sep = [c is not None and c["interval"] is not None and c["interval"].separated for c in (a, b)]
    if all(sep):
        return "replicates" if (a["diff"] > 0) == (b["diff"] > 0) else "flips"
    return "inconclusive in one" if any(sep) else "not separated in either"


def finding_rows(runs_a: pd.DataFrame, runs_b: pd.DataFrame) -> list[dict]:
    def key(c: dict) -> tuple:
        return c["axis"], c["where"], c["a"], c["b"]

    ca, cb = ({key(c): c for c in comparisons(r)} for r in (runs_a, runs_b))
    out = []
    for k in sorted(set(ca) | set(cb)):
        a, b = ca.get(k), cb.get(k)
        out.append({"finding": f"{k[1]}: {k[2]} − {k[3]}" if k[1] else f"{k[2]} − {k[3]}",
                    "axis": k[0], "a": _diff(a), "b": _diff(b), "verdict": verdict(a, b)})
    return out


def _diff(c: dict | None) -> str:
    if c is None:
        return "not compared"
    d = c["interval"]
    spread = "no interval" if d is None else f"[{d.low:+.3g}, {d.high:+.3g}]"
    mark = " separated" if d is not None and d.separated else ""
    return f"{c['diff']:+.3g} {spread}{mark}"


def report(results: Path, studies: list[str], took: dict[str, float] | None = None,
           command: str = "") -> str:
    return _report([load(results, s) for s in studies], took, command)


def _report(replicas: list[Replica], took: dict[str, float] | None, command: str) -> str:
    a, b = replicas
    studies, keys, runs_a, runs_b = [a.study, b.study], a.keys, a.runs, b.runs
    cells = cell_rows(a.estimates, b.estimates, keys)
    findings = finding_rows(runs_a, runs_b)
    counts = {v: sum(f["verdict"] == v for f in findings) for v in VERDICTS}
    overlapping = sum(c["overlap"] is True for c in cells)
    apart = [c["cell"] for c in cells if c["overlap"] is False]
    took = took or {}
    lines = [f"# Replication: {studies[0]} and {studies[1]}", "",
             f"{date.today().isoformat()}, `{command}` on {os.cpu_count()} cores ({platform.machine()}); "
             + "; ".join(
                 f"{s}: {took[s]:.0f} s" for s in studies if s in took), "",
             f"- {studies[0]}: {arithmetic(runs_a)}", f"- {studies[1]}: {arithmetic(runs_b)}", "",
             f"**Cells**: intervals overlap in {overlapping} of {len(cells)}"
             + (f"; apart: {', '.join(apart)}" if apart else "") + ". "
             f"**Findings** ({len(findings)} comparisons): {counts['replicates']} replicate "
             f"(separated in both, the same way), {counts['flips']} flip, "
             f"{counts['inconclusive in one']} separated in one replica only, "
             f"{counts['not separated in either']} separated in neither.", "",
             "## Cells", "", f"| cell ({', '.join(keys)}) | {studies[0]} | {studies[1]} | overlap |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {c['cell']} | {c['a']} | {c['b']} | "
              f"{ {True: 'yes', False: '**no**', None: 'no interval'}[c['overlap']]} |" for c in cells]
    lines += ["", "## Findings", "", f"| finding | {studies[0]} | {studies[1]} | verdict |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {f['finding']} | {f['a']} | {f['b']} | {f['verdict']} |" for f in findings]
    return "\n".join(lines) + "\n"


def draw(results: Path, studies: list[str], out: Path) -> list[Path]:
    """replication.png: each cell's estimate and 95% interval in the two replicas side by side."""
    return _draw([load(results, s) for s in studies], out)


def _draw(replicas: list[Replica], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from analysis.style import COLUMN_IN, label, save, setup

    setup()
    keys = replicas[0].keys
    names = sorted({_name(r) for rep in replicas for r in rep.estimates[keys].itertuples(index=False)})
    fig, ax = plt.subplots(layout="constrained", figsize=(COLUMN_IN * 1.4, 0.3 * len(names) + 1.2))
    for shift, rep in zip((-0.15, 0.15), replicas, strict=True):
        est = rep.estimates
        y = [names.index(_name(r)) + shift for r in est[keys].itertuples(index=False)]
        err = [(est["mean"] - est["ci95 low"]).fillna(0), (est["ci95 high"] - est["mean"]).fillna(0)]
        ax.errorbar(est["mean"], y, xerr=err, fmt="o", ms=3, capsize=2, label=rep.study)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    metric = replicas[0].metric
    ax.set(xlabel=f"{label(metric)} ({metric})", ylabel=", ".join(keys))
    ax.legend(fontsize=6, loc="best")
    fig.suptitle("each cell in two independent replicas: mean and 95% t-interval", fontsize=8)
    return save(fig, out, "replication")


def write_report(results: Path, studies: list[str], out: Path, took: dict[str, float] | None = None,
                 command: str = "") -> Path:
    """replication.md (and replication.png beside it)."""
    from harness.atomic import atomic_write

    replicas = [load(Path(results), s) for s in studies]  # each study read once, for both
    _draw(replicas, out.parent)
    text = _report(replicas, took, command) + "\n![the cells in both replicas](replication.png)\n"
    return atomic_write(out, text)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("studies", nargs=2)
    p.add_argument("out", nargs="?", help="default: RESULTS/<first study>-replication.md")
    p.add_argument("--took", action="append", default=[], metavar="STUDY=SECONDS")
    p.add_argument("--command", default="python -m analysis.replication")
    args = p.parse_args(argv)
    took = {k: float(v) for k, _, v in (t.partition("=") for t in args.took)}
    out = Path(args.out) if args.out else Path(args.results) / f"{args.studies[0]}-replication.md"
    print(write_report(Path(args.results), args.studies, out, took, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
