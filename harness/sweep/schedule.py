"""Which trial runs next, and running it.

Workers (processes, or machines sharing a storage) take work from the storage, so nothing runs
twice: each cell's search study fills `trials` slots; once a cell's search is over its best
parameters are queued in `<study>/<cell>/seeds` for the remaining seeds.

Every step is re-derivable from the storage and the run folders, so a sweep killed at any moment
continues where it was: a slot's run folder and sampler seed come from (cell, slot), not from
Optuna's trial counter; a trial whose worker died is failed and retried with the same parameters;
a run that finished before its value reached the storage is read back, not trained again; missing
seed reruns are queued again. A cell whose trials fail `max_failures` times in a row is marked
failed and skipped; the sweep goes on with the other cells. An adaptive search (beyond
`sweep.searches`) begins only when harness.sweep.estimate says the cell's interval needs it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from harness import rundir
from harness.chaos import crash_point
from harness.config import Cell, Experiment
from harness.sweep import estimate, faults
from harness.sweep.storage import HEARTBEAT_S, host, open_storage, without_password
from harness.sweep.study import (
    count,
    make_study,
    objective_value,
    pin_precision,
    slot_seed,
    suggest,
)
from harness.sweep.trial import claim, free_slot, run_trial, seed_offset, settle_slot, waiting_slot


class _QuietSurplus(logging.Filter):
    """Optuna logs every failed trial with its traceback; a surplus trial is routine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Surplus(" not in record.getMessage()


logging.getLogger("optuna.study._optimize").addFilter(_QuietSurplus())


def first_cell(cells: list[Cell], worker: int, workers: int) -> int:
    """Where worker k of K starts scanning the cells: at the first cell of the k-th model size
    when the grid has several (so that the shared work each worker needs first, an SFT checkpoint
    and a pair set, is built side by side rather than waited for), else k/K of the way down the
    list. Either way the trials of one cell tend to run one after another, each seeing the ones
    before. One worker goes in grid order."""
    if workers < 2:
        return 0
    sizes = [dict(c.values).get("model.name") for c in cells]
    distinct = list(dict.fromkeys(sizes))
    if len(distinct) > 1:
        return sizes.index(distinct[worker % len(distinct)])
    return (worker % workers) * len(cells) // workers


class Sweep:
    def __init__(self, exp: Experiment, storage_url: str, results_dir: Path, worker: int = 0,
                 workers: int = 1, quiet: bool = False):
        self.exp = exp
        self.worker = worker  # index of this worker process on this machine
        # One worker on a local file storage draws exactly the same trials after any restart;
        # several workers (or machines) also mix in who they are, so that they draw apart.
        self.tag = "" if workers == 1 and not storage_url.startswith("postgresql") \
            else f"{host()}:{os.getpid()}:{worker}"
        self.storage_url = storage_url
        self.storage = open_storage(storage_url)
        self.results_dir = Path(results_dir)
        self.study_dir = rundir.study_dir(self.results_dir, exp.study)
        # Every run of the study computes in one precision (None: the grid varies it).
        self.precision = pin_precision(exp, self.storage, (lambda m: None) if quiet else None)
        start = first_cell(exp.cells, worker, workers)
        self.cells = exp.cells[start:] + exp.cells[:start]

    def search_study(self, cell: Cell, seed: int | None = None):
        return make_study(self.exp, self.storage, f"{self.exp.study}/{cell.id}", seed)

    def run_dir(self, cell: Cell, role: str, slot: int) -> Path:
        return rundir.trial_dir(self.study_dir, cell.id, role, slot)

    # -- one trial ------------------------------------------------------------------------
    def _objective(self, cell: Cell, role: str, slot: int):
        import optuna

        exp = self.exp

        def objective(trial: optuna.Trial) -> float:
            claim(trial)
            # Retries and seed reruns are enqueued trials that carry their slot and parameters.
            s = settle_slot(trial, slot, exp.spec.trials) if role == "search" \
                else seed_offset(trial)
            params = {k: suggest(trial, k, p) for k, p in exp.space(cell).items()}
            run_dir = self.run_dir(cell, role, s)
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("cell", cell.id)
            offset = s if role == "seeds" else 0
            tags = [f"{a.split('.')[-1]}={v}" for a, v in cell.values] + [role]
            tags += [f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in params.items()]
            cfg = exp.run_config(cell, params, offset, f"{cell.id}/{run_dir.name}", tags)
            if self.precision is not None:
                cfg.train.precision = self.precision
            # results_dir/runs/<name> is run_dir; wandb keeps the study's runs in results_dir/wandb.
            cfg.tracking.results_dir = str(self.study_dir)
            labels = {"study": exp.study, "cell": cell.id, "trial": trial.number, "role": role,
                      "storage": without_password(self.storage_url)}

            def on_eval(step: int, values: dict[str, float]) -> None:
                if step > 0:
                    crash_point("eval")
                value = objective_value(exp.spec.objective, values)
                if value is None or role != "search":
                    return
                trial.report(value, step)
                if trial.should_prune():
                    from harness.errors import RunPruned

                    raise RunPruned(f"pruned at step {step}")

            summary = run_trial(trial, cfg, run_dir, on_eval, labels, role)
            trial.set_user_attr("precision", summary.get("precision"))
            if summary.get("degenerate"):
                trial.set_user_attr("degenerate", True)
            value = objective_value(exp.spec.objective, summary)
            if value is None:
                err = f"{run_dir}: objective {exp.spec.objective.metric} missing or not finite"
                trial.set_user_attr("error", err)
                raise ValueError(err)
            return value

        return objective

    # -- what to do next --------------------------------------------------------------------
    def _seed_study(self, cell: Cell, search):
        """The seeds study of a finished cell, with a rerun queued for every seed that has none:
        whoever gets here first after a kill queues what is missing (queuing is idempotent)."""
        import optuna

        name = f"{self.exp.study}/{cell.id}/seeds"
        seeds = optuna.create_study(study_name=name, storage=self.storage, load_if_exists=True,
                                    direction=self.exp.spec.objective.direction)
        best = search.best_trial
        crash_point("seeds")
        if "best_trial" not in seeds.user_attrs:
            seeds.set_user_attr("best_trial", best.number)
            seeds.set_user_attr("best_params", best.params)
        params = seeds.user_attrs["best_params"]
        have = {int(t.user_attrs.get("seed_offset", -1)) for t in seeds.get_trials(deepcopy=False)
                if t.state.name != "FAIL" or faults.real_failure(t)}
        for k in range(1, self.exp.spec.seeds):
            if k not in have:
                seeds.enqueue_trial(params, user_attrs={"seed_offset": k,
                                                        "best_trial": seeds.user_attrs["best_trial"]})
        return seeds

    def next_work(self):
        """(study, cell, role, slot) of the next trial to run, or None when nothing is left."""
        spec = self.exp.spec
        for cell in self.cells:
            search = self.search_study(cell)
            if faults.cell_failure(search, spec.max_failures):
                continue
            if estimate.is_extra(spec, cell) and not self._extra_runs(cell, search):
                continue
            slot = waiting_slot(search)  # a retry runs (in its own slot) before new trials
            slot = free_slot(search, spec.trials) if slot is None else slot
            if slot is not None:
                study = self.search_study(cell, slot_seed(spec.sampler_seed, cell.id, slot, self.tag))
                return study, cell, "search", slot
        if spec.seeds < 2:
            return None
        for cell in self.cells:
            search = self.search_study(cell)
            if count(search, "RUNNING", "WAITING") or count(search, "COMPLETE", "PRUNED") < spec.trials:
                continue  # the search is still going: its best trial is not final yet
            if not count(search, "COMPLETE"):
                continue  # every trial pruned or failed: no best parameters to repeat
            seeds = self._seed_study(cell, search)
            if count(seeds, "WAITING"):
                return seeds, cell, "seeds", 0
        return None

    def _extra_runs(self, cell: Cell, search) -> bool:
        """Whether adaptive search `cell` runs now: begun already, or the one after the cell's
        last begun search and wanted (harness.sweep.estimate.extra_search_wanted)."""
        if search.get_trials(deepcopy=False):
            return True
        before = Cell(cell.values, (cell.search or 0) - 1)
        if estimate.is_extra(self.exp.spec, before) and not estimate.opened(self, before):
            return False  # adaptive searches run one at a time per cell
        return bool(estimate.extra_search_wanted(self, cell))

    def pending(self) -> int:
        """Trials still running in some worker (each will finish, or be found stale and retried)."""
        import optuna

        return sum(count(optuna.load_study(study_name=n, storage=self.storage), "RUNNING")
                   for n in self.study_names())

    def work(self) -> int:
        """Run trials until nothing is left and no other worker still runs one; returns how many
        this worker ran."""
        import optuna

        ran = 0
        while True:
            for name in self.study_names():
                faults.reap_stale(optuna.load_study(study_name=name, storage=self.storage))
            job = self.next_work()
            if job is None:
                if not self.pending():
                    return ran
                time.sleep(HEARTBEAT_S)  # another worker's trial may still finish or fail
                continue
            study, cell, role, slot = job
            print(f"[{os.getpid()}] {role} {cell.id}" + (f" slot {slot}" if role == "search" else ""),
                  file=sys.stderr, flush=True)
            study.optimize(self._objective(cell, role, slot), n_trials=1, catch=(Exception,))
            ran += 1

    def study_names(self) -> list[str]:
        import optuna

        prefix = f"{self.exp.study}/"
        return [s.study_name for s in optuna.get_all_study_summaries(self.storage)
                if s.study_name.startswith(prefix)]

