"""What `harness sweep` shows while it runs, read from the study's storage alone (as `harness
status` does), every POLL_S seconds: runs done / planned, which cell runs on which worker, each
run's result as it ends, the best value per cell, the time elapsed and an estimate of the time left.

- `live` (a terminal on stderr): a rich table redrawn in place; the workers' output goes to
  `results/<study>/workers.log`, since it would garble the table.
- `plain` (stderr is a file or a pipe: CI, `make sweep > log`, nohup): one line per finished run,
  the workers' output interleaved as before.

A planned run is done when its slot is settled: a search trial completed or pruned (a diverged
search trial is pruned), a seed rerun ended in any way (seed reruns are not retried). A failed
search trial is shown but fills no slot (the slot is tried again); the runs of a cell given up on,
and the seed reruns of a cell whose every trial was pruned, count as done since they will not run.
"""

from __future__ import annotations

import datetime as dt
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import rundir
from harness.config import Experiment
from harness.sweep import faults
from harness.sweep.estimate import is_extra
from harness.sweep.status import find_study
from harness.sweep.storage import open_storage

POLL_S = 2.0  # seconds between two reads of the storage
RECENT = 6  # finished runs listed under the live table
MODES = ("auto", "live", "plain", "off")


@dataclass
class Run:
    """One finished run: a search trial or a seed rerun."""

    key: str  # <optuna study>#<trial number>
    cell: str
    name: str  # its run folder: trial-NNN or seedK
    result: str  # the objective value, or pruned / diverged / failed
    ended: float  # epoch seconds
    seconds: float | None  # how long it ran; None when a finished run was read back
    counts: bool  # it settles one of the cell's planned runs


@dataclass
class CellView:
    cell: str
    done: int
    planned: int
    best: float | None = None
    running: list[str] = field(default_factory=list)  # "w0 trial-001 12s"
    failed: str = ""  # why the cell was given up on


@dataclass
class Snapshot:
    cells: list[CellView]
    finished: list[Run]  # in the order they ended

    @property
    def done(self) -> int:
        return sum(c.done for c in self.cells)

    @property
    def total(self) -> int:
        return sum(c.planned for c in self.cells)

    def durations(self) -> list[float]:
        return [r.seconds for r in self.finished if r.seconds is not None]


# ----------------------------------------------------------------------------- reading the storage


def _run_name(t, role: str) -> str:
    """The trial's run folder name (harness.rundir.run_name); `?` for a slot not known yet."""
    if "run_dir" in t.user_attrs:
        return Path(t.user_attrs["run_dir"]).name
    slot = t.user_attrs.get("seed_offset" if role == "seeds" else "slot")
    if slot is None:  # not settled yet
        return "seed?" if role == "seeds" else "trial-?"
    return rundir.run_name(role, int(slot))


def _result(t) -> str | None:
    """What a finished trial shows; None for one that did not end by itself (running, queued,
    cut off by a kill or Ctrl-C and queued again, or a surplus ask)."""
    diverged = t.user_attrs.get("outcome") == "diverged"
    if t.state.name == "COMPLETE":
        return f"{t.value:.4g}"
    if t.state.name == "PRUNED":
        return "diverged" if diverged else "pruned"
    if faults.real_failure(t):
        return "diverged" if diverged else "failed"
    return None


def _finished(t, study: str, cell: str, role: str) -> Run | None:
    result = _result(t)
    if result is None or t.datetime_complete is None:
        return None
    ran = None if t.user_attrs.get("read_back") or t.datetime_start is None else \
        (t.datetime_complete - t.datetime_start).total_seconds()
    # a search trial that failed is tried again in its slot; a seed rerun is never rerun
    counts = t.state.name in ("COMPLETE", "PRUNED") if role == "search" else True
    return Run(f"{study}#{t.number}", cell, _run_name(t, role), result,
               t.datetime_complete.timestamp(), ran, counts)


