"""What a sweep does about dead workers and failing cells.

- A RUNNING trial whose worker is gone is failed and queued again with its parameters and slot:
  at once when the worker ran on this machine (its process no longer exists), after Optuna's
  heartbeat grace period otherwise, and after the grace period for a trial killed before it had
  a worker or heartbeat.
- A trial that fails records its error (`error` user attribute); `max_failures` such failures in
  a row mark the cell failed (the search study's `failed` user attribute) and it is skipped.
- Before any training, every cell is checked cheaply (device, data, a full batch); a cell that
  fails is marked failed at once.

How one trial's run ends (pruned, diverged, failed, read back after a kill) and which slot it
fills are harness.sweep.trial's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

from harness.sweep import storage as hstorage


def me() -> str:
    """This worker as trials record it (harness.sweep.trial.claim): host:pid, what tells a dead
    worker's trial (_dead)."""
    return f"{hstorage.host()}:{os.getpid()}"


def real_failure(trial) -> bool:
    """A trial that failed with an error of its own (not one cut off by a kill or Ctrl-C)."""
    return trial.state.name == "FAIL" and "error" in trial.user_attrs


def cell_failure(study, max_failures: int) -> str | None:
    """The error of a cell given up on: `max_failures` real failures in a row (killed and
    interrupted trials do not count). Recorded on the study so that every worker skips it."""
    if "failed" in study.user_attrs:
        return study.user_attrs["failed"]
    done = [t for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
            if t.state.name in ("COMPLETE", "PRUNED") or real_failure(t)]
    streak = 0
    for t in reversed(done):
        if not real_failure(t):
            break
        streak += 1
    if streak < max_failures:
        return None
    error = f"{streak} trials in a row failed; last: {done[-1].user_attrs['error']}"
    study.set_user_attr("failed", error)
    return error


def precheck(exp, study_of) -> dict[str, str]:
    """Cheap checks of every cell before any training: its device exists, its data loads (file
    data, read once per distinct data config) and holds a full training batch. A cell that fails
    is marked failed at once (`study_of(cell)` gives its search study); returns {cell: error}."""
    from harness import data as hdata
    from harness.device import pick_device

    loaded: dict[str, Any] = {}
    failed = {}
    for cell in exp.cells:
        cfg = exp.run_config(cell, {}, 0, "precheck", [])
        try:
            pick_device(cfg.train.device)
            if cfg.task.name == "none" and cfg.data.format != "messages":
                key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
                if key not in loaded:
                    try:
                        loaded[key] = len(hdata.load_pairs(cfg.data)["train"])
                    except Exception as err:  # noqa: BLE001 - reported as the cell's error
                        loaded[key] = err
                n = loaded[key]
                if isinstance(n, Exception):
                    raise n
                if cfg.train.drop_last and n < cfg.train.batch_size:
                    raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than the "
                                     f"{n} train records")
        except Exception as err:  # noqa: BLE001
            failed[cell.id] = f"precheck: {type(err).__name__}: {err}"
            study_of(cell).set_user_attr("failed", failed[cell.id])
    return failed


# ----------------------------------------------------------------------------- dead workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(trial, grace_s: float) -> bool:
    worker = trial.user_attrs.get("worker")
    if worker is None:  # killed between Optuna's ask and claim(): no worker, maybe no heartbeat
        start = trial.datetime_start or dt.datetime.now()
        return (dt.datetime.now() - start).total_seconds() > grace_s
    host, _, pid = worker.rpartition(":")
    return host == hstorage.host() and pid != str(os.getpid()) and not _alive(int(pid))


def reap_stale(study) -> int:
    """Fail the RUNNING trials whose worker is gone and queue each again (same parameters and
    user attributes: its slot or seed); returns how many."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)  # heartbeat-based: machines that went away
    reaped = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _dead(t, hstorage.GRACE_S):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker reaped it first
        attrs = {k: v for k, v in t.user_attrs.items() if k != "worker"}
        study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=t.params,
                                            distributions=t.distributions, user_attrs=attrs,
                                            system_attrs={"failed_trial": t.number}))
        reaped += 1
    return reaped
