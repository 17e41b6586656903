"""Helpers shared by the tests that train a tiny model: a fast config and the run files."""

import json
from pathlib import Path

from harness.config import load_config
from harness.rundir import METRICS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"


def quick_config(seed_data, tmp_path, **overrides):
    """smoke.yaml made smaller still: unit-test speed, same code path."""
    base = {
        "data.source": str(seed_data), "data.limit": 120, "data.max_length": 160,
        "model.name": "tiny-xs", "train.max_steps": 6, "train.batch_size": 4,
        "train.eval_every": 12, "train.eval_batches": 2, "train.lr": 1e-3,
        "tracking.results_dir": str(tmp_path / "results"), "tracking.progress": False,
    }
    base.update(overrides)
    return load_config(SMOKE, base)


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of rows."""
    return [json.loads(line) for line in (Path(run_dir) / METRICS).read_text().splitlines()]


def without_perf(rows: list[dict]) -> list[dict]:
    """Rows without perf/* (timings differ between otherwise identical runs)."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
