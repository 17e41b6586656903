"""Optuna per cell: optimisation history and hyperparameter importances, styled like the rest.

The studies are read from the storage each sweep used, as its runs' `storage` label says (SQLite,
PostgreSQL or a journal file), opened without heartbeat, only to read; a study whose runs name no
storage (runs without labels) is read from results/<study>/optuna.db, older sweeps' default. Only
the Optuna studies of the studies found under the results directory (`<study>/<cell>`) are drawn,
not their seed reruns (`<study>/<cell>/seeds`)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from analysis.load import in_scope, load_study_summaries, run_dirs, run_info
from analysis.style import COLUMN_IN, MissingData, label, save, setup
from harness.rundir import OPTUNA_DB


def _file_of(url: str) -> str | None:
    """The file behind a file-based storage URL (SQLite or journal), None for a database server."""
    from harness.sweep.storage import is_journal

    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    return url.removeprefix("journal:") if is_journal(url) else None


def _with_file(url: str, path: Path) -> str:
    if url.startswith("sqlite:"):
        return f"sqlite:///{path}"
    return f"journal:{path}" if url.startswith("journal:") else str(path)


def storages(results: Path) -> tuple[dict[str, set[str]], list[str]]:
    """{storage URL: studies that used it} for the studies under `results`, and what could not be
    found. A file-based storage missing at its recorded path (results copied from elsewhere) is
    looked for under results/<study>/ by file name; it is never opened where it does not exist,
    since opening would create an empty one. A study whose runs name no storage (written by an
    older harness) is looked for in results/<study>/optuna.db, the default storage."""
    from harness.sweep.storage import masked

    results = Path(results)
    used: dict[str, set[str]] = {}
    for rd in run_dirs(results):
        info = run_info(rd, results)
        if info["study"] is not None and info["storage"] is not None:
            used.setdefault(info["storage"], set()).add(info["study"])
    out: dict[str, set[str]] = {}
    missing = []
    for url, studies in sorted(used.items()):
        file = _file_of(url)
        if file is not None and not Path(file).exists():
            here = sorted(p for s in studies if (p := results / s / Path(file).name).exists())
            if not here:
                missing.append(f"storage {masked(url)} of study {', '.join(sorted(studies))} not found")
                continue
            url = _with_file(url, here[0].resolve())
        out.setdefault(url, set()).update(studies)
    named = set().union(*used.values()) if used else set()
    for db in sorted(results.glob(f"*/{OPTUNA_DB}")):
        if db.parent.name not in named and in_scope(db, results):
            out.setdefault(f"sqlite:///{db.resolve()}", set()).add(db.parent.name)
    return out, missing


def draw(results: Path, out: Path) -> list[Path]:
    import optuna
    from optuna.visualization import matplotlib as ovm

    from harness.sweep.storage import masked, open_storage

    setup()
    found, missing = storages(results)
    if not found:
        raise MissingData("; ".join(missing) if missing else
                          f"no Optuna study under {results} (run `harness sweep` first)")
    cells = load_study_summaries(results)
    objective = dict(zip(cells["study"], cells["objective"], strict=True)) if "objective" in cells else {}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    paths, failed = [], []
    for url, studies in found.items():
        try:
            storage = open_storage(url, heartbeat=False)
            names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage)
                           if s.n_trials > 0 and not s.study_name.endswith("/seeds")
                           and any(s.study_name.startswith(f"{study}/") for study in studies))
        except Exception as err:  # noqa: BLE001 - draw the other storages' studies, then fail
            failed.append(f"{masked(url)}: {err!r}")
            continue
        for name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            if not done:
                continue
            metric = objective.get(name.split("/", 1)[0])
            safe = name.replace("/", "_")
            # target_name is the y label and the points' legend entry.
            ax = ovm.plot_optimization_history(study, target_name=label(metric) if metric else "objective")
            _finish(ax, f"history: {name}", history=True)
            paths += save(ax.figure, out, f"optuna_history_{safe}")
            # Importances need two parameters or more (one parameter is trivially 100%).
            if len(done) >= 2 and len(done[0].params) >= 2:
                ax = ovm.plot_param_importances(study)
                _finish(ax, f"importances: {name}", history=False)
                paths += save(ax.figure, out, f"optuna_importance_{safe}")
    for m in missing:
        print(f"warning: {m}; its Optuna figures are left out")
    if failed:
        raise RuntimeError("could not read the Optuna storage(s) " + "; ".join(failed)
                           + (f" ({len(paths)} file(s) drawn from the others)" if paths else ""))
    if not paths:
        raise MissingData("the Optuna studies have no completed trial")
    return paths


def _finish(ax, title: str, history: bool) -> None:
    # Optuna draws in its own style: bring sizes and labels back to the other figures'.
    ax.figure.set_size_inches(COLUMN_IN, 2.4)
    ax.set_title(title, fontsize=8)
    ax.xaxis.label.set_size(8)
    ax.yaxis.label.set_size(8)
    ax.tick_params(labelsize=7)
    if history:
        ax.set_xlabel(label("trial"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend() is not None:
        ax.legend(fontsize=6)


if __name__ == "__main__":
    print("\n".join(map(str, draw(Path(sys.argv[1] if len(sys.argv) > 1 else "results"),
                                  Path("analysis/figures")))))
