"""Running a study: the worker processes on this machine, the view while it runs
(harness.sweep.view), Ctrl-C and `kill` handling, and the summary at the end. A worker that dies abnormally, or a cell that failed or is incomplete, ends
the command with an error naming it (after the summary is written); workers stop when their
parent dies."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from harness.config import load_experiment
from harness.quiet import quiet_libraries
from harness.sweep import faults
from harness.sweep.estimate import NOT_NEEDED
from harness.sweep.schedule import Sweep
from harness.sweep.storage import host, masked, resolve
from harness.sweep.summary import phase_line, phase_totals, write_summary
from harness.sweep.view import SweepView, pick, tail


class SweepIncomplete(RuntimeError):
    """The study ended with failed or incomplete cells, or a worker died."""


def _stop_with_parent() -> None:
    """Interrupt this worker (as Ctrl-C would: its trial is queued again) when its parent dies."""
    import _thread
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        _thread.interrupt_main()

    threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------------------- workers and devices

DEVICE_ENV = "CUDA_VISIBLE_DEVICES"  # what a worker's device assignment sets


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_accelerators() -> list[str]:
    """The CUDA devices this process sees, as the ids CUDA_VISIBLE_DEVICES takes."""
    import torch

    if not torch.cuda.is_available():
        return []
    shown = os.environ.get(DEVICE_ENV)
    ids = [d.strip() for d in shown.split(",") if d.strip()] if shown else []
    n = torch.cuda.device_count()
    return ids[:n] if ids else [str(i) for i in range(n)]


def plan_workers(workers: int | str, devices: list[str] | None,
                 per_device: Callable[[], int] | None = None) -> list[str | None]:
    """The device of each worker (None: no assignment, e.g. CPU). `workers` is a count or
    `auto`: on devices (`devices`, else the visible CUDA devices) as many workers per device as
    `per_device()` says fit (the memory plan: harness.plan; 1 without it), else one per usable
    CPU core. With more workers than devices, workers share devices round-robin."""
    if devices is None and workers == "auto":
        devices = visible_accelerators() or None
    if workers == "auto":
        k = max(1, per_device()) if devices and per_device is not None else 1
        workers = len(devices) * k if devices else usable_cores()
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"--workers {workers}: need at least one worker")
    return [devices[i % len(devices)] if devices else None for i in range(workers)]


def runs_per_gpu(path) -> int:
    """How many of the experiment's runs share one GPU: the memory plan's count for its largest
    cell (harness.plan), or 1 when the plan cannot be made (said on stderr)."""
    import torch

    from harness import plan

    try:
        device = torch.device("cuda", 0)
        plans = [plan.plan_run(cfg, device) for _, cfg in plan.runs_of(path)]
        largest = max(plans, key=lambda p: p.peak)
    except Exception as err:  # noqa: BLE001 - a plan is advice; the sweep runs without it
        print(f"memory plan unavailable ({err}): one worker per GPU", file=sys.stderr)
        return 1
    k = largest.per_device() or 1
    print(f"memory plan: {largest.name} needs ~{largest.peak / plan.GB:.1f} GB: {k} worker(s) per GPU",
          file=sys.stderr)
    return k


def _worker(path: str, study: str | None, storage_url: str, results_dir: str, threads: int,
            worker: int, workers: int, log: str | None = None) -> int:
    if log is not None:  # before anything can print: the parent's live view owns the terminal
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    quiet_libraries(force=True)  # before transformers is imported: the view is what is watched
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _stop_with_parent()
    exp = load_experiment(path, study)
    try:
        return Sweep(exp, storage_url, Path(results_dir), worker, workers, quiet=True).work()
    except KeyboardInterrupt:  # its trial is queued again; the parent reports the interruption
        sys.exit(130)


def _run_workers(path: str | Path, study: str | None, storage_url: str, results: Path,
                 devices: list[str | None], log: Path | None = None,
                 names: dict[str, str] | None = None) -> None:
    """One spawned process per entry of `devices`, sharing the study, each seeing only its
    device (CUDA_VISIBLE_DEVICES) and its share of the CPU cores, writing to `log` when given;
    Ctrl-C or `kill` of this process stops them. `names` gets each worker's host:pid -> wN."""
    import multiprocessing as mp

    workers = len(devices)
    threads = max(1, usable_cores() // workers)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(path), study, storage_url, str(results), threads,
                                               i, workers, None if log is None else str(log)))
             for i in range(workers)]
    shown = os.environ.get(DEVICE_ENV)
    try:
        for i, (p, device) in enumerate(zip(procs, devices, strict=True)):
            if device is not None:  # a spawned process starts with the environment of this moment
                os.environ[DEVICE_ENV] = device
            p.start()
            if names is not None:
                names[f"{host()}:{p.pid}"] = f"w{i}"
            time.sleep(1.0)  # stagger: the first worker creates the studies
    finally:
        if shown is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = shown

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
    dead = [f"worker {i} (pid {p.pid}) exit code {p.exitcode}" for i, p in enumerate(procs)
            if p.exitcode != 0]
    if dead:
        raise SweepIncomplete("worker(s) died: " + "; ".join(dead))


