"""Data-parallel training of one run under torchrun (`torchrun --nproc-per-node K -m harness
train EXP.yaml`): one process per device, `gloo` on CPU, `cpu:gloo,cuda:nccl` on CUDA, and one
of two strategies (`train.distributed`):

- `ddp`: DistributedDataParallel; every rank holds the whole model and optimizer state.
- `fsdp`: FSDP2 (torch.distributed.fsdp.fully_shard) on each transformer block, then on the
  log-prob wrapper `Logps` as the root (the packed log-prob path calls the LM's base model, not
  its forward, so the root must be a module whose forward every pass goes through): parameters,
  gradients and AdamW state are sharded over the ranks (DTensors), a live reference model too.
  Every rank then runs every forward pass: validation and test passes, and the gathering of the
  weights that rank 0 saves. Checkpoints are sharded (harness.checkpoint). Generation (gen_eval,
  samples) needs the whole model on one rank: refused under FSDP (`check_strategy`).

Either way:
- Every rank draws the same global batch (same seed) and trains its own contiguous slice of it;
  a slice's loss is weighted by its share of the global batch, so the gradient average over
  ranks (DDP's all-reduce, FSDP's reduce-scatter) is the gradient of the global batch's mean
  loss, as in one process.
- Train metrics (pair sums, token counts, the loss's finiteness) are summed across ranks before
  they are logged or acted on; every rank takes the same decision.
- Rank 0 alone writes run files, wandb, checkpoints (under FSDP each rank writes its shards) and
  caches; under DDP it alone runs validation, generation and test passes (the others wait);
  every rank resumes from the same checkpoint.
- Reference log-probs are computed sharded and gathered.

Collectives and devices: the World's own collectives move host values (Python floats summed
across ranks, reference log-prob rows gathered on the CPU, pickled objects), and nccl takes
CUDA tensors only. On CUDA the process group is therefore `cpu:gloo,cuda:nccl`: a CPU tensor
goes over gloo, a CUDA tensor (DDP's buckets, FSDP's all-gathers and reduce-scatters) over
nccl. Moving each host value to the GPU instead would cost a copy and a device sync per
collective for values the loop already holds on the host, and object collectives and
torch.distributed.checkpoint's planning would pickle through GPU memory; with a CPU backend in
the group all of them stay on the host. A World on a group without a CPU backend (plain `nccl`)
is refused when built.

`World()` (one process) makes every helper a no-op, so the loop has one code path.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The process group's backend per device type: on CUDA, gloo for host tensors beside nccl.
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}
STRATEGIES = ("ddp", "fsdp")  # train.distributed


def host_backend(backend: str) -> str | None:
    """The backend a group built with `backend` ("gloo", "nccl", "cpu:gloo,cuda:nccl") sends CPU
    tensors over; None when it has none (nccl alone takes CUDA tensors only)."""
    if ":" in backend:
        return dict(part.split(":", 1) for part in backend.split(",")).get("cpu")
    return None if backend == "nccl" else backend


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # the process group's, as torch.distributed.get_backend() names it
    strategy: str = "ddp"  # train.distributed: ddp | fsdp

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.distributed: unknown strategy {self.strategy!r}; valid: "
                             f"{', '.join(STRATEGIES)}")
        if self.active and self.backend is not None and host_backend(self.backend) is None:
            raise ValueError(f"process group backend {self.backend!r} takes no CPU tensors, and "
                             "the World's collectives move host values: join the group with "
                             "backend 'cpu:gloo,cuda:nccl'")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def fsdp(self) -> bool:
        """Whether the model is sharded over several ranks (every rank runs every forward)."""
        return self.active and self.strategy == "fsdp"

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
        """Element-wise sums of `values` over ranks (float64, a CPU tensor: the group's CPU
        backend carries it)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_rows(self, n: int, idx: list[int], rows: torch.Tensor) -> torch.Tensor:
        """The full [n, ...] tensor (on the CPU) from every rank's rows `rows` at indices `idx`."""
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


def setup(device_spec: str, strategy: str = "ddp") -> tuple[World, torch.device]:
    """This process's world and device. Under torchrun: joins (or reuses) the process group
    with the device's backends (BACKENDS) and takes device `cuda:<LOCAL_RANK>` on CUDA; else
    World(). `strategy`: train.distributed."""
    from harness.device import pick_device

    device = pick_device(device_spec)
    if not launched():
        return World(strategy=strategy), device
    if device.type not in BACKENDS:
        raise ValueError(f"train.device: data-parallel runs need CUDA or CPU devices, not {device}")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group(backend=BACKENDS[device.type])
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), strategy)
    return world, device


