"""Which trial runs next, and running it.

Workers (processes, or machines sharing a storage) take work from the storage, so nothing runs
twice: each cell's search study gets `trials` trials; once a cell's search is done its best
parameters are queued once in `<study>/<cell>/seeds` for the remaining seeds.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from harness.config import Cell, Experiment
from harness.sweep.storage import open_storage, without_password
from harness.sweep.study import count, make_study, objective_value, suggest


class Sweep:
    def __init__(self, exp: Experiment, storage_url: str, results_dir: Path, worker: int = 0):
        self.exp = exp
        self.worker = worker  # index of this worker process on this machine (sampler seeds)
        self.storage_url = storage_url
        self.storage = open_storage(storage_url)
        self.results_dir = Path(results_dir)
        self.study_dir = self.results_dir / exp.study

    def search_study(self, cell: Cell, worker: int = 0):
        return make_study(self.exp, self.storage, f"{self.exp.study}/{cell.id}", worker)

    # -- one trial ------------------------------------------------------------------------
    def _objective(self, cell: Cell, role: str):
        import optuna

        from harness.train import RunPruned, train

        exp = self.exp

        def objective(trial: optuna.Trial) -> float:
            # Seed reruns and retries are enqueued trials: suggest() returns their fixed values.
            params = {k: suggest(trial, k, p) for k, p in exp.spec.search.items()}
            seed_offset = int(trial.user_attrs.get("seed_offset", 0))
            run_name = f"trial-{trial.number:03d}" if role == "search" else f"seed{seed_offset}-{trial.number:03d}"
            run_dir = self.study_dir / "runs" / cell.id / run_name
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("cell", cell.id)
            trial.set_user_attr("seed_offset", seed_offset)
            tags = [f"{a.split('.')[-1]}={v}" for a, v in cell.values] + [role]
            tags += [f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in params.items()]
            cfg = exp.run_config(cell, params, seed_offset, f"{cell.id}/{run_name}", tags)
            labels = {"study": exp.study, "cell": cell.id, "trial": trial.number, "role": role,
                      "storage": without_password(self.storage_url)}

            def on_eval(step: int, values: dict[str, float]) -> None:
                value = objective_value(exp.spec.objective, values)
                if value is None or role != "search":
                    return
                trial.report(value, step)
                if trial.should_prune():
                    raise RunPruned(f"pruned at step {step}")

            try:
                summary = train(cfg, run_dir=run_dir, on_eval=on_eval, labels=labels)
            except RunPruned:
                raise optuna.TrialPruned() from None
            except KeyboardInterrupt:
                # Cut off by the user: queue the same parameters again before the trial fails.
                trial.study.enqueue_trial(trial.params, user_attrs={
                    "seed_offset": seed_offset, "retry_of": trial.number})
                raise
            value = objective_value(exp.spec.objective, summary)
            if value is None or not math.isfinite(value):
                raise ValueError(f"{run_dir}: objective {exp.spec.objective.metric} missing or not finite")
            return value

        return objective

    # -- what to do next --------------------------------------------------------------------
    def _seed_study(self, cell: Cell, search):
        """The seeds study of a finished cell; whoever creates it queues the reruns (creation is
        atomic in the storage, so the reruns are queued once)."""
        import optuna

        name = f"{self.exp.study}/{cell.id}/seeds"
        try:
            seeds = optuna.create_study(study_name=name, storage=self.storage,
                                        direction=self.exp.spec.objective.direction)
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=name, storage=self.storage)
        best = search.best_trial
        for k in range(1, self.exp.spec.seeds):
            seeds.enqueue_trial(best.params, user_attrs={"seed_offset": k, "best_trial": best.number})
        return seeds

    def next_work(self):
        """(study, cell, role) of the next trial to run, or None when nothing is left for us."""
        spec = self.exp.spec
        for cell in self.exp.cells:
            search = self.search_study(cell, self.worker)
            if count(search, "COMPLETE", "PRUNED", "RUNNING", "WAITING") < spec.trials:
                return search, cell, "search"
        if spec.seeds < 2:
            return None
        for cell in self.exp.cells:
            search = self.search_study(cell)
            if count(search, "COMPLETE", "PRUNED") < spec.trials:
                continue  # another worker is still searching this cell
            if not count(search, "COMPLETE"):
                continue  # every trial pruned or failed: no best parameters to repeat
            seeds = self._seed_study(cell, search)
            if count(seeds, "WAITING"):
                return seeds, cell, "seeds"
        return None

    def work(self) -> int:
        """Run trials until nothing is left; returns how many this worker ran."""
        import optuna

        ran = 0
        while True:
            for name in self.study_names():
                optuna.storages.fail_stale_trials(optuna.load_study(study_name=name, storage=self.storage))
            job = self.next_work()
            if job is None:
                return ran
            study, cell, role = job
            print(f"[{os.getpid()}] {role} {cell.id}", file=sys.stderr, flush=True)
            study.optimize(self._objective(cell, role), n_trials=1, catch=(ValueError, RuntimeError))
            ran += 1

    def study_names(self) -> list[str]:
        import optuna

        prefix = f"{self.exp.study}/"
        return [s.study_name for s in optuna.get_all_study_summaries(self.storage)
                if s.study_name.startswith(prefix)]
