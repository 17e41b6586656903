"""Optuna glue: one study per cell with its sampler and pruner, parameters from the search
space, and the objective value of a run's metrics."""

from __future__ import annotations

from typing import Any

from harness.config import Experiment, ObjectiveSpec, ParamSpec


def make_study(exp: Experiment, storage, name: str, worker: int = 0):
    import optuna

    spec = exp.spec
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction=spec.objective.direction)
    # Every trial is asked from a freshly loaded study, so a fixed sampler seed would draw the
    # same start-up point every time: the seed moves with the trials already in the study (and
    # the worker), which keeps a one-worker study reproducible and parallel workers apart.
    seed = spec.sampler_seed + 1000 * len(study.get_trials(deepcopy=False)) + worker
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
    if value is None:
        return None
    if spec.kl_budget is not None and values.get("gen/kl") is not None:
        over = max(0.0, values["gen/kl"] - spec.kl_budget)
        sign = 1 if spec.direction == "maximize" else -1
        value -= sign * spec.kl_penalty * over
    return value


def count(study, *states: str) -> int:
    """Trials of `study` in any of the named states (COMPLETE, PRUNED, RUNNING, WAITING, FAIL)."""
    from optuna.trial import TrialState

    wanted = {TrialState[s] for s in states}
    return sum(t.state in wanted for t in study.get_trials(deepcopy=False))
