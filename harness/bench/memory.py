"""Peak memory of a path: the resident set a training step needs, each path in a process of its own.

A process's peak cannot be split between paths that run interleaved in it, so the peak of each
path is measured in a fresh child (`python -m harness.bench --child`) that runs its steps alone.
This module owns both ends of that: `run_child` in the parent hands the child its job on stdin
(the case and the parent's resolved run config, so that the child prepares exactly the parent's
data without reading the experiment YAML again), `read_job` reads it in the child, and
`child_main` runs the naive or harness path there. TRL's child (trl_path.child_main) reads the
same job and measures itself with `peak_rss` and `reset_peak_rss`.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import asdict

from harness.bench.cases import Case, load
from harness.bench.paths import make_path
from harness.config import RunConfig, build_config
from harness.memory import peak_rss, reset_peak_rss

# ----------------------------------------------------------------------------- the parent


def run_child(case: Case, cfg: RunConfig, path: str, steps: int) -> dict:
    """`steps` steps of `path` (naive, harness or trl) in a fresh process: the JSON object it
    prints last (child_main's, or trl_path.child_main's)."""
    job = {"case": asdict(case), "config": cfg.to_dict(), "path": path, "steps": steps}
    out = subprocess.run([sys.executable, "-m", "harness.bench", "--child"], input=json.dumps(job),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child for {case.name}/{path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_child(case: Case, cfg: RunConfig, path: str, steps: int) -> float:
    """Peak RSS (bytes) of a fresh process that loads the case and runs `steps` steps of one path."""
    return float(run_child(case, cfg, path, steps)["peak_rss"])


def add_peak_rss(result: dict, case: Case, cfg: RunConfig) -> None:
    """The naive and harness paths' peak RSS (2 steps each, in children) into a case's result,
    and their ratio harness / naive."""
    paths = result["paths"]
    for name in ("naive", "harness"):
        paths[name]["peak_rss_gb"] = peak_rss_child(case, cfg, name, 2) / 1e9
    result["rss_ratio"] = paths["harness"]["peak_rss_gb"] / paths["naive"]["peak_rss_gb"]


# ----------------------------------------------------------------------------- the child


def read_job(text: str) -> tuple[Case, RunConfig, str, int]:
    """(case, run config, path, steps) from the job run_child wrote."""
    job = json.loads(text)
    cfg = build_config(job["config"], where="bench job")
    return Case(**job["case"]), cfg, job["path"], job["steps"]


def child_main(case: Case, cfg: RunConfig, path: str, steps: int) -> dict:
    """Runs in the child: `steps` steps of the naive or harness path; its peak RSS after loading
    and after the steps."""
    model, bats, cfg, _ = load(case, 8 * steps, cfg)
    runner = make_path(path, model, cfg, bats)
    del model  # each path holds its own copies, as in a real run
    gc.collect()
    load_peak = peak_rss()
    reset = reset_peak_rss()  # from here the high-water mark is the training's own
    for idx, batch in bats[:steps]:
        runner.step(idx, batch)
    return {"peak_rss": peak_rss(), "load_peak_rss": load_peak, "reset": reset}
