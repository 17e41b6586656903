"""Data-parallel runs under torchrun: two CPU processes (gloo) train the same run as one process
with the same global batch, within float tolerance, and only rank 0 writes the run's files."""

import json
import os
import subprocess
import sys

import pytest

from harness import distributed
from harness.chaos import CRASH_ENV
from tests.precision import BF16_U, assert_close
from tests.runs import ROOT, SMOKE, read_metrics, without_perf

# Cached reference log-probs (computed sharded and gathered), two micro-batches per optimizer
# step (DDP's no_sync on the first), a checkpoint saved mid-run, train metrics at every step.
SETTINGS = {
    "data.limit": 120, "data.max_length": 160, "model.name": "tiny-xs", "train.max_steps": 5,
    "train.batch_size": 4, "train.grad_accum": 2, "train.eval_every": 24, "train.eval_batches": 2,
    "train.lr": 1e-3, "train.log_every": 1, "train.checkpoint_every": 16,
    "train.keep_checkpoint": True, "train.save_model": False, "dpo.reference": "cache",
    "tracking.progress": False, "tracking.wandb": "disabled",
}


def run(seed_data, tmp_path, name: str, processes: int, crash_at: str | None = None,
        code: int = 0, precision: str = "fp32") -> subprocess.CompletedProcess:
    sets = {**SETTINGS, "data.source": str(seed_data), "train.precision": precision,
            "tracking.results_dir": str(tmp_path / "results"),
            "dpo.reference_cache_dir": str(tmp_path / f"cache-{name}")}
    args = [str(SMOKE), "--run-dir", str(tmp_path / name)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    out = subprocess.run([*launcher, "-m", "harness", "train", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert (out.returncode == 0) == (code == 0), out.stderr[-3000:]
    return out


def same_run(tmp_path, precision: str) -> list[dict]:
    """The metrics of run "two" (2 ranks) against run "one" (1 process), every logged value, to
    the precision's tolerance (tests/precision.py); returns run two's rows."""
    single, ddp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    # One writer: as many rows as the single process, each step once.
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    compared = 0
    for a, b in zip(single, ddp, strict=True):
        assert a.keys() == b.keys()
        keys = [k for k, v in a.items() if not k.startswith("perf/") and isinstance(v, float)]
        # Train rows average one step's 8 pairs; eval rows 2 batches of 4 pairs.
        compared += assert_close(a, b, keys, precision, beta=0.1, pairs=8)
    assert compared > 50
    losses = [r["train/loss"] for r in ddp if "train/loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]  # it trained
    for name, world in (("two", 2), ("one", 1)):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == world and summary["precision"] == precision
    return ddp


@pytest.mark.slow
def test_two_cpu_ranks_train_the_single_process_run(seed_data, tmp_path):
    """fp32: two gloo ranks give the single process's metrics to 1e-4 relative; rank 0 alone
    writes; killed after a checkpoint and run again, the ranks resume to the uncut run exactly;
    the sharded reference cache equals the one-process cache."""
    one = run(seed_data, tmp_path, "one", 1)
    two = run(seed_data, tmp_path, "two", 2)
    ddp = same_run(tmp_path, "fp32")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["distributed_backend"] == "gloo"
    # Rank 0 saved the mid-run checkpoint; the final report is printed once.
    assert list((tmp_path / "two" / "checkpoint").iterdir())
    assert two.stdout.count('"status"') == 1 and one.stdout.count('"status"') == 1
    # Killed (SIGKILL of rank 0) right after its mid-run checkpoint, then run again on the same
    # directory: every rank resumes from the checkpoint and the run ends as the uncut one.
    run(seed_data, tmp_path, "cut", 2, crash_at="checkpoint", code=1)
    assert not (tmp_path / "cut" / "summary.json").exists()
    again = run(seed_data, tmp_path, "cut", 2)
    assert "resuming from the checkpoint at step 2" in again.stderr
    assert without_perf(read_metrics(tmp_path / "cut")) == without_perf(ddp)
    # The sharded, gathered reference cache equals the one computed in one process.
    import torch

    a = torch.load(next((tmp_path / "cache-one").rglob("*.pt")))
    b = torch.load(next((tmp_path / "cache-two").rglob("*.pt")))
    for split in a:
        torch.testing.assert_close(a[split], b[split], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_cpu_ranks_in_bf16(seed_data, tmp_path):
    """bf16 (forced, on any CPU): two ranks give the single process's metrics within bf16's
    rounding (tests/precision.py), and the sharded reference cache the one-process cache to
    relative 2**-8."""
    run(seed_data, tmp_path, "one", 1, precision="bf16")
    run(seed_data, tmp_path, "two", 2, precision="bf16")
    same_run(tmp_path, "bf16")
    import torch

    a = torch.load(next((tmp_path / "cache-one").rglob("*.pt")))
    b = torch.load(next((tmp_path / "cache-two").rglob("*.pt")))
    for split in a:
        torch.testing.assert_close(a[split], b[split], rtol=BF16_U, atol=0.0)


def test_global_batch_must_split_over_the_processes():
    distributed.check_batch(distributed.World(0, 2), 8)
    with pytest.raises(ValueError, match="train.batch_size 6 does not split over 4"):
        distributed.check_batch(distributed.World(0, 4), 6)


def test_each_rank_takes_its_slice_of_every_global_batch():
    order = list(range(10))
    ranks = [list(distributed.World(r, 2).shards(order, 4, drop_last=False)) for r in range(2)]
    assert ranks[0] == [([0, 1], 4), ([4, 5], 4), ([8], 2)]
    assert ranks[1] == [([2, 3], 4), ([6, 7], 4), ([9], 2)]
    # One process: whole batches, the last partial one kept unless drop_last.
    assert [len(i) for i, _ in distributed.World().shards(order, 4, False)] == [4, 4, 2]
    assert [len(i) for i, _ in distributed.World().shards(order, 4, True)] == [4, 4]
    # A last global batch smaller than the world is dropped (a rank would get no pair).
    assert list(distributed.World(2, 3).shards(list(range(5)), 3, False)) == [([2], 3)]
