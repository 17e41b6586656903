"""Optuna glue: one study per cell with its sampler and pruner, parameters from the search
space, the objective value of a run's metrics, and the precision every run of a study computes in
(recorded on the study-wide record `<study>`, a study without trials)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import Any

from harness.config import Experiment, ObjectiveSpec, ParamSpec


def slot_seed(sampler_seed: int, cell: str, slot: int, tag: str = "") -> int:
    """The sampler seed of one slot of a cell. Every trial is asked from a freshly loaded study,
    so a fixed seed would draw the same start-up point every time; a seed counted from the trials
    in the study would shift after a failed or retried trial. (cell, slot) gives the same draws
    after any restart; `tag` (host, process, worker) sets parallel workers apart."""
    digest = hashlib.sha256(json.dumps([sampler_seed, cell, slot, tag]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def make_study(exp: Experiment, storage, name: str, seed: int | None = None):
    """The Optuna study `name` with the experiment's sampler (seeded with `seed`) and pruner."""
    import optuna

    spec = exp.spec
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction=spec.objective.direction)
    seed = spec.sampler_seed if seed is None else seed
    if spec.sampler == "tpe":
        # Few trials per cell: start modelling after 2 random trials, and constant_liar keeps
        # parallel workers from sampling the same point.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=2,
                                             constant_liar=True, multivariate=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    p = spec.pruner
    pruner = {
        "none": optuna.pruners.NopPruner(),
        "median": optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps),
        "halving": optuna.pruners.SuccessiveHalvingPruner(),
    }[p.type]
    study.sampler, study.pruner = sampler, pruner
    return study


def suggest(trial, name: str, p: ParamSpec) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    if p.type in ("int", "log_int"):
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1),
                                 log=p.type == "log_int")
    return trial.suggest_float(name, p.low, p.high, step=p.step, log=p.type == "log_float")


def objective_value(spec: ObjectiveSpec, values: dict[str, float]) -> float | None:
    """The metric, minus `kl_penalty` per nat of gen/kl above `kl_budget` (when set)."""
    value = values.get(spec.metric)
    if value is None or not math.isfinite(value):
        return None
    if spec.kl_budget is not None:
        kl = values.get("gen/kl")
        if kl is None or not math.isfinite(kl):  # a KL budget cannot be checked: no score
            return None
        over = max(0.0, kl - spec.kl_budget)
        sign = 1 if spec.direction == "maximize" else -1
        value -= sign * spec.kl_penalty * over
    return value


def count(study, *states: str) -> int:
    """Trials of `study` in any of the named states (COMPLETE, PRUNED, RUNNING, WAITING, FAIL)."""
    from optuna.trial import TrialState

    wanted = {TrialState[s] for s in states}
    return sum(t.state in wanted for t in study.get_trials(deepcopy=False))


PRECISION_AXIS = "train.precision"


class PrecisionMismatch(ValueError):
    """A study computes in one precision and this machine or this experiment asks another."""


def pin_precision(exp: Experiment, storage, say=None) -> str | None:
    """The precision every run of the study computes in: what `train.precision` resolved to
    where the study started, recorded in the storage. A study continued elsewhere keeps it, so
    that no estimate pools bf16 and fp32 runs: `auto` (and $DPO_HARNESS_PRECISION's override of
    it) then yields to the record, saying so; an explicit train.precision that differs, or a
    device that cannot compute in the recorded precision, is a PrecisionMismatch naming both.
    None when the grid or the search varies train.precision itself (each run keeps its own)."""
    import optuna
    import torch

    from harness import device as hdevice

    if any(a == PRECISION_AXIS for c in exp.cells for a, _ in c.values) or \
            any(PRECISION_AXIS in exp.space(c) for c in exp.cells):
        return None
    setting = exp.base.train.precision
    try:
        device = hdevice.pick_device(exp.base.train.device)
    except (ValueError, RuntimeError):  # no run can start here: the precheck says why, per cell
        return None
    here = hdevice.resolve_precision(device, setting)
    record = optuna.create_study(study_name=exp.study, storage=storage, load_if_exists=True)
    recorded = record.user_attrs.get("precision")
    if recorded is None:
        cap = hdevice.precision_record(device, setting)
        record.set_user_attr("precision", here)
        record.set_user_attr("precision_capability", {k: v for k, v in cap.items() if k != "precision"})
        return here
    if recorded == here:
        return here
    where = f"study {exp.study} computes in {recorded} (the precision of its first runs)"
    if setting != "auto":
        raise PrecisionMismatch(f"{where}, but {exp.path} asks train.precision: {setting}; name "
                                "another study (sweep.study or --study) to run it in another precision")
    if recorded == "bf16" and (device.type not in ("cpu", "cuda") or
                               (device.type == "cuda" and not torch.cuda.is_bf16_supported())):
        raise PrecisionMismatch(f"{where}, which {device} cannot compute in; continue it on a "
                                "machine that can, or name another study")
    forced = hdevice.precision_override()
    why = f"${hdevice.PRECISION_ENV}={forced}" if forced else f"train.precision auto on {device}"
    (say or (lambda m: print(m, file=sys.stderr)))(
        f"{where}: its runs keep {recorded} here, where {why} would pick {here}"
        + (" (bf16 is emulated on this CPU: slower)" if recorded == "bf16" and device.type == "cpu"
           and not hdevice.capability(device)["bf16_native"] else ""))
    return recorded
