"""Tracking: the offline wandb run of a training run holds the same metric values as the run
directory's summary.json, read back from the run's .wandb log with `wandb leet inspect`."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness.metrics import METRICS
from harness.train import train
from tests.runs import quick_config


def wandb_summary(wandb_dir: str) -> dict:
    """The run summary as wandb stored it: `wandb leet inspect --summary --json <run dir>` prints one
    JSON object whose `summary` maps flat metric names ("train/loss") to their last values."""
    wandb_bin = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--summary", "--json", wandb_dir],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert isinstance(found, dict) and isinstance(found.get("summary"), dict), out.stdout[:500]
    return found


def test_wandb_offline_summary_matches_summary_json(seed_data, tmp_path):
    """Every registered metric with a number in summary.json has the same value (to float
    precision) in the offline wandb run's summary; they include the train, eval and test
    metrics, and the wandb run finished."""
    run_dir = tmp_path / "w"
    summary = train(quick_config(seed_data, tmp_path), run_dir=run_dir)
    assert summary["wandb_mode"] == "offline" and summary["wandb_dir"]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    metrics = {k: v for k, v in on_disk.items()
               if k in METRICS and isinstance(v, int | float) and not isinstance(v, bool)}
    assert {"train/loss", "eval/rewards/margins", "test/rewards/accuracies"} <= metrics.keys()

    found = wandb_summary(summary["wandb_dir"])
    assert found["state"] == "finished" and found["exit_code"] == 0
    wb = found["summary"]
    missing = sorted(metrics.keys() - wb.keys())
    assert not missing, missing
    for name, value in sorted(metrics.items()):
        assert isinstance(wb[name], int | float), (name, wb[name])
        assert math.isfinite(value), name
        assert wb[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
