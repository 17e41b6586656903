"""Data-parallel runs under torchrun: two CPU processes (gloo) train the same run as one process
with the same global batch, within float tolerance, with DDP and with FSDP2, and only rank 0
writes the run's files; every collective's tensor goes to a backend that takes its device."""

import json
import os
import subprocess
import sys

import pytest
import torch

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
        code: int = 0, precision: str = "fp32", settings: dict | None = None
        ) -> subprocess.CompletedProcess:
    sets = {**SETTINGS, **(settings or {}), "data.source": str(seed_data), "train.precision": precision,
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


# FSDP2 with a live reference (sharded too, scored through its own root), the gradient clipped at
# every step (its norm ~0.1: clipping scales by the norm over all shards), and the final weights
# gathered and saved; the rest as SETTINGS.
FSDP = {"train.distributed": "fsdp", "dpo.reference": "model", "train.max_grad_norm": 0.05,
        "train.save_model": True}


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_trains_the_single_process_run(seed_data, tmp_path):
    """fp32, FSDP2 on two gloo ranks (weights, gradients, AdamW state and the live reference
    sharded; the gradient clipped): the single process's metrics to 1e-4 relative, validation
    and test passes included (every rank runs them, rank 0 alone writes); the mid-run checkpoint is sharded (one
    DCP file per rank, no whole weights); SIGKILLed right after it and run again, the ranks load
    their shards and the run ends exactly as the uncut one, down to the saved weights, which are
    the whole model (the single process's tensors, to float tolerance); a run cut in one process
    resumes from its checkpoint on two ranks."""
    run(seed_data, tmp_path, "one", 1, settings=FSDP)
    run(seed_data, tmp_path, "two", 2, settings=FSDP)
    fsdp = same_run(tmp_path, "fp32")
    assert any("test/loss" in r for r in fsdp) and any("eval/loss" in r for r in fsdp)
    (ckpt,) = (tmp_path / "two" / "checkpoint").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["sharded", "state.json", "training.pt"]
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2
    # SIGKILL of rank 0 right after the sharded checkpoint (all ranks had written their shards).
    run(seed_data, tmp_path, "cut", 2, crash_at="checkpoint", code=1, settings=FSDP)
    assert not (tmp_path / "cut" / "summary.json").exists()
    again = run(seed_data, tmp_path, "cut", 2, settings=FSDP)
    assert "resuming from the checkpoint at step 2" in again.stderr
    assert without_perf(read_metrics(tmp_path / "cut")) == without_perf(fsdp)
    from safetensors.torch import load_file

    one, two, cut = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("one", "two", "cut"))
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
    for k in one:  # gathered whole: the single process's weights (they differ by ~2e-7)
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(two[k], cut[k]) for k in two)
    # Cut in one process (its checkpoint one DCP file), resumed on two ranks: DCP reshards it,
    # and the run ends as the two-rank run, to float tolerance.
    run(seed_data, tmp_path, "moved", 1, crash_at="checkpoint", code=1, settings=FSDP)
    moved = run(seed_data, tmp_path, "moved", 2, settings=FSDP)
    assert "resuming from the checkpoint at step 2" in moved.stderr
    for a, b in zip(fsdp, read_metrics(tmp_path / "moved"), strict=True):
        keys = [k for k, v in a.items() if not k.startswith("perf/") and isinstance(v, float)]
        assert_close(a, b, keys, "fp32", beta=0.1, pairs=8)


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_in_bf16(seed_data, tmp_path):
    """bf16 (forced, on any CPU): FSDP2 on two ranks gives the single process's metrics within
    bf16's rounding (tests/precision.py)."""
    run(seed_data, tmp_path, "one", 1, precision="bf16", settings=FSDP)
    run(seed_data, tmp_path, "two", 2, precision="bf16", settings=FSDP)
    same_run(tmp_path, "bf16")


def test_fsdp_refuses_generation_and_only_fsdp():
    """Under FSDP no rank holds the whole model to generate with (and LoRA is not sharded): such a
    run is refused
    before it starts, naming the fields to turn off; DDP and a single process are not affected;
    an unknown strategy names the valid ones."""
    gen = {"gen_eval.enabled": True, "train.sample_validation": False, "train.sample_test": True,
           "model.lora.r": True}
    with pytest.raises(ValueError, match="fsdp does not generate or shard LoRA adapters; turn off "
                                         "gen_eval.enabled, train.sample_test, model.lora.r"):
        distributed.check_strategy(distributed.World(0, 2, strategy="fsdp"), gen)
    distributed.check_strategy(distributed.World(0, 2, strategy="fsdp"), dict.fromkeys(gen, False))
    distributed.check_strategy(distributed.World(0, 2), gen)
    distributed.check_strategy(distributed.World(strategy="fsdp"), gen)
    with pytest.raises(ValueError, match="train.distributed: unknown strategy 'zero'; valid: ddp, fsdp"):
        distributed.World(0, 2, strategy="zero")


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


