"""Running a study: the worker processes on this machine, Ctrl-C and `kill` handling, and the
summary at the end."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from harness.config import load_experiment
from harness.sweep.schedule import Sweep
from harness.sweep.storage import absolute, default_storage
from harness.sweep.summary import write_summary


def _worker(path: str, study: str | None, storage_url: str, results_dir: str, threads: int,
            worker: int) -> int:
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    exp = load_experiment(path, study)
    return Sweep(exp, storage_url, Path(results_dir), worker).work()


def _run_workers(path: str | Path, study: str | None, storage_url: str, results: Path,
                 workers: int) -> None:
    """`workers` spawned processes sharing the study; Ctrl-C or `kill` of this process stops them."""
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


def run_sweep(path: str | Path, workers: int = 1, storage: str | None = None,
              study: str | None = None, results_dir: str | None = None) -> Path:
    """Run (or continue) a study; returns the path of its summary table."""
    exp = load_experiment(path, study)
    results = Path(results_dir or exp.base.tracking.results_dir)
    storage_url = absolute(storage) if storage else default_storage(results, exp.study)
    sweep = Sweep(exp, storage_url, results)
    n_runs = len(exp.cells) * (exp.spec.trials + exp.spec.seeds - 1)
    print(f"study {exp.study}: {len(exp.cells)} cells x ({exp.spec.trials} trials + "
          f"{exp.spec.seeds - 1} seed reruns) = up to {n_runs} runs | storage {storage_url} | "
          f"{workers} worker(s)", file=sys.stderr)
    started = time.time()
    if workers <= 1:
        sweep.work()
    else:
        _run_workers(path, study, storage_url, results, workers)
    out = write_summary(sweep)
    print(f"study {exp.study} done in {time.time() - started:.0f}s; summary: {out}", file=sys.stderr)
    print(json.dumps({"summary": str(out), "storage": storage_url}))
    return out
