"""Data-parallel training of one run under torchrun (`torchrun --nproc-per-node K -m harness
train EXP.yaml`): one process per device, DistributedDataParallel, `nccl` on CUDA, `gloo` on CPU.

- Every rank draws the same global batch (same seed) and trains its own contiguous slice of it;
  a slice's loss is weighted by its share of the global batch, so DDP's gradient average is the
  gradient of the global batch's mean loss, as in one process.
- Train metrics (pair sums, token counts, the loss's finiteness) are summed across ranks before
  they are logged or acted on; every rank takes the same decision.
- Rank 0 alone writes run files, wandb, checkpoints and caches, and runs validation, generation
  and test passes (the others wait); every rank resumes from the same checkpoint.
- Reference log-probs are computed sharded and gathered.

`World()` (one process) makes every helper a no-op, so the loop has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    # -- collectives (no-ops in one process) ---------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of `values` over ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_rows(self, n: int, idx: list[int], rows: torch.Tensor) -> torch.Tensor:
        """The full [n, ...] tensor from every rank's rows `rows` at indices `idx`."""
        if not self.active:
            return rows
        parts: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(parts, (idx, rows.cpu()))
        out = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype)
        for part_idx, part in parts:
            out[part_idx] = part
        return out

    # -- sharding ------------------------------------------------------------------------------
    def slice(self, seq: Sequence) -> Sequence:
        """This rank's contiguous share of `seq` (shares differ by at most one item)."""
        if not self.active:
            return seq
        n = len(seq)
        return seq[self.rank * n // self.size : (self.rank + 1) * n // self.size]

    def shards(self, order: list[int], batch_size: int, drop_last: bool
               ) -> Iterator[tuple[list[int], int]]:
        """(this rank's slice, global batch size) of each global batch of `order`. A last global
        batch smaller than the world is dropped: some ranks would get no pair."""
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < self.size:
                return
            yield list(self.slice(chunk)), len(chunk)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return _env_int("WORLD_SIZE", 1) > 1


def setup(device_spec: str) -> tuple[World, torch.device]:
    """This process's world and device. Under torchrun: joins (or reuses) the process group
    with the device's backend and takes device `cuda:<LOCAL_RANK>` on CUDA; else World()."""
    from harness.device import pick_device

    device = pick_device(device_spec)
    if not launched():
        return World(), device
    if device.type not in BACKENDS:
        raise ValueError(f"train.device: data-parallel runs need CUDA or CPU devices, not {device}")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = BACKENDS[device.type]
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend()), device


def check_batch(world: World, batch_size: int) -> None:
    if batch_size % world.size:
        raise ValueError(f"train.batch_size {batch_size} does not split over {world.size} "
                         f"processes: pick a multiple of {world.size}")


class Logps(torch.nn.Module):
    """A causal LM whose forward returns a batch's sequence log-probs (harness.packing.pair_logps): what DDP
    wraps, so that the log-prob path (which may skip the LM's own forward) still passes
    through DDP's forward and its gradients are averaged."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], reduction: str, share_prompt: bool
                ) -> torch.Tensor:
        from harness.packing import pair_logps

        return pair_logps(self.model, batch, reduction, share_prompt)


def wrap(world: World, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module the training step runs: DistributedDataParallel around the log-probs of
    `model` under torchrun, `model` itself otherwise (harness.step accepts both)."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(Logps(model), device_ids=ids)


def no_sync(module: torch.nn.Module, last: bool):
    """DDP's no_sync() for every micro-batch of an optimizer step but the last (gradients are
    averaged once per step); a null context otherwise."""
    import contextlib

    if last or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