def read_cell(exp: Experiment, storage, cell, names: dict[str, str],
              now: dt.datetime) -> tuple[CellView, list[Run]]:
    """One cell's row and its finished runs; `names` maps host:pid to a worker's name."""
    spec = exp.spec
    view = CellView(cell.id, 0, spec.trials + spec.seeds - 1)
    runs: list[Run] = []
    settled = {"search": 0, "seeds": 0}
    search = find_study(storage, f"{exp.study}/{cell.id}")
    seeds = find_study(storage, f"{exp.study}/{cell.id}/seeds") if search is not None else None
    for study, role in ((search, "search"), (seeds, "seeds")):
        for t in study.get_trials(deepcopy=False) if study is not None else []:
            if t.state.name == "RUNNING":
                worker = t.user_attrs.get("worker", "unclaimed")
                age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
                view.running.append(f"{names.get(worker, worker)} {_run_name(t, role)} {clock(age)}")
            elif (run := _finished(t, study.study_name, cell.id, role)) is not None:
                runs.append(run)
                settled[role] += run.counts
    view.done = min(settled["search"], spec.trials) + min(settled["seeds"], spec.seeds - 1)
    if is_extra(spec, cell) and not runs and not view.running:
        view.planned = 0  # an adaptive search not begun: it runs only if the cell needs it
    if search is None:
        return view, runs
    if any(t.state.name == "COMPLETE" for t in search.get_trials(deepcopy=False)):
        view.best = search.best_value
    elif settled["search"] >= spec.trials:
        view.done = view.planned  # every trial pruned: no seed reruns will run
    if "failed" in search.user_attrs:
        view.failed, view.done = search.user_attrs["failed"], view.planned
    return view, runs


def read(exp: Experiment, storage, names: dict[str, str] | None = None) -> Snapshot:
    now = dt.datetime.now()
    cells, runs = [], []
    for cell in exp.cells:
        view, finished = read_cell(exp, storage, cell, names or {}, now)
        cells.append(view)
        runs += finished
    return Snapshot(cells, sorted(runs, key=lambda r: r.ended))


# ----------------------------------------------------------------------------- time


def eta(durations: list[float], remaining: int, workers: int) -> float | None:
    """Seconds left: the mean duration of the finished runs times the rounds the `remaining`
    runs take on `workers` parallel workers (ceil(remaining / workers)); None before any run
    has finished."""
    if workers < 1 or remaining < 0:
        raise ValueError(f"eta: workers {workers} must be >= 1 and remaining {remaining} >= 0")
    if not durations:
        return None
    return sum(durations) / len(durations) * math.ceil(remaining / workers)


def clock(seconds: float) -> str:
    """45s, 3m12s, 1h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def rough(seconds: float) -> str:
    """An estimate to the minute: 40s, 9m, 1h05m."""
    if seconds < 60:
        return clock(seconds)
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def timing(snap: Snapshot, elapsed: float, workers: int, done: int | None = None) -> str:
    """`3m12s elapsed, ~9m left` with `done` runs done (default: the snapshot's), or
    `..., estimating` until a run has finished."""
    done = snap.done if done is None else done
    left = eta(snap.durations(), max(0, snap.total - done), workers)
    if left is None:
        return f"{clock(elapsed)} elapsed, estimating"
    return f"{clock(elapsed)} elapsed, ~{rough(left)} left"


def best_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


# ----------------------------------------------------------------------------- showing it


def plain_line(run: Run, count: int, snap: Snapshot, elapsed: float, workers: int) -> str:
    best = next(c.best for c in snap.cells if c.cell == run.cell)
    return (f"[{count}/{snap.total}] {run.cell} {run.name} {run.result} (best {best_text(best)}) "
            f"| {timing(snap, elapsed, workers, count)}")


def render_live(snap: Snapshot, study: str, elapsed: float, workers: int, log: Path | None = None):
    """The live view of `snap` as one rich renderable."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    bar = ProgressBar(total=max(1, snap.total), completed=snap.done, width=30,
                      complete_style="cyan", finished_style="green")  # plain colours: any terminal
    head.add_row(f"[bold]study {study}[/]", bar,
                 f"{snap.done}/{snap.total} runs", timing(snap, elapsed, workers),
                 f"{workers} worker(s)")
    last = {r.cell: f"{r.name} {r.result}" for r in snap.finished}
    cells = Table(expand=False, header_style="bold")
    for name in ("cell", "runs", "best", "last result", "running (worker run time)"):
        cells.add_column(name, overflow="ellipsis", no_wrap=True)
    for c in snap.cells:
        running = ", ".join(c.running) or ("[red]failed: " + c.failed if c.failed else "")
        cells.add_row(c.cell, f"{c.done}/{c.planned}" if c.planned else "if needed", best_text(c.best), last.get(c.cell, ""),
                      running)
    recent = Table.grid(padding=(0, 2))
    for r in snap.finished[-RECENT:]:
        recent.add_row(r.cell, r.name, r.result, "" if r.seconds is None else clock(r.seconds))
    parts = [head, cells]
    if snap.finished:
        parts += ["[bold]last finished[/]", recent]
    if log is not None:
        parts.append(f"worker output: {log}")
    return Group(*parts)


