"""End-to-end DPO runs on a tiny model: run files, falling loss, exact repeats, reference cache,
wandb offline read-back, and the command line."""

import json
import os
import subprocess
import sys

import pytest

from harness.config import load_config
from harness.train import train
from tests.precision import PRECISIONS, assert_close
from tests.runs import ROOT, SMOKE, quick_config, read_metrics, without_perf

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


@pytest.mark.slow
def test_smoke_experiment_runs_and_loss_falls(seed_data, tmp_path):
    """experiments/smoke.yaml as shipped: every run file is written and the loss falls."""
    cfg = load_config(SMOKE, {"tracking.results_dir": str(tmp_path), "tracking.progress": False})
    run_dir = tmp_path / "smoke"
    summary = train(cfg, run_dir=run_dir)

    for name in ("config.json", "metrics.jsonl", "summary.json", "model/model.safetensors",
                 "tokenizer/tokenizer.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "config.json").read_text())["dpo"]["beta"] == 0.1
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert all("step" in r and "examples_seen" in r for r in rows)
    for key in [f"train/{m}" for m in METRICS] + ["train/grad_norm", "train/lr", "perf/tokens_per_s",
                                                  "perf/step_s"]:
        assert key in train_rows[-1], key
    for key in [f"eval/{m}" for m in METRICS]:
        assert key in eval_rows[-1], key
    # Before any update the policy equals the reference: loss ln 2, margin 0.
    assert eval_rows[0]["eval/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert eval_rows[0]["examples_seen"] == 0
    first = sum(r["train/loss"] for r in train_rows[:5]) / 5
    last = sum(r["train/loss"] for r in train_rows[-5:]) / 5
    assert last < first - 0.02, (first, last)
    assert eval_rows[-1]["eval/loss"] < eval_rows[0]["eval/loss"]
    assert eval_rows[-1]["eval/rewards/margins"] > 0
    assert summary["status"] == "finished"
    assert summary["data/train/total"] == 340 and summary["data/test/total"] == 40
    assert "test/loss" in summary


def test_same_seed_repeats_metrics_exactly(seed_data, tmp_path):
    """A CPU run repeats its metrics exactly (timings aside) for a fixed seed."""
    a = tmp_path / "a"
    b = tmp_path / "b"
    train(quick_config(seed_data, tmp_path), run_dir=a)
    train(quick_config(seed_data, tmp_path), run_dir=b)
    assert without_perf(read_metrics(a)) == without_perf(read_metrics(b))
    c = tmp_path / "c"
    train(quick_config(seed_data, tmp_path, **{"train.seed": 7}), run_dir=c)
    assert without_perf(read_metrics(a)) != without_perf(read_metrics(c))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reference_cache_gives_same_losses_and_is_reused(seed_data, tmp_path, precision):
    """`reference: cache` gives the frozen model's losses and rewards (to 1e-6 in fp32, to bf16's
    rounding in bf16: tests/precision.py), and a second run reuses the file."""
    live = tmp_path / "live"
    train(quick_config(seed_data, tmp_path, **{"train.precision": precision}), run_dir=live)
    cached = tmp_path / "cached"
    s1 = train(quick_config(seed_data, tmp_path, **{"dpo.reference": "cache",
                                                    "train.precision": precision}), run_dir=cached)
    assert s1["reference_cache_reused"] is False and s1["precision"] == precision
    compared = 0
    for x, y in zip(read_metrics(live), read_metrics(cached), strict=True):
        keys = [k for k in x if k.endswith("/loss") or "/rewards/" in k]
        compared += assert_close(x, y, keys, precision, beta=0.1, pairs=4, rel=0, abs_=1e-6)
    assert compared > 20
    again = tmp_path / "again"
    s2 = train(quick_config(seed_data, tmp_path, **{"dpo.reference": "cache", "dpo.beta": 0.3,
                                                    "train.precision": precision}), run_dir=again)
    assert s2["reference_cache_reused"] is True
    assert s2["reference_cache"] == s1["reference_cache"]


def test_wandb_failure_never_stops_training(seed_data, tmp_path, monkeypatch):
    """If wandb.init raises, the run still finishes and writes its files."""
    import wandb

    def broken(*a, **k):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    run_dir = tmp_path / "nowandb"
    summary = train(quick_config(seed_data, tmp_path), run_dir=run_dir)
    assert summary["status"] == "finished" and summary["wandb_dir"] is None
    assert (run_dir / "summary.json").exists() and read_metrics(run_dir)


def test_wandb_mode_env_wins(monkeypatch):
    """WANDB_MODE overrides the configured mode; `auto` is offline without a login."""
    from harness import tracking

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_wandb_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    assert tracking.resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_wandb_mode("auto") == "online"


def test_finished_run_is_never_overwritten(seed_data, tmp_path):
    """A run directory with a summary.json refuses a second run."""
    run_dir = tmp_path / "once"
    train(quick_config(seed_data, tmp_path), run_dir=run_dir)
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        train(quick_config(seed_data, tmp_path), run_dir=run_dir)


def test_cli_train_and_bad_override(seed_data, tmp_path):
    """`harness train` runs from the shell; a bad --set names the field and exits 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    harness = [sys.executable, "-m", "harness", "train", str(SMOKE)]
    sets = ["--set", f"data.source={seed_data}", "--set", "data.limit=60", "--set", "model.name=tiny-xs",
            "--set", "train.max_steps=2", "--set", "tracking.progress=false"]
    ok = subprocess.run(harness + sets + ["--run-dir", str(tmp_path / "cli")], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "finished"
    bad = subprocess.run(harness + ["--set", "dpo.betta=0.2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2
    assert "dpo.betta" in bad.stderr and "unknown key" in bad.stderr and "smoke.yaml" in bad.stderr


def test_length_grouped_order_keeps_every_pair_and_cuts_padding():
    import random

    import torch

    from harness.data import TokenizedPair, length_grouped

    rng = random.Random(0)
    items = [TokenizedPair([1] * rng.randint(5, 60), [2] * rng.randint(1, 80), [3] * rng.randint(1, 80))
             for _ in range(203)]
    order = list(range(203))
    rng.shuffle(order)
    grouped = length_grouped(order, items, 8, torch.Generator().manual_seed(1))
    assert sorted(grouped) == list(range(203))
    assert grouped == length_grouped(order, items, 8, torch.Generator().manual_seed(1))
    # The partial batch (203 = 25 x 8 + 3) comes from the last chunk (16 x 8 = 128 pairs) and stays
    # last, so drop_last drops 3 pairs either way.
    assert set(grouped[-3:]) <= set(order[128:])

    def padded(o):
        total = 0
        for s in range(0, 200, 8):
            lens = [len(items[i].prompt_ids) + max(len(items[i].chosen_ids), len(items[i].rejected_ids))
                    for i in o[s:s + 8]]
            total += max(lens) * 8 - sum(lens)
        return total

    assert padded(grouped) < 0.5 * padded(order)
