"""Optuna glue: one study per cell with its sampler and pruner, parameters from the search
space, and the objective value of a run's metrics."""

from __future__ import annotations

import hashlib
import json
import math
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
