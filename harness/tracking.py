"""Tracking behind a small interface, `log`, `table`, `summary`, `close`, with two backends:

- `RunFiles`, the run directory's files (the source of truth; harness.rundir names them and owns
  the layout): the resolved config and labels, one row per logged step, a file per table, and
  the summary, written once at the end;
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
import sys
import warnings
from pathlib import Path
from typing import Any, Protocol

from harness import atomic, metrics, rundir

STEP_METRIC = "examples_seen"  # wandb's x axis for every split: runs of any batch size line up
# wandb job_type per run role (labels["role"]; None: a single `harness train` run).
JOB_TYPES = {None: "train", "search": "search", "seeds": "seed-rerun", "summary": "summary"}
# The best value of each headline metric with a direction (harness.metrics) goes into the wandb
# summary as `best/<name>`.
BEST = {name: m.direction for name, m in metrics.METRICS.items() if m.headline and m.direction}


def _clean(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


WANDB_TAG_MAX = 64  # wandb refuses a longer tag (and with it the whole run)


def wandb_tag(tag: str) -> str:
    """`tag` as wandb takes it: a longer one (a cell value naming a model directory, say) keeps
    its end, where the directory's own name is."""
    return tag if len(tag) <= WANDB_TAG_MAX else "…" + tag[-(WANDB_TAG_MAX - 1):]


class Backend(Protocol):
    def log(self, values: dict[str, float], step: int, examples_seen: int) -> None: ...
    def table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
              examples_seen: int | None = None) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def close(self, exit_code: int = 0) -> None: ...


# ----------------------------------------------------------------------------- run files


class RunFiles:
    """The run directory's files: config.json, metrics.jsonl, a file per table, summary.json."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.atomic_json(self.run_dir / rundir.CONFIG, config)
        path = self.run_dir / rundir.METRICS
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
        path = self.run_dir / rundir.table_file(key)
        atomic.atomic_json(path, [dict(zip(columns, r, strict=True)) for r in rows])

    def summary(self, values: dict[str, Any]) -> None:
        atomic.atomic_json(self.run_dir / rundir.SUMMARY, values)

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
                job_type=job_type, tags=[wandb_tag(t) for t in tracking.tags] or None, name=name,
                config=config,
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
