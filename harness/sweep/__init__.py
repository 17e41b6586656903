"""Sweeps: a grid of cells (beta × masking × model size × ...), Optuna inside each cell, seeds.

    harness sweep EXPERIMENT.yaml [--workers N|auto] [--devices IDS] [--storage URL] [--view MODE]

Shape of a study (all of it in one Optuna storage, SQLite under the results directory by default):
- one Optuna study per cell, `<study>/<cell>`, where TPE samples the `search` space and a pruner
  stops bad trials at eval steps (trial.report / should_prune on the objective metric);
- once a cell's trial budget is spent, its best parameters are rerun with the remaining seeds as
  trials of a second study, `<study>/<cell>/seeds`, so cells are compared at their own best
  hyperparameters with a spread over seeds.

Every trial is one `harness.train.train` run in `results/<study>/runs/<cell>/<trial-NNN or seedK>`
(harness.rundir owns the layout). A trial cut off by Ctrl-C is re-queued at once, a killed
worker's trial is found stale by Optuna's heartbeat and re-queued, and running the same command
again continues the study.

Rooms: storage.py (which Optuna storage), study.py (Optuna glue: sampler, pruner, parameters,
objective), schedule.py (what runs next), trial.py (one trial: its slot, its run, how it ends:
pruned, diverged, read back), faults.py (dead workers, failing cells), summary.py (the results
table, phase totals), supervise.py (worker processes and their devices, signals, exit status),
view.py (what a running sweep shows), status.py (`harness status`: a study's state from its
storage alone). The `sweep:` schema is harness.config.sweep.
"""

import warnings

from harness.config import load_experiment
from harness.sweep.schedule import Sweep
from harness.sweep.storage import default_storage, open_storage
from harness.sweep.study import objective_value
from harness.sweep.summary import write_summary
from harness.sweep.supervise import SweepIncomplete, run_sweep

# Heartbeats and stale-trial handling are marked experimental by Optuna; they are what makes a
# killed worker's trial come back, so we rely on them knowingly.
warnings.filterwarnings("ignore", category=Warning, module="optuna")
warnings.filterwarnings("ignore", message=".*experimental.*")

__all__ = ["Sweep", "SweepIncomplete", "default_storage", "load_experiment", "objective_value", "open_storage",
           "run_sweep", "write_summary"]
