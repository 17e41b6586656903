"""Optuna per cell: optimisation history and hyperparameter importances, styled like the rest."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from analysis.style import COLUMN_IN, MissingData, save, setup


def draw(results: Path, out: Path) -> list[Path]:
    import optuna
    from optuna.visualization import matplotlib as ovm

    setup()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    dbs = sorted(Path(results).glob("*/optuna.db"))
    if not dbs:
        raise MissingData(f"no Optuna study under {results} (run `harness sweep` first)")
    paths = []
    for db in dbs:
        storage = f"sqlite:///{db.resolve()}"
        for summary in sorted(optuna.get_all_study_summaries(storage), key=lambda s: s.study_name):
            if summary.study_name.endswith("/seeds") or summary.n_trials == 0:
                continue
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            if not done:
                continue
            safe = summary.study_name.replace("/", "_")
            ax = ovm.plot_optimization_history(study)
            _finish(ax, f"history: {summary.study_name}")
            paths += save(ax.figure, out, f"optuna_history_{safe}")
            # Importances need two parameters or more (one parameter is trivially 100%).
            if len(done) >= 2 and len(study.trials[0].params) >= 2:
                ax = ovm.plot_param_importances(study)
                _finish(ax, f"importances: {summary.study_name}")
                paths += save(ax.figure, out, f"optuna_importance_{safe}")
    if not paths:
        raise MissingData("the Optuna studies have no completed trial")
    return paths


def _finish(ax, title: str) -> None:
    ax.figure.set_size_inches(COLUMN_IN, 2.4)
    ax.set_title(title, fontsize=8)
    if ax.get_legend() is not None:
        ax.legend(fontsize=6)


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
