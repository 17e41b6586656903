"""Tracking behind a tiny interface: `log_config`, `log`, `log_table`, `close`.

Two backends, always used together by `RunTracker`:
- the run directory: `config.json`, `metrics.jsonl` (one JSON object per logged step),
  `summary.json` (written once, at the end, by `write_summary`);
- wandb, online when logged in, offline otherwise (`WANDB_MODE` wins). A wandb failure
  prints one warning and disables wandb for the run: it never stops training, and the
  run-directory files are written regardless.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file and rename it: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _clean(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- wandb mode


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


class WandbBackend:
    """wandb run; every call is guarded so that a wandb fault only disables wandb."""

    def __init__(self, run_dir: Path, name: str, config: dict, tracking: Any, mode: str):
        self.run = None
        self.mode = mode
        if mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=tracking.project,
                entity=tracking.entity,
                group=tracking.group,
                tags=list(tracking.tags) or None,
                name=name,
                config=config,
                dir=str(run_dir),
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
            # Curves from runs with different batch sizes line up on examples seen.
            self.run.define_metric("examples_seen")
            for prefix in ("train/*", "eval/*", "perf/*", "gen/*"):
                self.run.define_metric(prefix, step_metric="examples_seen")
        except Exception as err:  # noqa: BLE001 - wandb must never stop a run
            self._fail("init", err)

    def _fail(self, what: str, err: Exception) -> None:
        print(f"warning: wandb {what} failed ({err!r}); continuing without wandb", file=sys.stderr)
        self.run = None

    @property
    def run_path(self) -> str | None:
        if self.run is None:
            return None
        return str(Path(self.run.dir).parent)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001
                self._fail("log", err)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            try:
                import wandb

                self.run.log({key: wandb.Table(columns=columns, data=rows)})
            except Exception as err:  # noqa: BLE001
                self._fail("log_table", err)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            try:
                self.run.summary.update(values)
            except Exception as err:  # noqa: BLE001
                self._fail("summary", err)

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as err:  # noqa: BLE001
                self._fail("finish", err)


# ----------------------------------------------------------------------------- run tracker


class RunTracker:
    """The run directory's files plus wandb, logged with the same metric names."""

    def __init__(self, run_dir: Path, config: dict, tracking: Any, name: str):
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config)
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self.wandb_mode = resolve_wandb_mode(tracking.wandb)
        self.wandb = WandbBackend(run_dir, name, config, tracking, self.wandb_mode)
        self.last: dict[str, float] = {}  # latest value of every metric (for a cut-off run's summary)

    def log(self, metrics: dict[str, float], step: int, examples_seen: int) -> None:
        row = {"step": step, "examples_seen": examples_seen}
        row.update({k: _clean(float(v)) for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self.last.update({k: v for k, v in row.items() if k not in ("step",)})
        self.wandb.log({**metrics, "examples_seen": examples_seen}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A table: a JSON file in the run directory and a wandb Table."""
        path = self.run_dir / f"{key.replace('/', '_')}.json"
        write_json_atomic(path, [dict(zip(columns, r, strict=True)) for r in rows])
        self.wandb.log_table(key, columns, rows)

    def write_summary(self, summary: dict) -> dict:
        summary = {k: _clean(v) for k, v in summary.items()}
        summary["wandb_mode"] = self.wandb_mode
        summary["wandb_dir"] = self.wandb.run_path
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.wandb.summary({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
        return summary

    def close(self, exit_code: int = 0) -> None:
        self._metrics.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.wandb.close(exit_code)
