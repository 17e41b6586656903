"""One trial of a sweep: which slot it fills, and its run (the sweep's only door into `train`).

- A search trial fills one of its cell's `trials` slots: the lowest free one, or its own when it
  is a retry. Workers (processes or machines) racing for a slot each write their claim and read
  again, so at most one trial runs in a slot and never more trials than the budget run; a trial
  asked for when every slot was taken ends as `surplus` and counts for nothing. A seed rerun's
  slot is its queued seed offset.
- A run that diverged (non-finite loss or gradient) is pruned in a search and recorded as
  diverged in a seed rerun; it is never retried and never averaged.
- A run whose summary.json says `finished` with the same config (its worker was killed after the
  run, before the storage heard of it) is read back, not trained again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import rundir
from harness.chaos import crash_point
from harness.sweep import faults

BUSY = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")  # trial states that hold their slot

# ----------------------------------------------------------------------------- slots


def claim(trial) -> None:
    """Mark the trial as run by this process (how a dead worker's trial is recognised)."""
    trial.set_user_attr("worker", faults.me())


def _slots(trials, states: tuple[str, ...], skip: int | None = None) -> set[int]:
    return {int(t.user_attrs["slot"]) for t in trials
            if t.state.name in states and "slot" in t.user_attrs and t.number != skip}


def free_slot(study, budget: int) -> int | None:
    """The lowest search slot with no finished, running or queued trial; None when the budget
    is taken."""
    trials = study.get_trials(deepcopy=False)
    if sum(t.state.name in BUSY for t in trials) >= budget:
        return None
    free = sorted(set(range(budget)) - _slots(trials, BUSY))
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
    taken = _slots(trials, BUSY)
    return min(set(range(len(trials) + 1)) - taken)


class Surplus(Exception):
    """A trial asked for when another worker (or machine) had just taken the last free slot:
    it ends FAIL with the `surplus` attribute, runs nothing and counts for nothing."""


def settle_slot(trial, slot: int, budget: int) -> int:
    """The slot this trial fills: its own when it is a retry, else `slot` unless another worker
    took it meanwhile (then the lowest free one). Raises Surplus when every slot is taken, so
    that parallel workers never run more trials than the budget."""
    retry = "slot" in trial.user_attrs  # a queued retry: popped atomically, its slot is its own
    s = int(trial.user_attrs.get("slot", slot))
    taken = _slots(trial.study.get_trials(deepcopy=False), BUSY, skip=trial.number)
    if s in taken:
        free = sorted(set(range(budget)) - taken)
        if not free:
            _give_up(trial, f"every one of the {budget} slots is taken")
        s = free[0]
    trial.set_user_attr("slot", s)
    # Two workers may both have seen `s` free. Each writes its claim, then reads again: whoever
    # finds another claim on `s` gives it up (both may; the slot is then taken on a later round),
    # so at most one trial runs in a slot.
    if not retry and s in _slots(trial.study.get_trials(deepcopy=False), BUSY, skip=trial.number):
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


# ----------------------------------------------------------------------------- one run


def finished_summary(run_dir: Path, cfg) -> dict[str, Any] | None:
    """The summary of a run that already finished in `run_dir` with this config (a worker killed
    after the run, before the storage heard of it), else None. "This config" is the resume rule's
    (harness.checkpoint.same_config): the same run whatever tracking.progress and tags say."""
    from harness.checkpoint import same_config

    try:
        summary = json.loads((run_dir / rundir.SUMMARY).read_text())
        config = json.loads((run_dir / rundir.CONFIG).read_text())
    except (OSError, ValueError):
        return None
    config.pop("labels", None)
    if summary.get("status") != rundir.FINISHED or not same_config(config, cfg.to_dict()):
        return None
    return summary


def run_trial(trial, cfg, run_dir: Path, on_eval, labels: dict, role: str) -> dict[str, Any]:
    """Train one trial's run (or read back its finished run) and sort its ending out for Optuna:
    pruned and diverged-in-search end PRUNED; a diverged seed rerun, an error and a Ctrl-C end
    FAIL (a Ctrl-C'd trial is queued again at once)."""
    import optuna

    from harness.errors import RunDiverged, RunPruned
    from harness.train import train

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
