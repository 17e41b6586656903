"""The one reader of experiment files: YAML → dotted overrides → typed, validated config, and for a
study its cells. Every problem is a `ConfigError` naming the file and the field, raised before
anything is trained."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness import metrics
from harness.config.run import MASKINGS, RunConfig
from harness.config.sweep import ParamSpec, SweepSpec


class ConfigError(ValueError):
    """A configuration problem, with the file and field that caused it."""


def format_error(err: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """An experiment file's top-level mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw.pop("labels", None)  # a run's config.json: labels are written by the harness, not read
    return raw


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars and lists (`1e-5`, `true`, `[1, 2]`), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`dpo.beta`) in a nested dict, creating sections as needed."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def build_config(raw: dict[str, Any], where: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err, where)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read an experiment YAML, apply dotted overrides, validate.

    Relative data paths in the file are resolved against the file's directory, so an
    experiment can be run from anywhere.
    """
    raw = apply_overrides(read_yaml(path), overrides or {})
    return resolve_paths(build_config(raw, where=str(path)), Path(path).parent)


DATA_PATHS = ("source", "validation_source", "test_source")  # data fields that may name local files


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Make relative local data paths absolute against `base` (the experiment's folder)."""
    for field in DATA_PATHS:
        setattr(cfg.data, field, absolute_path(getattr(cfg.data, field), base))
    return cfg


def absolute_path(value: Any, base: Path) -> Any:
    """A data field's value made absolute against `base` when it is a relative local path that
    exists there; anything else (a URL, a hub name, an absolute path, None) as given."""
    if isinstance(value, str) and value and _looks_like_relative_path(value):
        candidate = (base / value).resolve()
        if candidate.exists():
            return str(candidate)
    return value


def _looks_like_relative_path(value: str) -> bool:
    return not value.startswith(("http://", "https://", "/", "~")) and (
        value.startswith(".") or "/" in value or Path(value).suffix != ""
    )


# ----------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class Cell:
    values: tuple[tuple[str, Any], ...]  # (axis, value) in grid order
    search: int | None = None  # which of sweep.searches independent searches (None: the only one)

    @property
    def id(self) -> str:
        parts = [f"{axis.split('.')[-1]}={value}" for axis, value in self.values]
        if self.search is not None:
            parts.append(f"search={self.search}")
        return ",".join(parts).replace("/", "-") or "all"

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for axis, value in self.values:
            out.update(MASKINGS[value] if axis == "masking" else {axis: value})
        return out


SEARCH_SEEDS = 1000  # train.seed offset between a cell's independent searches


@dataclass
class Experiment:
    path: Path
    raw: dict[str, Any]  # the run config sections, without `sweep`
    base: RunConfig  # the experiment's own run config (no cell applied)
    spec: SweepSpec
    cells: list[Cell]

    @property
    def study(self) -> str:
        return self.spec.study or self.base.name

    def space(self, cell: Cell) -> dict[str, ParamSpec]:
        """The cell's search space: `search`, with the `search_by` ranges of the cell's grid
        values, in the order search_by lists its keys (a later key's range wins)."""
        space = dict(self.spec.search)
        values = {axis: str(value) for axis, value in cell.values}
        for key, by_value in self.spec.search_by.items():
            axes = split_axes(key)
            if all(a in values for a in axes):
                space.update(by_value.get(",".join(values[a] for a in axes), {}))
        return space

    def run_config(self, cell: Cell, params: dict[str, Any], seed_offset: int, run_name: str,
                   tags: list[str]) -> RunConfig:
        """The run config of one trial: the cell's and Optuna's values over the experiment's."""
        raw = apply_overrides(self.raw, {**cell.overrides(), **params})
        cfg = build_config(raw, where=str(self.path))
        cfg.name = run_name
        # each independent search trains on seeds of its own (SEARCH_SEEDS apart)
        cfg.train.seed += seed_offset + SEARCH_SEEDS * (cell.search or 0)
        cfg.tracking.group = self.study
        cfg.tracking.tags = [*cfg.tracking.tags, *tags]
        cfg.tracking.progress = False
        return resolve_paths(cfg, self.path.parent)


def split_axes(key: str) -> list[str]:
    """The grid axes a search_by key names: one (`masking`) or several joined by commas
    (`model.name,masking`, whose values are then joined the same way: `tiny-s,masked-sum`)."""
    return [a.strip() for a in key.split(",")]


