"""What a sweep does when things go wrong: dead workers, failing cells, diverging runs, kills
between a run's end and its record in the storage.

- A RUNNING trial whose worker is gone is failed and queued again with its parameters and slot:
  at once when the worker ran on this machine (its process no longer exists), after Optuna's
  heartbeat grace period otherwise, and after the grace period for a trial killed before it had
  a worker or heartbeat.
- A trial that fails records its error (`error` user attribute); `max_failures` such failures in
  a row mark the cell failed (the search study's `failed` user attribute) and it is skipped.
- A run that diverged (non-finite loss or gradient) is pruned in a search and recorded as
  diverged in a seed rerun; it is never retried and never averaged.
- A run whose summary.json says `finished` with the same config is read back, not trained again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from harness.chaos import crash_point
from harness.sweep import storage as hstorage


def me() -> str:
    """This worker as trials record it: host:pid."""
    return f"{hstorage.host()}:{os.getpid()}"


def claim(trial) -> None:
    """Mark the trial as run by this process (how a dead worker's trial is recognised)."""
    trial.set_user_attr("worker", me())


def _slots(trials, states: tuple[str, ...], skip: int | None = None) -> set[int]:
    return {int(t.user_attrs["slot"]) for t in trials
            if t.state.name in states and "slot" in t.user_attrs and t.number != skip}


def free_slot(study, budget: int) -> int | None:
    """The lowest search slot with no finished, running or queued trial; None when the budget
    is taken."""
    trials = study.get_trials(deepcopy=False)
    busy = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
    if sum(t.state.name in busy for t in trials) >= budget:
        return None
    free = sorted(set(range(budget)) - _slots(trials, busy))
    return free[0] if free else None


def waiting_slot(study) -> int | None:
    """The slot of the queued trial Optuna runs next (the oldest WAITING one), if any: a retry
    keeps its slot; one cut off before it had a slot takes the lowest free one."""
    from optuna.trial import TrialState

    waiting = sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)),
                     key=lambda t: t.number)
    if not waiting:
        return None
    if "slot" in waiting[0].user_attrs:
        return int(waiting[0].user_attrs["slot"])
    trials = study.get_trials(deepcopy=False)
    taken = _slots(trials, ("COMPLETE", "PRUNED", "RUNNING", "WAITING"))
    return min(set(range(len(trials) + 1)) - taken)


class Surplus(Exception):
    """A trial asked for when another worker (or machine) had just taken the last free slot:
    it ends FAIL with the `surplus` attribute, runs nothing and counts for nothing."""


def settle_slot(trial, slot: int, budget: int) -> int:
    """The slot this trial fills: its own when it is a retry, else `slot` unless another worker
    took it meanwhile (then the lowest free one). Raises Surplus when every slot is taken, so
    that parallel workers never run more trials than the budget."""
    busy = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
    retry = "slot" in trial.user_attrs  # a queued retry: popped atomically, its slot is its own
    s = int(trial.user_attrs.get("slot", slot))
    taken = _slots(trial.study.get_trials(deepcopy=False), busy, skip=trial.number)
    if s in taken:
        free = sorted(set(range(budget)) - taken)
        if not free:
            _give_up(trial, f"every one of the {budget} slots is taken")
        s = free[0]
    trial.set_user_attr("slot", s)
    # Two workers may both have seen `s` free. Each writes its claim, then reads again: whoever
    # finds another claim on `s` gives it up (both may; the slot is then taken on a later round),
    # so at most one trial runs in a slot.
    if not retry and s in _slots(trial.study.get_trials(deepcopy=False), busy, skip=trial.number):
        _give_up(trial, f"slot {s} was claimed at the same moment by another worker")
    return s


def _give_up(trial, why: str) -> None:
    trial.set_user_attr("slot", -1)  # no slot: never counted as taken
    trial.set_user_attr("surplus", True)
    raise Surplus(f"trial {trial.number}: {why}")


def seed_offset(trial) -> int:
    """The seed of a queued seed rerun. Raises Surplus for a trial that was asked for after
    another worker took the last queued rerun (Optuna then starts a fresh trial instead)."""
    if "seed_offset" not in trial.user_attrs:
        trial.set_user_attr("surplus", True)
        raise Surplus(f"trial {trial.number}: no seed rerun left to run")
    return int(trial.user_attrs["seed_offset"])


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
    from harness.models import pick_device

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


# ----------------------------------------------------------------------------- one run


def finished_summary(run_dir: Path, cfg) -> dict[str, Any] | None:
    """The summary of a run that already finished in `run_dir` with this config (a worker killed
    after the run, before the storage heard of it), else None. "This config" is the resume rule's
    (harness.checkpoint.same_config): the same run whatever tracking.progress and tags say."""
    from harness.checkpoint import same_config
    from harness.rundir import CONFIG, FINISHED, SUMMARY

    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        config = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    config.pop("labels", None)
    if summary.get("status") != FINISHED or not same_config(config, cfg.to_dict()):
        return None
    return summary


def run_trial(trial, cfg, run_dir: Path, on_eval, labels: dict, role: str) -> dict[str, Any]:
    """Train one trial's run (or read back its finished run) and sort its ending out for Optuna:
    pruned and diverged-in-search end PRUNED; a diverged seed rerun, an error and a Ctrl-C end
    FAIL (a Ctrl-C'd trial is queued again at once)."""
    import optuna

    from harness.train import RunDiverged, RunPruned, train

    done = finished_summary(run_dir, cfg)
    if done is not None:
        trial.set_user_attr("read_back", True)
        return done
    try:
        summary = train(cfg, run_dir=run_dir, on_eval=on_eval, labels=labels)
        crash_point("summary")
        return summary
    except RunPruned:
        trial.set_user_attr("outcome", "pruned")
        raise optuna.TrialPruned() from None
    except RunDiverged as err:
        trial.set_user_attr("outcome", "diverged")
        if role == "search":  # a learning rate that diverges is a bad point, not a broken cell
            raise optuna.TrialPruned(str(err)) from None
        trial.set_user_attr("error", f"diverged: {err}")
        raise
    except KeyboardInterrupt:
        attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
        trial.study.enqueue_trial(trial.params, user_attrs={**attrs, "retry_of": trial.number})
        raise
    except Exception as err:
        trial.set_user_attr("outcome", "failed")
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
        raise