def _open_log(study_dir: Path) -> Path:
    """results/<study>/workers.log, where workers write under the live view; each start of the
    command appends a line that marks it."""
    study_dir.mkdir(parents=True, exist_ok=True)
    log = study_dir / "workers.log"
    with log.open("a") as f:
        f.write(f"==== harness sweep started {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
    print(f"worker output: {log}", file=sys.stderr)
    return log


def _work(path: str | Path, study: str | None, storage_url: str, results: Path, sweep: Sweep,
          plan: list[str | None], log: Path | None, view: SweepView | None) -> str | None:
    """Run the study's trials: in this process for one worker on no device whose output stays
    on the terminal, else in spawned workers; returns which workers died, if any."""
    names = {} if view is None else view.names
    if plan == [None] and log is None:
        names[faults.me()] = "w0"
        quiet_libraries(force=True)  # this process is the worker
        sweep.work()
        return None
    try:
        _run_workers(path, study, storage_url, results, plan, log, names)
    except SweepIncomplete as err:
        return str(err)
    return None


def run_sweep(path: str | Path, workers: int | str = 1, storage: str | None = None,
              study: str | None = None, results_dir: str | None = None,
              devices: list[str] | None = None, view: str = "off") -> Path:
    """Run (or continue) a study with `workers` processes (a count or `auto`), worker i on
    devices[i] when given (see plan_workers); returns the path of its summary table. `view` is
    what it shows while it runs (harness.sweep.view): `live`, `plain`, `auto` (live on a
    terminal) or `off`; with `live` the workers always run as spawned processes writing to
    results/<study>/workers.log."""
    mode = pick(view)
    exp = load_experiment(path, study)
    results = Path(results_dir or exp.base.tracking.results_dir)
    storage_url = resolve(storage, results, exp.study)
    shown = masked(storage_url)
    plan = plan_workers(workers, devices, lambda: runs_per_gpu(path))
    workers = len(plan)
    sweep = Sweep(exp, storage_url, results, workers=workers)
    spec = exp.spec
    n_runs = len(exp.cells) * (spec.trials + spec.seeds - 1)
    on = "" if plan == [None] * workers else " on devices " + ",".join(map(str, plan))
    adaptive = "" if spec.target_halfwidth is None else \
        (f" (searches {spec.searches} to {spec.max_searches} per cell, until its 95% half-width "
         f"<= {spec.target_halfwidth:g})")
    print(f"study {exp.study}: {len(exp.cells)} cells x ({spec.trials} trials + "
          f"{spec.seeds - 1} seed reruns) = up to {n_runs} runs{adaptive} | storage {shown} | "
          f"{workers} worker(s){on} on {host()}", file=sys.stderr)
    started = time.time()
    for cell, error in faults.precheck(exp, sweep.search_study).items():
        print(f"cell {cell} fails before training: {error}", file=sys.stderr)
    log = _open_log(results / exp.study) if mode == "live" else None
    shows = nullcontext() if mode == "off" else \
        SweepView(exp, storage_url, mode, workers, started, log)
    with shows as on_screen:
        died = _work(path, study, storage_url, results, sweep, plan, log, on_screen)
    out, rows = write_summary(sweep)
    print(f"where the time went: {phase_line(phase_totals(sweep))}", file=sys.stderr)
    bad = [f"{r['cell']}: {r['status']}" + (f" ({r['error']})" if r["error"] else "")
           for r in rows if r["status"] not in ("done", NOT_NEEDED)]
    print(json.dumps({"summary": str(out), "storage": shown}))
    if (died or bad) and log is not None:
        print(f"last lines of {log}:\n{tail(log)}", file=sys.stderr)
    if died or bad:
        raise SweepIncomplete(f"study {exp.study} ended with problems after "
                              f"{time.time() - started:.0f}s (summary: {out}):\n  "
                              + "\n  ".join(([died] if died else []) + bad))
    print(f"study {exp.study} done in {time.time() - started:.0f}s; summary: {out}", file=sys.stderr)
    return out
