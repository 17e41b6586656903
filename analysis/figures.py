"""Draw every figure: `python -m analysis.figures [RESULTS_DIR] [OUT_DIR]` (what `make figures` runs).

A figure whose data is missing says so and the others are still drawn."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from analysis import (
    fig_curves,
    fig_frontier,
    fig_heatmap,
    fig_notebook,
    fig_optuna,
    fig_scaling,
    fig_size,
    findings,
    table,
)
from analysis.load import only_study, studies
from analysis.style import MissingData

SCRIPTS = {
    "notebook plots": fig_notebook, "curves by beta": fig_curves, "beta x masking heatmap": fig_heatmap,
    "model size": fig_size, "reward-vs-KL frontier": fig_frontier, "data scaling": fig_scaling,
    "optuna": fig_optuna,
    "results table": table, "findings": findings,
}


def main(results: Path, out: Path) -> int:
    """Every figure into `out`; when `results` holds several studies, each study's into
    out/<study>/ from its own runs only (a table or a finding never pools two studies)."""
    several = studies(results)
    if len(several) < 2:
        return draw_all(results, out)
    failed = 0
    for study in several:
        print(f"study {study}:")
        with only_study(study):
            failed += draw_all(results, out / study)
    return 1 if failed else 0


def draw_all(results: Path, out: Path) -> int:
    failed = 0
    for name, module in SCRIPTS.items():
        try:
            paths = module.draw(results, out)
            print(f"{name}: {len(paths)} file(s) -> {out}")
        except MissingData as err:
            print(f"{name}: skipped: {err}")
        except Exception:  # noqa: BLE001 - one broken figure must not stop the others
            failed += 1
            print(f"{name}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    raise SystemExit(main(Path(args[0]) if args else Path("results"),
                          Path(args[1]) if len(args) > 1 else Path("analysis/figures")))