# -- collectives on the backend's device (CPU test: no NCCL needed) ---------------------------

# Which device's tensors each backend takes (as issue 33 states it: nccl CUDA only).
TAKES = {"nccl": "cuda", "gloo": "cpu"}


def _backend_of(group_backend: str, device_type: str) -> str | None:
    """The backend a group built with `group_backend` ("nccl", "gloo" or "cpu:gloo,cuda:nccl")
    sends a tensor on `device_type` over: what torch.distributed dispatches to."""
    if ":" not in group_backend:
        return group_backend if TAKES.get(group_backend) == device_type else None
    pairs = dict(part.split(":") for part in group_backend.split(","))
    return pairs.get(device_type)


class DeviceCheckingCollectives:
    """torch.distributed on a fake 2-rank group: every tensor collective asserts that the group's
    backend takes its tensor's device and leaves it as it is (an identity, so no NCCL is needed);
    object collectives and barrier pass through."""

    def __init__(self, monkeypatch):
        self.backend = None
        self.checked: list[tuple[str, str, str]] = []
        d = torch.distributed
        for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                     "reduce_scatter_tensor"):
            monkeypatch.setattr(d, name, self._tensor_collective(name))
        monkeypatch.setattr(d, "all_gather_object", self._all_gather_object)
        monkeypatch.setattr(d, "broadcast_object_list", lambda objs, src=0, **kw: None)
        monkeypatch.setattr(d, "barrier", lambda *a, **kw: None)
        monkeypatch.setattr(d, "is_initialized", lambda: self.backend is not None)
        monkeypatch.setattr(d, "init_process_group", self._init)
        monkeypatch.setattr(d, "get_rank", lambda *a: 0)
        monkeypatch.setattr(d, "get_world_size", lambda *a: 2)
        monkeypatch.setattr(d, "get_backend", lambda *a: self.backend)

    def _init(self, backend=None, **kw):
        self.backend = backend

    def check(self, name: str, tensor: torch.Tensor) -> None:
        took = _backend_of(self.backend, tensor.device.type)
        assert took is not None and TAKES[took] == tensor.device.type, (
            f"{name}: a {tensor.device.type} tensor on a {self.backend!r} group, which has no "
            f"backend for {tensor.device.type} tensors")
        self.checked.append((name, tensor.device.type, took))

    def _tensor_collective(self, name):
        def collective(*args, **kw):
            for a in args:
                for t in a if isinstance(a, list) else [a]:
                    if isinstance(t, torch.Tensor):
                        self.check(name, t)
        return collective

    def _all_gather_object(self, out, obj, **kw):
        out[:] = [obj] * len(out)


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_every_collective_of_the_world_goes_to_a_backend_that_takes_its_device(
        monkeypatch, device_type):
    """The World that setup() builds under torchrun on a CUDA machine (and on a CPU one) runs
    sum, gather_rows, broadcast and barrier on a group whose backend takes each tensor's device:
    nccl takes CUDA tensors only, so a host tensor on a plain `nccl` group (data parallel's first
    step on GPUs) fails here. The collectives are patched to check devices only."""
    fake = DeviceCheckingCollectives(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr("harness.device.pick_device", lambda spec: torch.device(device_type))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    world, device = distributed.setup(device_type)
    assert (world.size, device.type) == (2, device_type)
    assert world.sum([1.5, 2]) == [1.5, 2.0]
    rows = torch.tensor([[1.0, 2.0]])
    assert world.gather_rows(1, [0], rows).tolist() == [[1.0, 2.0]]
    assert world.broadcast("x") == "x"
    world.barrier()
    assert fake.checked  # sum's all_reduce was seen


def test_a_world_on_a_group_without_a_cpu_backend_is_refused():
    """A plain `nccl` group cannot carry the host values the World's collectives move: such a
    World is an error when built (not a crash at the first step), naming the backend to use."""
    with pytest.raises(ValueError, match="'nccl' takes no CPU tensors.*'cpu:gloo,cuda:nccl'"):
        distributed.World(0, 2, backend="nccl")
    for backend in ("gloo", "cpu:gloo,cuda:nccl"):
        assert distributed.World(0, 2, backend=backend).active
    assert not distributed.World(backend="nccl").active  # one process: no collectives
