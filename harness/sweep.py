"""Sweeps: a grid of cells (beta × masking × model size × ...), Optuna inside each cell, seeds.

    harness sweep EXPERIMENT.yaml [--workers N] [--storage URL] [--study NAME]

Shape of a study (all of it in one Optuna storage, SQLite under the results directory by default):
- one Optuna study per cell, `<study>/<cell>`, where TPE samples the `search` space and a pruner
  stops bad trials at eval steps (trial.report / should_prune on the objective metric);
- once a cell's trial budget is spent, its best parameters are rerun with the remaining seeds as
  trials of a second study, `<study>/<cell>/seeds`, so cells are compared at their own best
  hyperparameters with a spread over seeds.

Every trial is one `harness.train.train` run in `results/<study>/runs/<cell>/<trial>`.
Workers (processes, or machines sharing `--storage`) take work from the storage, so nothing runs
twice: a trial cut off by Ctrl-C is re-queued at once, a killed worker's trial is found stale by
Optuna's heartbeat and re-queued, and running the same command again continues the study.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.config import ConfigError, RunConfig, apply_overrides, build_config, resolve_paths

# Heartbeats and stale-trial handling are marked experimental by Optuna; they are what makes a
# killed worker's trial come back, so we rely on them knowingly.
warnings.filterwarnings("ignore", category=Warning, module="optuna")
warnings.filterwarnings("ignore", message=".*experimental.*")

# `masking` is the one grid axis that is not a config field: it sets two of them.
MASKINGS: dict[str, dict[str, Any]] = {
    "masked-mean": {"dpo.mask_prompt": True, "dpo.reduction": "mean"},  # the seed notebook
    "masked-sum": {"dpo.mask_prompt": True, "dpo.reduction": "sum"},  # the DPO paper
    "full-mean": {"dpo.mask_prompt": False, "dpo.reduction": "mean"},
    "full-sum": {"dpo.mask_prompt": False, "dpo.reduction": "sum"},
}

HEARTBEAT_S = 10  # a trial's heartbeat; one silent for GRACE_S is failed and re-queued
GRACE_S = 30


# ----------------------------------------------------------------------------- definition


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    type: Literal["float", "log_float", "int", "log_int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None  # int/float grid step; null = continuous
    choices: list[Any] | None = None

    def extremes(self) -> list[Any]:
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if "int" in self.type else float
        return [cast(self.low), cast(self.high)]


class ObjectiveSpec(_Strict):
    metric: str = "eval/rewards/accuracies"  # any metric a run logs at eval steps
    direction: Literal["maximize", "minimize"] = "maximize"
    # Controlled task: gen/reward counts only at gen/kl <= kl_budget (nats); above it the trial
    # scores gen/reward minus kl_penalty per nat over budget.
    kl_budget: float | None = None
    kl_penalty: float = 1.0


class PrunerSpec(_Strict):
    type: Literal["none", "median", "halving"] = "median"
    n_startup_trials: int = 2  # trials per cell before the median pruner acts
    n_warmup_steps: int = 0  # steps before a trial can be pruned


class SweepSpec(_Strict):
    study: str | None = None  # default: the experiment's `name`
    # Grid axes: dotted config fields (dpo.beta, model.name, ...) or `masking`, each a list.
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: int = 1  # each cell's best parameters run with train.seed + 0..seeds-1
    search: dict[str, ParamSpec] = Field(default_factory=dict)  # Optuna space inside each cell
    trials: int = 1  # Optuna trials per cell (the first seed)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_seed: int = 0

    @field_validator("seeds", "trials")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v


@dataclass(frozen=True)
class Cell:
    values: tuple[tuple[str, Any], ...]  # (axis, value) in grid order

    @property
    def id(self) -> str:
        parts = []
        for axis, value in self.values:
            short = axis.split(".")[-1]
            parts.append(f"{short}={value}")
        return ",".join(parts).replace("/", "-") or "all"

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for axis, value in self.values:
            out.update(MASKINGS[value] if axis == "masking" else {axis: value})
        return out


@dataclass
class Experiment:
    path: Path
    raw: dict[str, Any]  # the run config sections, without `sweep`
    spec: SweepSpec
    cells: list[Cell]

    @property
    def study(self) -> str:
        return self.spec.study or self.raw.get("name", self.path.stem)

    def run_config(self, cell: Cell, params: dict[str, Any], seed_offset: int, run_name: str,
                   tags: list[str]) -> RunConfig:
        raw = apply_overrides(self.raw, {**cell.overrides(), **params})
        raw["name"] = run_name
        raw.setdefault("train", {})
        raw["train"]["seed"] = raw["train"].get("seed", 123) + seed_offset
        raw.setdefault("tracking", {})
        raw["tracking"]["group"] = self.study
        raw["tracking"]["tags"] = list(raw["tracking"].get("tags", [])) + tags
        raw["tracking"]["progress"] = False
        return resolve_paths(build_config(raw, where=str(self.path)), self.path.parent)


def _known_metrics(cfg: RunConfig) -> set[str]:
    from harness.train import logged_metrics

    return logged_metrics(cfg)


def load_experiment(path: str | Path, study: str | None = None) -> Experiment:
    """Read and validate a sweep experiment before anything runs: every grid value and search
    extreme must make a valid run config, and the objective must be a metric runs log."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sweep"), dict):
        raise ConfigError(f"{path}: a sweep experiment needs a `sweep:` section")
    sweep_raw = raw.pop("sweep")
    try:
        spec = SweepSpec.model_validate(sweep_raw)
    except ValidationError as err:
        lines = [f"{path}: invalid sweep definition"]
        for e in err.errors():
            field = ".".join(str(p) for p in ("sweep", *e["loc"]))
            lines.append(f"  {field}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
        raise ConfigError("\n".join(lines)) from None
    if study:
        spec.study = study
    base = build_config(raw, where=str(path))  # the base config alone must be valid
    for axis, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.grid.{axis}: an axis needs a non-empty list of values")
        for i, value in enumerate(values):
            if axis == "masking":
                if value not in MASKINGS:
                    raise ConfigError(f"{path}: sweep.grid.masking[{i}]: {value!r} is not one of "
                                      f"{', '.join(MASKINGS)}")
                continue
            _check_override(path, raw, f"sweep.grid.{axis}[{i}]", {axis: value})
    for name, p in spec.search.items():
        if p.type == "categorical" and not p.choices:
            raise ConfigError(f"{path}: sweep.search.{name}: categorical needs `choices`")
        if p.type != "categorical" and (p.low is None or p.high is None or p.low > p.high):
            raise ConfigError(f"{path}: sweep.search.{name}: needs low <= high")
        if p.type.startswith("log") and p.low is not None and p.low <= 0:
            raise ConfigError(f"{path}: sweep.search.{name}: a log scale needs low > 0")
        for value in p.extremes():
            _check_override(path, raw, f"sweep.search.{name}", {name: value})
    known = _known_metrics(base)
    if spec.objective.metric not in known:
        raise ConfigError(
            f"{path}: sweep.objective.metric: no run of this experiment logs "
            f"{spec.objective.metric!r}; it logs: {', '.join(sorted(m for m in known if m.startswith(('eval/', 'gen/'))))}"
        )
    axes = list(spec.grid.items())
    cells = [Cell(tuple(zip([a for a, _ in axes], combo, strict=True)))
             for combo in itertools.product(*[v for _, v in axes])]
    return Experiment(path=path, raw=raw, spec=spec, cells=cells)


def _check_override(path: Path, raw: dict, where: str, override: dict[str, Any]) -> None:
    try:
        build_config(apply_overrides(raw, override), where=f"{path}: {where}")
    except ConfigError as err:
        raise ConfigError(str(err)) from None


# ----------------------------------------------------------------------------- optuna glue


def default_storage(results_dir: Path, study: str) -> str:
    db = results_dir / study / "optuna.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db.resolve()}"


def make_storage(url: str):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.endswith(".log") or url.startswith("journal:"):
        # A journal file: multi-process safe on one machine without SQLite's locking.
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
    )


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


