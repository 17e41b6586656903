"""Tracking behind a small interface, `log`, `table`, `summary`, `close`, with two backends:

- `RunFiles`, the run directory (the source of truth, and the one owner of its layout):
  `config.json` (the resolved config and the run's `labels`), `metrics.jsonl` (one JSON object
  per logged step), `<table>.json` per table, `summary.json` (written once, at the end),
  `checkpoint/` while a run with train.checkpoint_every is under way (harness.checkpoint);
- `Wandb`, online when logged in, offline otherwise (`WANDB_MODE` wins). A wandb failure prints
  one warning and disables wandb for the run: it never stops training. A single run keeps its
  wandb files in `<run dir>/wandb/`; a sweep's runs share their study's `<study>/wandb/`, named
  `<cell>/<slot>`, so that one `wandb leet <study>/wandb` browses the whole study.

`Tracker` sends every call to its backends and checks metric names against harness.metrics.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import shutil
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from harness import atomic, metrics

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
DATA_COUNTS = "data_counts.json"  # pairs per split: total, kept, truncated, dropped
CHECKPOINT = "checkpoint"  # the last run checkpoint (harness.checkpoint), removed at the end
FINISHED = "finished"  # the summary status of a complete run
STEP_METRIC = "examples_seen"  # wandb's x axis for every split: runs of any batch size line up
# wandb job_type per run role (labels["role"]; None: a single `harness train` run).
JOB_TYPES = {None: "train", "search": "search", "seeds": "seed-rerun", "summary": "summary"}
# The best value of each headline metric goes into the wandb summary as `best/<name>`; gen/kl has
# no better direction (it is held to a budget, and its estimate can dip below zero).
BEST = {"train/loss": "min", "eval/loss": "min", "test/loss": "min", "eval/rewards/margins": "max",
        "eval/rewards/accuracies": "max", "gen/reward": "max"}


def new_run_dir(results_dir: str | Path, name: str, run_dir: str | Path | None) -> Path:
    """`run_dir` as given, else results_dir/runs/<name>-<time>. A finished run is never
    overwritten; an earlier attempt that was cut off (no summary, or a status other than
    finished) may be resumed or started over (harness.checkpoint.resume_point)."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(results_dir) / "runs" / f"{name}-{stamp}"
    run_dir = Path(run_dir)
    if run_status(run_dir) == FINISHED:
        raise FileExistsError(f"{run_dir} already holds a finished run ({SUMMARY}); pick another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_status(run_dir: Path) -> str | None:
    """The status in run_dir's summary.json; None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def earlier_attempt(run_dir: Path) -> bool:
    """Whether run_dir holds metrics, a summary or a checkpoint of an earlier attempt."""
    return any((Path(run_dir) / name).exists() for name in (METRICS, SUMMARY, CHECKPOINT))


def start_over(run_dir: Path) -> None:
    """Remove what an earlier attempt left that a new one would append to or be confused by:
    metrics.jsonl, summary.json and the checkpoint."""
    run_dir = Path(run_dir)
    (run_dir / METRICS).unlink(missing_ok=True)
    (run_dir / SUMMARY).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)


def resume_files(run_dir: Path, lines: int) -> bool:
    """Ready run_dir to continue an earlier attempt: metrics.jsonl cut to its first `lines` rows
    (the rows a checkpoint had counted), summary.json removed. False, and nothing changed, when
    metrics.jsonl holds fewer complete rows."""
    path = Path(run_dir) / METRICS
    rows = (path.read_text(encoding="utf-8") if path.exists() else "").split("\n")[:-1]
    if len(rows) < lines:  # rows[:-1]: what follows the last newline is no complete row
        return False
    atomic.atomic_write(path, "".join(f"{r}\n" for r in rows[:lines]))
    (Path(run_dir) / SUMMARY).unlink(missing_ok=True)
    return True


def run_labels(cfg: Any, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """What analysis groups runs by, written explicitly into config.json and summary.json:
    study, cell, trial, role and storage (set by a sweep, else None), masking and seed."""
    sweep = sweep or {}
    return {"study": sweep.get("study"), "cell": sweep.get("cell"), "trial": sweep.get("trial"),
            "role": sweep.get("role"), "storage": sweep.get("storage"),
            "masking": cfg.dpo.masking, "seed": cfg.train.seed}


def _clean(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Backend(Protocol):
    def log(self, values: dict[str, float], step: int, examples_seen: int) -> None: ...
    def table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
              examples_seen: int | None = None) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def close(self, exit_code: int = 0) -> None: ...


# ----------------------------------------------------------------------------- run files


class RunFiles:
    """The run directory's files."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.atomic_json(self.run_dir / CONFIG, config)
        path = self.run_dir / METRICS
        self.lines = path.read_text(encoding="utf-8").count("\n") if path.exists() else 0  # rows
        self._metrics = open(path, "a", buffering=1)  # noqa: SIM115

    def log(self, values: dict[str, float], step: int, examples_seen: int) -> None:
        row = {"step": step, "examples_seen": examples_seen}
        row.update({k: _clean(float(v)) for k, v in values.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self.lines += 1

    def sync(self) -> None:
        """metrics.jsonl on disk up to its last row (before a checkpoint counts its rows)."""
        self._metrics.flush()
        os.fsync(self._metrics.fileno())

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
              examples_seen: int | None = None) -> None:
        """`<key>.json`, the last table logged under that key."""
        path = self.run_dir / f"{key.replace('/', '_')}.json"
        atomic.atomic_json(path, [dict(zip(columns, r, strict=True)) for r in rows])

    def summary(self, values: dict[str, Any]) -> None:
        atomic.atomic_json(self.run_dir / SUMMARY, values)

    def close(self, exit_code: int = 0) -> None:
        self._metrics.close()


# ----------------------------------------------------------------------------- wandb


def wandb_logged_in() -> bool:
    """True when an API key is available (env var or ~/.netrc), without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(configured: str) -> str:
    """`WANDB_MODE` wins; `auto` means online when logged in, offline otherwise."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "disabled" if env in ("disabled", "dryrun_disabled") else env
    if configured == "auto":
        return "online" if wandb_logged_in() else "offline"
    return configured


def _password_in_argv() -> bool:
    """A command line holding a URL with a password (`--storage postgresql://u:pw@h/db`): wandb
    must not record the command line as run metadata then."""
    return any(re.search(r"://[^/@\s]*:[^/@\s]*@", a) for a in sys.argv)


class Wandb:
    """A wandb run; every call is guarded so that a wandb fault only disables wandb.

    `wandb_dir` is where wandb makes its `wandb/` folder; `job_type` is one of JOB_TYPES."""

    def __init__(self, wandb_dir: Path, name: str, config: dict, tracking: Any,
                 job_type: str = JOB_TYPES[None]):
        self.run = None
        self.best: dict[str, float] = {}  # best value so far of each BEST metric
        self.mode = resolve_wandb_mode(tracking.wandb)
        if self.mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=tracking.project, entity=tracking.entity, group=tracking.group,
                job_type=job_type, tags=list(tracking.tags) or None, name=name, config=config,
                dir=str(wandb_dir), mode=self.mode, reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                        x_disable_meta=_password_in_argv()),
            )
            # Curves from runs with different batch sizes line up on examples seen.
            self.run.define_metric(STEP_METRIC)
            for split in metrics.SPLITS:
                self.run.define_metric(f"{split}/*", step_metric=STEP_METRIC)
        except Exception as err:  # noqa: BLE001 - wandb must never stop a run
            self._fail("init", err)

    def _fail(self, what: str, err: Exception) -> None:
        print(f"warning: wandb {what} failed ({err!r}); continuing without wandb", file=sys.stderr)
        self.run = None

    def _guard(self, what: str, fn) -> None:
        if self.run is not None:
            try:
                fn()
            except Exception as err:  # noqa: BLE001
                self._fail(what, err)

    @property
    def run_path(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, values: dict[str, float], step: int, examples_seen: int) -> None:
        self._keep_best(values)
        self._guard("log", lambda: self.run.log({**values, STEP_METRIC: examples_seen}, step=step))

    def _keep_best(self, values: dict[str, float]) -> None:
        pick = {"max": max, "min": min}
        for name, direction in BEST.items():
            v = values.get(name)
            if v is not None and math.isfinite(v):
                self.best[name] = pick[direction](self.best.get(name, v), v)

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
              examples_seen: int | None = None) -> None:
        def log_table() -> None:
            import wandb

            data = {key: wandb.Table(columns=columns, data=rows)}
            if step is None:
                self.run.log(data)
            else:  # beside that step's metrics: the UI's step slider walks through the tables
                self.run.log({**data, STEP_METRIC: examples_seen}, step=step)

        self._guard("log_table", log_table)

    def summary(self, values: dict[str, Any]) -> None:
        """The final values as they are (what analysis reads), and each BEST metric's best value
        as `best/<name>` (wandb's own define_metric(summary=...) would replace the final value)."""
        plain = {k: v for k, v in values.items() if isinstance(v, int | float | str)}
        plain.update({f"best/{k}": v for k, v in self.best.items()})
        self._guard("summary", lambda: self.run.summary.update(plain))

    def close(self, exit_code: int = 0) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._guard("finish", lambda: self.run.finish(exit_code=exit_code))