def _check_search_by(path: Path, raw: dict[str, Any], spec) -> None:
    """search_by names grid axes (of any grid, or several joined by commas) and their values, and
    re-ranges parameters of `search`."""
    axes: dict[str, set[str]] = {}
    for grid in spec.grids:
        for axis, values in grid.items():
            axes.setdefault(axis, set()).update(str(v) for v in values)
    for key, by_value in spec.search_by.items():
        where = f"{path}: sweep.search_by.{key}"
        names = split_axes(key)
        for axis in names:
            if axis not in axes:
                raise ConfigError(f"{where}: {axis} is not a grid axis (grid: {', '.join(axes) or 'none'})"
                                  if len(names) > 1 else
                                  f"{where}: not a grid axis (grid: {', '.join(axes) or 'none'})")
        for value, params in by_value.items():
            parts = [v.strip() for v in str(value).split(",")] if len(names) > 1 else [str(value)]
            if len(parts) != len(names):
                raise ConfigError(f"{where}.{value}: needs one value per axis of {key}, joined by "
                                  f"commas (e.g. {','.join(sorted(axes[a])[0] for a in names)})")
            for axis, part in zip(names, parts, strict=True):
                if part not in axes[axis]:
                    raise ConfigError(f"{where}.{value}: {part!r} is not a value of the grid axis "
                                      f"{axis} (values: {', '.join(sorted(axes[axis]))})"
                                      if len(names) > 1 else
                                      f"{where}.{value}: not a value of the grid axis "
                                      f"(values: {', '.join(sorted(axes[axis]))})")
            for name, p in params.items():
                if name not in spec.search:
                    raise ConfigError(f"{where}.{value}.{name}: only parameters of sweep.search "
                                      f"can be re-ranged ({', '.join(spec.search) or 'none'})")
                for extreme in p.extremes():
                    build_config(apply_overrides(raw, {name: extreme}), where=f"{where}.{value}.{name}")


def _grid_name(spec, k: int) -> str:
    """How errors name grid k: `sweep.grid` for a single grid, `sweep.grid[k]` in a list."""
    return f"sweep.grid[{k}]" if isinstance(spec.grid, list) else "sweep.grid"


def _check_grids(path: Path, raw: dict[str, Any], spec) -> None:
    """Every value of every axis, applied with the first value of each other axis of its grid
    (a loss may need another axis of its grid, e.g. `ipo` its `masking: masked-mean`)."""
    for k, grid in enumerate(spec.grids):
        where = f"{path}: {_grid_name(spec, k)}"
        for i, value in enumerate(grid.get("masking", [])):
            if value not in MASKINGS:
                raise ConfigError(f"{where}.masking[{i}]: {value!r} is not one of "
                                  f"{', '.join(MASKINGS)}")
        first = {axis: values[0] for axis, values in grid.items()}
        for axis, values in grid.items():
            for i, value in enumerate(values):
                cell = Cell(tuple({**first, axis: value}.items()))
                build_config(apply_overrides(raw, cell.overrides()), where=f"{where}.{axis}[{i}]")


def _cells(path: Path, spec) -> list[Cell]:
    """The union of each grid's Cartesian product, in order; a cell that appears twice (the same
    id, or the same config values) is an error naming both places."""
    cells: list[Cell] = []
    seen: dict[str, tuple[Cell, int]] = {}
    for k, grid in enumerate(spec.grids):
        axes = list(grid.items())
        for combo in itertools.product(*[v for _, v in axes]):
            cell = Cell(tuple(zip([a for a, _ in axes], combo, strict=True)))
            values = json.dumps(sorted(cell.overrides().items()), default=str)
            for key in (f"id {cell.id}", f"values {values}"):
                if key in seen:
                    other, j = seen[key]
                    raise ConfigError(
                        f"{path}: {_grid_name(spec, k)}: cell {cell.id} duplicates cell {other.id} "
                        f"of {_grid_name(spec, j)} (the same {key.split()[0]}); each cell may "
                        "appear once")
                seen[key] = (cell, k)
            cells.append(cell)
    if spec.search_cap > 1:
        return [Cell(c.values, r) for c in cells for r in range(spec.search_cap)]
    return cells


def load_experiment(path: str | Path, study: str | None = None) -> Experiment:
    """Read and validate a study before anything runs: the sweep section, every grid value and
    search extreme applied to the run config, and an objective that every cell's runs log."""
    path = Path(path)
    raw = read_yaml(path)
    base = build_config(raw, where=str(path))
    if base.sweep is None:
        raise ConfigError(f"{path}: a sweep experiment needs a `sweep:` section")
    spec = base.sweep
    raw.pop("sweep")
    if study:
        spec.study = study
    _check_grids(path, raw, spec)
    for name, p in spec.search.items():
        for value in p.extremes():
            build_config(apply_overrides(raw, {name: value}), where=f"{path}: sweep.search.{name}")
    _check_search_by(path, raw, spec)
    cells = _cells(path, spec)
    for cell in cells:
        cfg = build_config(apply_overrides(raw, cell.overrides()), f"{path}: sweep.grid cell {cell.id}")
        logged = metrics.enabled(cfg)
        if spec.objective.kl_budget is not None and "gen/kl" not in logged:
            raise ConfigError(f"{path}: sweep.objective.kl_budget: runs of cell {cell.id} log no "
                              "gen/kl (generation metrics are off)")
        if spec.objective.metric not in logged:
            raise ConfigError(
                f"{path}: sweep.objective.metric: no run of this experiment logs "
                f"{spec.objective.metric!r} (cell {cell.id}); it logs: "
                f"{', '.join(sorted(m for m in logged if m.startswith(('eval/', 'gen/'))))}")
    return Experiment(path=path, raw=raw, base=base, spec=spec, cells=cells)
