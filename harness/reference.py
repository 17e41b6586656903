"""Reference log-probs: from the frozen reference model at every step, or computed once per
distinct (weights, tokens, masking, reduction, precision) and shared on disk by every run."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness import atomic, cache, distributed, packing
from harness import device as hdevice
from harness import models as hmodels
from harness.chaos import crash_point
from harness.data import TokenizedPair, batches
from harness.distributed import World
from harness.phases import phase
from harness.step import StepSettings, concatenated_logps, to_device


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: the identity of the reference model. Sharded (FSDP:
    DTensors), each is gathered whole first, on every rank in the same order."""
    key = cache.Key()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = distributed.full(tensor.detach())
        key.add(name, tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return key.hex(64)


@torch.no_grad()
def compute_logps(model, items: list[TokenizedPair], s: StepSettings, pad_id: int, device,
                  desc: str, progress: bool = True) -> torch.Tensor:
    """Reference log-probs of every pair of a split: [n, 2] (chosen, rejected), float32."""
    out = torch.zeros(len(items), 2)
    it = batches(items, list(range(len(items))), s.batch_size, pad_id, s.dpo.mask_prompt)
    with hmodels.eval_mode(model):
        for idx, batch in tqdm(it, total=math.ceil(len(items) / s.batch_size), desc=desc,
                               leave=False, disable=not progress):
            with hdevice.autocast(device, s.precision):
                chosen, rejected = concatenated_logps(model, to_device(batch, device), s.dpo.reduction,
                                                      s.share_prompt)
            out[idx, 0], out[idx, 1] = chosen.float().cpu(), rejected.float().cpu()
    return out


def cached_logps(model, splits: dict[str, list[TokenizedPair]], s: StepSettings, pad_id: int,
                 device, root: str | None = None, progress: bool = True, world: World = World(),
                 digest: str | None = None) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """Reference log-probs of all splits from the shared cache, computed under a lock by the first
    run that needs them (by every rank of a data-parallel run, each its share, gathered; rank 0
    writes). `digest`: the model's weights_digest when the caller has it. Returns (log-probs per
    split, cache file, was it reused)."""
    # The precision `auto` resolves to on this device: the same config on another machine may
    # compute in another precision, and must not read these log-probs.
    precision = hdevice.resolve_precision(torch.device(device), s.precision)
    # Shared-prompt and two-row log-probs differ in rounding: a run reads the layout it computes.
    shared = s.share_prompt and packing.supported(model)
    key = cache.Key(digest or weights_digest(model), [s.dpo.mask_prompt, s.dpo.reduction, precision, shared])
    for name in sorted(splits):
        key.add(name, [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in splits[name]])
    path = cache.entry("reference", key.hex(32), ".pt", root=root)
    def read(p: Path) -> dict[str, torch.Tensor]:
        logps = torch.load(p)
        if set(logps) != set(splits) or any(len(logps[n]) != len(splits[n]) for n in splits):
            raise ValueError("splits or pair counts differ from the key's")
        return logps

    def compute() -> dict[str, torch.Tensor]:
        out = {}
        for name, items in splits.items():
            idx = list(world.slice(range(len(items))))
            mine = compute_logps(model, [items[i] for i in idx], s, pad_id, device,
                                 f"reference {name}", progress and world.main)
            out[name] = world.gather_rows(len(items), idx, mine)
        return out

    def rebuild() -> dict[str, torch.Tensor]:
        logps = compute()
        crash_point("reference")
        if world.main:
            atomic.atomic_file(path, lambda tmp: torch.save(logps, tmp))
        return logps

    with phase("reference"):
        return _shared(path, read, rebuild, world)


def _shared(path: Path, read, rebuild, world: World) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """The cache entry at `path`: read, or rebuilt under its lock (see cached_logps)."""
    lock = path.with_suffix(".lock")
    if not world.active:
        with atomic.file_lock(lock):
            logps, reused = cache.read_or_rebuild(path, read, rebuild)
        return logps, path, reused
    # Every rank must take part in computing: rank 0 decides, under the lock, whether to.
    found = _try_read(path, read, lock) if world.main else None
    reused = world.broadcast(found is not None)
    if reused:
        logps = found if world.main else read(path)
    else:
        with atomic.file_lock(lock) if world.main else contextlib.nullcontext():
            logps = rebuild()
    world.barrier()
    return logps, path, reused


def _try_read(path: Path, read, lock: Path) -> dict[str, torch.Tensor] | None:
    """The entry as `read` gives it, under its lock; None when missing or unreadable."""
    with atomic.file_lock(lock):
        try:
            return read(path)
        except Exception:  # noqa: BLE001 - missing or unreadable: computed again
            return None