def pick(mode: str, stream=None) -> str:
    """`auto` is `live` when `stream` (stderr by default) is a terminal, else `plain`."""
    if mode not in MODES:
        raise ValueError(f"view {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "live" if (stream or sys.stderr).isatty() else "plain"


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({path}: {err})"


# ----------------------------------------------------------------------------- the polling thread


class SweepView:
    """Shows a study while it runs, in a thread that reads its storage every POLL_S seconds. Use
    it as a context manager around the work; `names` maps host:pid to a worker's name."""

    def __init__(self, exp: Experiment, storage_url: str, mode: str, workers: int,
                 started: float, log: Path | None = None, out=None):
        if mode not in ("live", "plain"):
            raise ValueError(f"view {mode!r}: expected live or plain")
        self.exp, self.mode, self.workers, self.started, self.log = exp, mode, workers, started, log
        self.out = sys.stderr if out is None else out
        self.storage = open_storage(storage_url, heartbeat=False)
        self.names: dict[str, str] = {}
        self.seen: set[str] = set()
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._live = None

    def __enter__(self) -> SweepView:
        snap = read(self.exp, self.storage, self.names)
        self.seen = {r.key for r in snap.finished}  # runs of an earlier start are not announced
        self.done = snap.done
        if self.mode == "plain" and snap.done:
            print(f"[{snap.done}/{snap.total}] runs done before this start", file=self.out,
                  flush=True)
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.out)
            self._live = Live(self._render(snap), console=console, auto_refresh=False)
            self._live.start()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:  # the final state; after Ctrl-C or a crash, leave at once
            self._safe_poll()
        if self._live is not None:
            self._live.stop()

    def _loop(self) -> None:
        # Ctrl-C and kill go to the main thread, which waits on the workers: a signal the kernel
        # handed to this thread would not interrupt that wait.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while not self._stop.wait(POLL_S):
            self._safe_poll()

    def _safe_poll(self) -> None:
        try:
            self.poll()
        except Exception as err:  # noqa: BLE001 - the view must never stop the sweep
            print(f"(sweep view: could not read the storage: {err})", file=self.out)

    def _render(self, snap: Snapshot):
        return render_live(snap, self.exp.study, time.time() - self.started, self.workers,
                           self.log)

    def poll(self) -> None:
        snap = read(self.exp, self.storage, self.names)
        if self._live is not None:
            self._live.update(self._render(snap), refresh=True)
            return
        new = [r for r in snap.finished if r.key not in self.seen]
        elapsed = time.time() - self.started
        for i, run in enumerate(new, 1):
            # each counting run moves the count by one; the last line shows the storage's count
            self.done = snap.done if i == len(new) else min(snap.done, self.done + run.counts)
            print(plain_line(run, self.done, snap, elapsed, self.workers), file=self.out,
                  flush=True)
            self.seen.add(run.key)