# ----------------------------------------------------------------------------- tracker


class Tracker:
    """Every call goes to every backend; metric names are checked against the registry."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends
        self.last: dict[str, float] = {}  # latest value of every metric (a cut-off run's summary)

    @classmethod
    def for_run(cls, run_dir: Path, cfg: Any, labels: dict[str, Any]) -> Tracker:
        """Run files and wandb, both holding the resolved config and the run's labels. A sweep's
        run (labels name its study) is named after its config (`<cell>/<slot>`) and keeps its
        wandb files in the study's folder (its tracking.results_dir); a single run is named after
        its run directory and keeps them there."""
        config = {**cfg.to_dict(), "labels": labels}
        in_study = labels.get("study") is not None
        name = cfg.name if in_study else run_dir.name
        wandb_dir = Path(cfg.tracking.results_dir) if in_study else run_dir
        role = labels.get("role")
        wandb = Wandb(wandb_dir, name, config, cfg.tracking, JOB_TYPES.get(role, str(role)))
        return cls([RunFiles(run_dir, config), wandb])

    @property
    def wandb(self) -> Wandb | None:
        return next((b for b in self.backends if isinstance(b, Wandb)), None)

    def metrics_lines(self) -> int:
        """Rows in metrics.jsonl, synced to disk (0 without run files)."""
        files = next((b for b in self.backends if isinstance(b, RunFiles)), None)
        if files is None:
            return 0
        files.sync()
        return files.lines

    def log(self, values: dict[str, float], step: int, examples_seen: int) -> None:
        metrics.check(values)
        for b in self.backends:
            b.log(values, step, examples_seen)
        self.last.update({k: _clean(float(v)) for k, v in values.items()})
        self.last["examples_seen"] = examples_seen

    def table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
              examples_seen: int | None = None) -> None:
        """A table, at a step when given (wandb keeps one per step, the run files the last)."""
        for b in self.backends:
            b.table(key, columns, rows, step, examples_seen)

    def summary(self, values: dict[str, Any]) -> dict[str, Any]:
        """Write the final summary (non-finite floats as null, wandb's mode and folder added)."""
        w = self.wandb
        values = {k: _clean(v) for k, v in values.items()}
        values["wandb_mode"] = w.mode if w else "disabled"
        values["wandb_dir"] = w.run_path if w else None
        for b in self.backends:
            b.summary(values)
        return values

    def close(self, exit_code: int = 0) -> None:
        for b in self.backends:
            b.close(exit_code)