def objective_value(spec: ObjectiveSpec, metrics: dict[str, float]) -> float | None:
    value = metrics.get(spec.metric)
    if value is None:
        return None
    if spec.kl_budget is not None and metrics.get("gen/kl") is not None:
        over = max(0.0, metrics["gen/kl"] - spec.kl_budget)
        sign = 1 if spec.direction == "maximize" else -1
        value -= sign * spec.kl_penalty * over
    return value


# ----------------------------------------------------------------------------- running


def _states(study):
    from optuna.trial import TrialState

    return [t.state for t in study.get_trials(deepcopy=False)], TrialState


def _search_done(study, budget: int) -> bool:
    states, S = _states(study)
    return sum(s in (S.COMPLETE, S.PRUNED) for s in states) >= budget


def _search_open(study, budget: int) -> bool:
    states, S = _states(study)
    return sum(s in (S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING) for s in states) < budget


class Sweep:
    def __init__(self, exp: Experiment, storage_url: str, results_dir: Path, worker: int = 0):
        self.exp = exp
        self.worker = worker  # index of this worker process on this machine (sampler seeds)
        self.storage_url = storage_url
        self.storage = make_storage(storage_url)
        self.results_dir = results_dir
        self.study_dir = results_dir / exp.study

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

            def on_eval(step: int, metrics: dict[str, float]) -> None:
                value = objective_value(exp.spec.objective, metrics)
                if value is None or role != "search":
                    return
                trial.report(value, step)
                if trial.should_prune():
                    raise RunPruned(f"pruned at step {step}")

            try:
                summary = train(cfg, run_dir=run_dir, on_eval=on_eval)
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
        from optuna.trial import TrialState

        spec = self.exp.spec
        for cell in self.exp.cells:
            search = make_study(self.exp, self.storage, f"{self.exp.study}/{cell.id}", self.worker)
            if _search_open(search, spec.trials):
                return search, cell, "search"
        if spec.seeds < 2:
            return None
        for cell in self.exp.cells:
            search = make_study(self.exp, self.storage, f"{self.exp.study}/{cell.id}")
            if not _search_done(search, spec.trials):
                continue  # another worker is still searching this cell
            if not any(t.state == TrialState.COMPLETE for t in search.get_trials(deepcopy=False)):
                continue  # every trial pruned or failed: no best parameters to repeat
            seeds = self._seed_study(cell, search)
            if any(t.state == TrialState.WAITING for t in seeds.get_trials(deepcopy=False)):
                return seeds, cell, "seeds"
        return None

    def work(self) -> int:
        """Run trials until nothing is left; returns how many this worker ran."""
        import optuna

        ran = 0
        while True:
            for name in self._all_study_names():
                optuna.storages.fail_stale_trials(optuna.load_study(study_name=name, storage=self.storage))
            job = self.next_work()
            if job is None:
                return ran
            study, cell, role = job
            print(f"[{os.getpid()}] {role} {cell.id}", file=sys.stderr, flush=True)
            study.optimize(self._objective(cell, role), n_trials=1, catch=(ValueError, RuntimeError))
            ran += 1

    def _all_study_names(self) -> list[str]:
        import optuna

        prefix = f"{self.exp.study}/"
        return [s.study_name for s in optuna.get_all_study_summaries(self.storage)
                if s.study_name.startswith(prefix)]

    # -- summary ----------------------------------------------------------------------------
    def summary_rows(self) -> list[dict[str, Any]]:
        import optuna
        from optuna.trial import TrialState

        spec = self.exp.spec
        rows = []
        for cell in self.exp.cells:
            search = make_study(self.exp, self.storage, f"{self.exp.study}/{cell.id}")
            trials = search.get_trials(deepcopy=False)
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            row: dict[str, Any] = {"cell": cell.id, **{a: v for a, v in cell.values}}
            row.update({
                "trials": len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]),
                "pruned": len([t for t in trials if t.state == TrialState.PRUNED]),
                "objective": spec.objective.metric,
            })
            if complete:
                best = search.best_trial
                values = [best.value]
                run_dirs = [best.user_attrs.get("run_dir")]
                try:
                    seeds = optuna.load_study(study_name=f"{search.study_name}/seeds", storage=self.storage)
                    for t in seeds.get_trials(deepcopy=False):
                        if t.state == TrialState.COMPLETE:
                            values.append(t.value)
                            run_dirs.append(t.user_attrs.get("run_dir"))
                except KeyError:
                    pass
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
                row.update({"best_trial": best.number, "seeds_done": len(values),
                            "objective_mean": mean, "objective_std": std,
                            **{f"param/{k}": v for k, v in best.params.items()},
                            "run_dirs": ";".join(r for r in run_dirs if r)})
            rows.append(row)
        return rows

    def write_summary(self) -> Path:
        import pandas as pd

        rows = self.summary_rows()
        df = pd.DataFrame(rows)
        self.study_dir.mkdir(parents=True, exist_ok=True)
        path = self.study_dir / "summary.csv"
        tmp = path.with_suffix(".tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(path)
        return path


# ----------------------------------------------------------------------------- entry points


def _worker(path: str, study: str | None, storage_url: str, results_dir: str, threads: int,
            worker: int) -> int:
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    exp = load_experiment(path, study)
    return Sweep(exp, storage_url, Path(results_dir), worker).work()


def run_sweep(path: str | Path, workers: int = 1, storage: str | None = None,
              study: str | None = None, results_dir: str | None = None) -> Path:
    """Run (or continue) a study; returns the path of its summary table."""
    exp = load_experiment(path, study)
    results = Path(results_dir or exp.raw.get("tracking", {}).get("results_dir", "results"))
    storage_url = storage or default_storage(results, exp.study)
    sweep = Sweep(exp, storage_url, results)
    n_runs = len(exp.cells) * (exp.spec.trials + exp.spec.seeds - 1)
    print(f"study {exp.study}: {len(exp.cells)} cells x ({exp.spec.trials} trials + "
          f"{exp.spec.seeds - 1} seed reruns) = up to {n_runs} runs | storage {storage_url} | "
          f"{workers} worker(s)", file=sys.stderr)
    started = time.time()
    if workers <= 1:
        sweep.work()
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(str(path), study, storage_url, str(results), threads, i))
                 for i in range(workers)]
        for p in procs:
            p.start()
            time.sleep(1.0)  # stagger: the first worker creates the studies
        def on_term(signum, frame):  # `kill` of the parent stops its workers as Ctrl-C does
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:  # Ctrl-C already reached them (same process group); kill does not
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGINT)
            for p in procs:
                p.join(timeout=60)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    out = sweep.write_summary()
    _log_summary_to_wandb(exp, out)
    print(f"study {exp.study} done in {time.time() - started:.0f}s; summary: {out}", file=sys.stderr)
    print(json.dumps({"summary": str(out), "storage": storage_url}))
    return out


def _log_summary_to_wandb(exp: Experiment, csv_path: Path) -> None:
    import pandas as pd

    from harness.config import TrackingConfig
    from harness.tracking import WandbBackend, resolve_wandb_mode

    tracking = TrackingConfig.model_validate({**exp.raw.get("tracking", {}), "group": exp.study})
    df = pd.read_csv(csv_path)
    backend = WandbBackend(csv_path.parent, f"{exp.study}-summary", {"study": exp.study},
                           tracking, resolve_wandb_mode(tracking.wandb))
    backend.log_table("study/summary", list(df.columns), df.astype(str).values.tolist())
    backend.close()
