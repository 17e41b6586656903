"""The chaos test of `harness sweep` (`make chaos`; a short variant runs in `make test`).

A small study of the real command line (two cells x two trials, two seeds, tiny-xs on the
controlled task: SFT, pair sampling and cached reference log-probs all on) runs once without
interruption. Then the same study, in a fresh results folder and cache, is SIGKILLed at each
named crash point in turn (harness/chaos.py: inside SFT, pair sampling, reference caching, at an
eval step, between a run's summary.json and Optuna's record, inside seed queuing), restarted after
each; and another fresh copy is SIGKILLed at random moments (20-80% of the uninterrupted study's
duration after each restart), restarted each time until it ends (runs checkpoint every 32 pairs,
so a retried trial resumes its run). Each holds when every named point was really reached (or at
least one random kill hit a running study) and the final summary table equals the uninterrupted
one (statuses, trial counts, parameters, objective values, run folder names).

The full test also kills one of two workers, interrupts two workers with Ctrl-C, kills the
parent of two workers (the workers must stop), injects a diverging learning rate (counted, not averaged) and a cell that always fails
(the sweep must end under a time limit, non-zero, naming it). It prints a table of what it tried
and what held, and exits non-zero if anything did not hold.

    python -m tests.chaos [--kills 20] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from harness.chaos import CRASH_ENV, POINTS

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ["cell", "status", "trials", "pruned", "diverged", "seeds_done", "seeds_diverged",
            "objective_mean", "objective_sd", "objective_ci_low", "objective_ci_high",
            "seeds_degenerate"]

STUDY = {
    "name": "chaos",
    "task": {"name": "controlled", "n_sft_texts": 400, "n_train_prompts": 16, "n_val_prompts": 8,
             "n_eval_prompts": 8, "max_new_tokens": 16},
    "sft": {"steps": 30, "batch_size": 16, "max_length": 96},
    "data": {"max_length": 128},
    "model": {"name": "tiny-xs", "tokenizer_vocab_size": 512},
    "dpo": {"reference": "cache", "reduction": "sum"},
    "train": {"batch_size": 16, "epochs": 1, "eval_every": 48, "eval_batches": 2, "seed": 0,
              "save_model": False, "num_threads": 1, "checkpoint_every": 32},
    "gen_eval": {"max_new_tokens": 16},
    "tracking": {"wandb": "disabled", "progress": False},
    "sweep": {"grid": {"dpo.beta": [0.1, 0.5]}, "trials": 2, "seeds": 2,
              "search": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-3}},
              "objective": {"metric": "gen/reward_at_kl"}, "pruner": {"type": "none"}},
}


def write_study(folder: Path, **changes) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(STUDY))
    for key, value in changes.items():
        section, field = key.split(".", 1)
        if section == "sweep":
            raw["sweep"][field] = value
        else:
            raw.setdefault(section, {})[field] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(study: Path, results: Path, workers: int = 1, crash: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "DPO_HARNESS_CACHE": str(results / "cache"), "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = crash
    results.mkdir(parents=True, exist_ok=True)
    log = open(results / "log.txt", "a")  # noqa: SIM115 - the child holds it until it ends
    return subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(study), "--results-dir",
                             str(results), "--workers", str(workers)], env=env, stdout=log,
                            stderr=log, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -999


def table(results: Path) -> pd.DataFrame:
    df = pd.read_csv(results / "chaos" / "summary.csv")
    df["runs"] = df["run_dirs"].astype(object).fillna("").map(
        lambda s: ";".join(Path(p).relative_to(results).as_posix() for p in s.split(";") if p))
    cols = [c for c in COMPARED if c in df] + sorted(c for c in df if c.startswith("param/")) + ["runs"]
    return df[cols].sort_values("cell", ignore_index=True)


def children(pid: int) -> list[int]:
    """The sweep workers (spawned processes, not multiprocessing's resource tracker) of `pid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ----------------------------------------------------------------------------- scenarios


def uninterrupted(root: Path, report: list) -> tuple[pd.DataFrame, float]:
    """The reference table, and how long the whole study took (the random kills' time scale)."""
    results = root / "calm"
    results.mkdir(parents=True)
    t0 = time.time()
    rc = finish(start(write_study(root), results), 1200)
    took = time.time() - t0
    report.append(("uninterrupted study", f"exit {rc} in {took:.0f}s", rc == 0))
    return table(results), took


def _same_after_restart(study: Path, results: Path, reference: pd.DataFrame) -> tuple[int, bool]:
    rc = finish(start(study, results), 1200)
    same = rc == 0 and table(results).equals(reference)
    if not same and rc == 0:
        print(table(results).compare(reference), file=sys.stderr)
    return rc, same


def killed_at_every_point(root: Path, reference: pd.DataFrame, points: tuple[str, ...],
                          report: list) -> None:
    """Kill the study at each named point in turn, restarting it; then finish and compare. Holds
    only if every point was really reached and killed there."""
    results, study = root / "chaos", write_study(root)
    results.mkdir(parents=True)
    crashed, missed = [], []
    for point in points:
        rc = finish(start(study, results, crash=point), 600)
        (crashed if rc == -signal.SIGKILL else missed).append(
            point if rc == -signal.SIGKILL else f"{point} (exit {rc})")
    rc, same = _same_after_restart(study, results, reference)
    report.append((f"{len(points)} crash points, restarted after each",
                   f"killed at {', '.join(crashed) or 'no point'}"
                   f"{'; NOT reached: ' + ', '.join(missed) if missed else ''}; final exit {rc}; "
                   f"summary table {'equal to' if same else 'DIFFERENT from'} the uninterrupted one",
                   same and not missed))


def killed_at_random(root: Path, reference: pd.DataFrame, kills: int, took: float,
                     rng: random.Random, report: list) -> None:
    """A fresh study SIGKILLed `kills` times, each at a random moment between 20% and 80% of the
    uninterrupted study's duration after its (re)start; then finish and compare. Holds only if at
    least one kill hit a running study (the first always should: it cuts a study from scratch)."""
    results, study = root / "random", write_study(root / "random-study")
    results.mkdir(parents=True)
    landed = 0
    for _ in range(kills):
        proc = start(study, results)
        time.sleep(rng.uniform(0.2, 0.8) * took)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            landed += 1
        proc.wait()
    rc, same = _same_after_restart(study, results, reference)
    report.append((f"{kills} random SIGKILLs, restarted after each",
                   f"{landed} of {kills} hit a running study; final exit {rc}; summary table "
                   f"{'equal to' if same else 'DIFFERENT from'} the uninterrupted one",
                   same and landed > 0))


def two_workers_at_work(root: Path, name: str, settle_s: float):
    """A two-worker study started in root/name, `settle_s` after both workers exist and a trial
    has logged its first step (so a signal lands mid-study however fast this machine is)."""
    results, study = root / name, write_study(root / f"{name}-study")
    results.mkdir(parents=True)
    proc = start(study, results, workers=2)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and (
            len(children(proc.pid)) < 2 or not any(results.glob("chaos/runs/*/*/metrics.jsonl"))):
        time.sleep(0.2)
    time.sleep(settle_s)
    return results, study, proc, children(proc.pid)


def finished_with_budgets(study: Path, results: Path) -> tuple[int, bool]:
    """Run the same command again: (its exit code, every cell done with its full budget)."""
    rc = finish(start(study, results, workers=2), 1200)
    df = table(results)
    return rc, bool(rc == 0 and (df["status"] == "done").all() and (df["trials"] == 2).all())


def worker_killed(root: Path, report: list) -> None:
    results, study, proc, kids = two_workers_at_work(root, "worker", 0.5)
    if kids:
        os.kill(kids[0], signal.SIGKILL)
    rc = finish(proc, 1200)
    rc2, done = finished_with_budgets(study, results)
    held = rc == 1 and done  # the parent reports the dead worker
    report.append(("one of two workers SIGKILLed, then the command run again",
                   f"first exit {rc} (dead worker reported), rerun exit {rc2}, "
                   f"budgets {'met' if done else 'NOT met'}", held))


def interrupted(root: Path, report: list) -> None:
    """Ctrl-C (SIGINT to the process group) of two workers: exit 130, the cut-off trials queued
    again, and the same command finishes the study."""
    results, study, proc, _ = two_workers_at_work(root, "ctrl-c", 0.5)
    os.killpg(proc.pid, signal.SIGINT)
    rc = finish(proc, 300)
    rc2, done = finished_with_budgets(study, results)
    report.append(("Ctrl-C of two workers, then the command run again",
                   f"first exit {rc}, rerun exit {rc2}, budgets {'met' if done else 'NOT met'}",
                   rc == 130 and done))


def parent_killed(root: Path, report: list) -> None:
    _, _, proc, kids = two_workers_at_work(root, "parent", 0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(k) for k in kids):
        time.sleep(0.5)
    left = [k for k in kids if alive(k)]
    for k in left:
        os.kill(k, signal.SIGKILL)
    report.append(("parent of two workers SIGKILLed", f"{len(kids)} workers, {len(left)} still "
                   "running 30 s later", bool(kids) and not left))


def diverging_and_failing(root: Path, report: list) -> None:
    results = root / "faulty"
    results.mkdir(parents=True)
    study = write_study(root / "f", **{"sweep.grid": {"train.lr": [1.0e30], "train.batch_size": [16, 5000]},
                                       "sweep.search": {}, "sweep.trials": 2})
    t0 = time.time()
    rc = finish(start(study, results), 600)
    df = pd.read_csv(results / "chaos" / "summary.csv")
    big = df[df["train.batch_size"] == 5000].iloc[0]
    small = df[df["train.batch_size"] == 16].iloc[0]
    held = (rc == 1 and big["status"] == "failed" and "batch_size" in str(big["error"])
            and small["diverged"] == 2 and small["status"] == "no result")
    report.append(("diverging lr (1e30) and a cell that always fails (batch 5000)",
                   f"exit {rc} in {time.time() - t0:.0f}s; diverged {small['diverged']} of 2, "
                   f"failing cell: {big['status']}", bool(held)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="random SIGKILLs after the named points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--short", action="store_true", help="the make-test variant: chosen points only")
    p.add_argument("--out", default=None, help="keep the studies here (default: a temporary folder)")
    args = p.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="chaos-"))
    rng, report = random.Random(args.seed), []
    reference, took = uninterrupted(root, report)
    killed_at_every_point(root, reference, ("pairs", "summary", "seeds") if args.short else POINTS,
                          report)
    if args.kills:
        killed_at_random(root, reference, args.kills, took, rng, report)
    if not args.short:
        worker_killed(root, report)
        interrupted(root, report)
        parent_killed(root, report)
        diverging_and_failing(root, report)
    width = max(len(r[0]) for r in report)
    for what, outcome, held in report:
        print(f"{'held ' if held else 'FAIL '} {what:{width}}  {outcome}")
    print(f"studies in {root}")
    return 0 if all(r[2] for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