def check_batch(world: World, batch_size: int) -> None:
    if batch_size % world.size:
        raise ValueError(f"train.batch_size {batch_size} does not split over {world.size} "
                         f"processes: pick a multiple of {world.size}")


def check_strategy(world: World, unsupported: dict[str, bool]) -> None:
    """Under FSDP no rank holds the whole model, and neither generation (token by token, through
    the LM's own forward) nor a LoRA policy (its reference is the base with the adapter off) is
    sharded here: `unsupported` (config field -> whether the run uses it) must all be off."""
    on = [name for name, enabled in unsupported.items() if enabled]
    if world.fsdp and on:
        raise ValueError(f"train.distributed: fsdp does not generate or shard LoRA adapters; turn "
                         f"off {', '.join(on)} or train with ddp")


class Logps(torch.nn.Module):
    """A causal LM whose forward returns a batch's sequence log-probs (harness.packing.pair_logps):
    what DDP wraps and FSDP makes its root, so that the log-prob path (which may skip the LM's own
    forward) still passes through their forward and its hooks (DDP's gradient averaging, FSDP's
    gathering of the root's embeddings and head)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], reduction: str, share_prompt: bool
                ) -> torch.Tensor:
        from harness.packing import pair_logps

        return pair_logps(self.model, batch, reduction, share_prompt)


def wrap(world: World, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module the training step runs: under torchrun the log-probs of `model` in
    DistributedDataParallel, or sharded by FSDP (`shard`; `model`'s parameters become DTensors);
    `model` itself otherwise (harness.step accepts all three)."""
    if not world.active:
        return model
    if world.fsdp:
        return shard(world, model, device)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(Logps(model), device_ids=ids)


def wrap_reference(world: World, reference: torch.nn.Module | None, device: torch.device
                   ) -> torch.nn.Module | None:
    """The frozen reference the DPO step scores with: sharded like the policy under FSDP (its
    root runs the log-probs), as it is otherwise (it takes no gradient to average)."""
    return shard(world, reference, device) if world.fsdp and reference is not None else reference


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the modules whose class the model names in `_no_split_modules`
    (GPT2Block, LlamaDecoderLayer, ...), outermost only. None named: the root alone shards the
    whole model (correct, but gathered whole for every forward)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[torch.nn.Module] = []
    for module in model.modules():
        if type(module).__name__ in names and not any(module in b.modules() for b in found):
            found.append(module)
    return found


def shard(world: World, model: torch.nn.Module, device: torch.device) -> Logps:
    """FSDP2 over `model`, on a mesh of all ranks' `device`s: each transformer block one group
    (gathered for its forward and backward only), then the Logps root holding the rest
    (embeddings, final norm, head). Keeps a skeleton of `model` (parameters on the meta device:
    no memory) for `gathered`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    skeleton = _copy_parameters_to(model, torch.device("meta"))
    root = Logps(model)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    root.__dict__["skeleton"] = skeleton  # not a submodule: FSDP and state_dict must not see it
    return root


def _copy_parameters_to(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of `model` whose parameters are new empty tensors on `device` (tied parameters stay
    tied); buffers and everything else copied as they are."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gathered(world: World, root: torch.nn.Module) -> torch.nn.Module | None:
    """Under FSDP (every rank calls it): the sharded policy's full weights gathered into a plain
    copy of it on rank 0's CPU (None on the other ranks), which the rank-0 code after training
    (saving, export) takes as the policy. Without FSDP: `root` is not sharded; None."""
    if not world.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = root.model
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if not world.main:
        return None
    plain = _copy_parameters_to(root.__dict__["skeleton"], torch.device("cpu"))
    plain.load_state_dict(full)
    return plain.train(model.training)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value as a plain tensor (a collective unless replicated); any other
    tensor as it is."""
    if not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def no_sync(module: torch.nn.Module, last: bool):
    """For every micro-batch of an optimizer step but the last: DDP's no_sync(), FSDP's
    set_requires_gradient_sync(False) (gradients accumulate unreduced; reduced once per step);
    a null context otherwise."""
    if last:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_unsynced(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_unsynced(module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
