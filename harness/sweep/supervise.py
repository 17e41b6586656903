"""Running a study: the worker processes on this machine, Ctrl-C and `kill` handling, and the
summary at the end. A worker that dies abnormally, or a cell that failed or is incomplete, ends
the command with an error naming it (after the summary is written); workers stop when their
parent dies."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from harness.config import load_experiment
from harness.sweep import faults
from harness.sweep.schedule import Sweep
from harness.sweep.storage import STORAGE_ENV, absolute, default_storage, masked
from harness.sweep.summary import write_summary


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


def _worker(path: str, study: str | None, storage_url: str, results_dir: str, threads: int,
            worker: int, workers: int) -> int:
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _stop_with_parent()
    exp = load_experiment(path, study)
    try:
        return Sweep(exp, storage_url, Path(results_dir), worker, workers).work()
    except KeyboardInterrupt:  # its trial is queued again; the parent reports the interruption
        sys.exit(130)


def _run_workers(path: str | Path, study: str | None, storage_url: str, results: Path,
                 workers: int) -> None:
    """`workers` spawned processes sharing the study; Ctrl-C or `kill` of this process stops them."""
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(path), study, storage_url, str(results), threads,
                                               i, workers)) for i in range(workers)]
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
    dead = [f"worker {i} (pid {p.pid}) exit code {p.exitcode}" for i, p in enumerate(procs)
            if p.exitcode != 0]
    if dead:
        raise SweepIncomplete("worker(s) died: " + "; ".join(dead))


def run_sweep(path: str | Path, workers: int = 1, storage: str | None = None,
              study: str | None = None, results_dir: str | None = None) -> Path:
    """Run (or continue) a study; returns the path of its summary table."""
    exp = load_experiment(path, study)
    results = Path(results_dir or exp.base.tracking.results_dir)
    storage = storage or os.environ.get(STORAGE_ENV)
    storage_url = absolute(storage) if storage else default_storage(results, exp.study)
    shown = masked(storage_url)
    sweep = Sweep(exp, storage_url, results, workers=max(1, workers))
    n_runs = len(exp.cells) * (exp.spec.trials + exp.spec.seeds - 1)
    print(f"study {exp.study}: {len(exp.cells)} cells x ({exp.spec.trials} trials + "
          f"{exp.spec.seeds - 1} seed reruns) = up to {n_runs} runs | storage {shown} | "
          f"{workers} worker(s)", file=sys.stderr)
    started = time.time()
    for cell, error in faults.precheck(exp, sweep.search_study).items():
        print(f"cell {cell} fails before training: {error}", file=sys.stderr)
    died = None
    if workers <= 1:
        sweep.work()
    else:
        try:
            _run_workers(path, study, storage_url, results, workers)
        except SweepIncomplete as err:
            died = str(err)
    out, rows = write_summary(sweep)
    bad = [f"{r['cell']}: {r['status']}" + (f" ({r['error']})" if r["error"] else "")
           for r in rows if r["status"] != "done"]
    print(json.dumps({"summary": str(out), "storage": shown}))
    if died or bad:
        raise SweepIncomplete(f"study {exp.study} ended with problems after "
                              f"{time.time() - started:.0f}s (summary: {out}):\n  "
                              + "\n  ".join(([died] if died else []) + bad))
    print(f"study {exp.study} done in {time.time() - started:.0f}s; summary: {out}", file=sys.stderr)
    return out
