"""The `sweep:` section of an experiment: grid cells, Optuna's search space inside each cell,
seed reruns, the objective, pruner and sampler. Validated with the rest of the experiment by
harness.config.load (one reader, one error format)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, field_validator, model_validator

from harness.config.base import Strict


class ParamSpec(Strict):
    type: Literal["float", "log_float", "int", "log_int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None  # int/float grid step; null = continuous
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs `choices`")
            return self
        if self.low is None or self.high is None or self.low > self.high:
            raise ValueError("needs low <= high")
        if self.type.startswith("log") and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        return self

    def at_edge(self, value: Any, tolerance: float = 0.05) -> str | None:
        """`low` or `high` when `value` lies within `tolerance` of the range's width (on the
        log scale for log types) of that bound; None inside the range or for categoricals."""
        if self.type == "categorical" or self.low == self.high:
            return None
        f = math.log if self.type.startswith("log") else float
        pos = (f(value) - f(self.low)) / (f(self.high) - f(self.low))
        return "low" if pos <= tolerance else "high" if pos >= 1 - tolerance else None

    def extremes(self) -> list[Any]:
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if "int" in self.type else float
        return [cast(self.low), cast(self.high)]


class ObjectiveSpec(Strict):
    metric: str = "eval/rewards/accuracies"  # any metric a run logs at eval steps
    direction: Literal["maximize", "minimize"] = "maximize"
    # Controlled task: gen/reward counts only at gen/kl <= kl_budget (nats); above it the trial
    # scores gen/reward minus kl_penalty per nat over budget.
    kl_budget: float | None = None
    kl_penalty: float = 1.0
    # A degenerate rerun (gen_eval.kl_ceiling, parsed_floor): left out of the cell's estimate and
    # counted (`leave_out`), or averaged in and counted (`count`): right for a score that reads
    # the run's own path, such as gen/reward_at_kl, where leaving runs out by how they ended
    # would condition the estimate on its outcome.
    degenerate: Literal["leave_out", "count"] = "leave_out"


class PrunerSpec(Strict):
    type: Literal["none", "median", "halving"] = "median"
    n_startup_trials: int = 2  # trials per cell before the median pruner acts
    n_warmup_steps: int = 0  # steps before a trial can be pruned


# One grid: {axis: values}, axes being dotted config fields (dpo.beta, model.name, ...) or
# `masking`, each a non-empty list; its cells are the Cartesian product of the axes.
Grid = dict[str, Annotated[list[Any], Field(min_length=1)]]
_GRID, _GRIDS = TypeAdapter(Grid), TypeAdapter(Annotated[list[Grid], Field(min_length=1)])


class SweepSpec(Strict):
    study: str | None = None  # default: the experiment's `name`
    # One grid, or a list of grids whose cells are the union of each grid's product, in order
    # (e.g. one grid for DPO over beta, another for a loss without beta); a cell twice is an error.
    grid: Grid | list[Grid] = Field(default_factory=dict)
    seeds: int = 1  # each cell's best parameters run with train.seed + 0..seeds-1
    search: dict[str, ParamSpec] = Field(default_factory=dict)  # Optuna space inside each cell
    # Ranges that depend on the cell: {grid axis: {grid value: {parameter: its range there}}},
    # e.g. a learning-rate range per masking (mean-reduced log-probs need larger steps); several
    # axes joined by commas take values joined the same way ({"model.name,masking":
    # {"tiny-s,masked-sum": ...}}). A later key's range wins.
    search_by: dict[str, dict[str, dict[str, ParamSpec]]] = Field(default_factory=dict)
    trials: int = 1  # Optuna trials per cell (the first seed)
    # Independent searches per cell, each with its own sampler and training seeds (cells
    # `<cell>,search=<r>`). With 2 or more, a cell's estimate counts one fresh-seed rerun of each
    # search's pick (seeds: 2): its interval covers the search and the seeds together.
    searches: int = 1
    # Adaptive searches: while the 95% half-width of a cell's estimate over its searches is above
    # target_halfwidth (in the objective's units), the cell gets one more search, up to
    # max_searches (harness.sweep.estimate).
    target_halfwidth: float | None = None
    max_searches: int | None = None
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_seed: int = 0
    # A cell whose trials fail this many times in a row (an error, not a kill) is marked failed
    # and skipped; the sweep finishes the other cells and exits non-zero naming it.
    max_failures: int = 2

    @field_validator("grid", mode="wrap")
    @classmethod
    def _grid(cls, v: Any, handler) -> Grid | list[Grid]:
        # Validated as the one form it is, so errors name `grid.<axis>` or `grid.<i>.<axis>`
        # rather than listing how it fails both forms of the union.
        return _GRIDS.validate_python(v) if isinstance(v, list) else _GRID.validate_python(v)

    @model_validator(mode="after")
    def _one_rerun_per_search(self) -> SweepSpec:
        """With several searches per cell, each contributes exactly one fresh-seed rerun: the
        estimate's unit is the search, and reruns of one search's pick are not independent."""
        if self.searches > 1 and self.seeds != 2:
            raise ValueError(f"searches: {self.searches} needs seeds: 2 (one fresh-seed rerun of "
                             f"each search's pick), got seeds: {self.seeds}")
        return self

    @model_validator(mode="after")
    def _adaptive(self) -> SweepSpec:
        """target_halfwidth and max_searches go together, above `searches` (>= 2: an interval
        needs two values)."""
        if self.target_halfwidth is None and self.max_searches is None:
            return self
        if self.target_halfwidth is None or self.max_searches is None:
            raise ValueError("target_halfwidth and max_searches go together (adaptive searches: "
                             "one more search per cell while its interval is wider than the target)")
        if self.target_halfwidth <= 0:
            raise ValueError(f"target_halfwidth must be > 0, got {self.target_halfwidth}")
        if self.searches < 2 or self.max_searches <= self.searches:
            raise ValueError(f"adaptive searches need searches >= 2 and max_searches > searches, got "
                             f"searches: {self.searches}, max_searches: {self.max_searches}")
        return self

    @property
    def search_cap(self) -> int:
        """The most searches a cell may get: max_searches, else searches."""
        return self.max_searches or self.searches

    @property
    def grids(self) -> list[Grid]:
        """The grids, a single one included: [grid] or the list."""
        return self.grid if isinstance(self.grid, list) else [self.grid]

    @field_validator("seeds", "trials", "max_failures", "searches")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v
