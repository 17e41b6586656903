"""`harness replicate EXP.yaml`: the same study run twice, independently, and whether its answers
hold.

Replica `a` is the experiment as written; replica `b` draws its Optuna samples from another
sampler seed and trains on other seeds (train.seed + SEED_STRIDE), so the two share nothing but
the experiment itself (and what it builds once from its own settings: the task's pairs and the
SFT start, which depend on neither seed). Each replica is a study of its own in
results/<study>-a and results/<study>-b, resumable like any sweep; then replication.md
(analysis/replication.py) sets them side by side: per cell both estimates and whether their
intervals overlap, per finding whether it replicates, is inconclusive in one, or flips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from harness.atomic import atomic_write
from harness.config.load import DATA_PATHS, absolute_path, read_yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository: analysis/ beside harness/
REPLICAS = ("a", "b")
SEED_STRIDE = 100_000  # train.seed apart between the replicas (a study's searches are 1,000 apart)
SAMPLER_STRIDE = 7_919  # sweep.sampler_seed apart


def replica_experiment(path: Path, k: int, folder: Path) -> tuple[Path, str]:
    """(the YAML of replica k of the experiment at `path`, written into `folder`; its study name).
    Relative local data paths are made absolute, since the copy lives elsewhere."""
    raw = read_yaml(path)
    sweep = raw.setdefault("sweep", {})
    study = f"{sweep.get('study') or raw.get('name')}-{REPLICAS[k]}"
    sweep["study"] = study
    sweep["sampler_seed"] = int(sweep.get("sampler_seed", 0)) + SAMPLER_STRIDE * k
    train = raw.setdefault("train", {})
    train["seed"] = int(train.get("seed", 0)) + SEED_STRIDE * k
    data = raw.get("data") or {}
    for field in DATA_PATHS:
        if field in data:
            data[field] = absolute_path(data[field], path.parent)
    out = folder / f"{study}.yaml"
    atomic_write(out, f"# replica {REPLICAS[k]} of {path} (harness replicate)\n"
                 + yaml.safe_dump(raw, sort_keys=False))
    return out, study


def run_replicate(path: str | Path, workers: int | str = 1, results_dir: str | None = None,
                  view: str = "off") -> Path:
    """Run (or continue) both replicas of the study, then write replication.md (with
    analysis/replication.py, in a process of its own: the library never imports analysis/);
    returns its path."""
    from harness.config import load_experiment
    from harness.sweep.supervise import run_sweep

    path = Path(path)
    exp = load_experiment(path)
    results = Path(results_dir or exp.base.tracking.results_dir)
    folder = results / f"{exp.study}-replication"
    folder.mkdir(parents=True, exist_ok=True)
    took, studies = {}, []
    for k in range(len(REPLICAS)):
        replica, study = replica_experiment(path, k, folder)
        print(f"replica {REPLICAS[k]}: study {study} ({replica})", file=sys.stderr)
        started = time.time()
        run_sweep(replica, workers=workers, results_dir=str(results), view=view)
        took[study] = time.time() - started
        studies.append(study)
    out = folder / "replication.md"
    cmd = [sys.executable, "-m", "analysis.replication", str(results.resolve()), *studies, str(out.resolve()),
           "--command", f"harness replicate {path} --workers {workers}",
           *[f"--took={s}={t:.0f}" for s, t in took.items()]]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"replication: {out}", file=sys.stderr)
    return out
