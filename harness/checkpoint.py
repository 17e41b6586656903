"""Run checkpoints: what the training loop needs to continue a cut-off run as if it never stopped.

A run keeps its checkpoints in one folder (harness.rundir.checkpoint_dir: <run dir>/checkpoint/),
which every function here takes as `root`. A checkpoint is one directory step-<step, 8 digits>/ in
it, written whole by harness.atomic.atomic_dir (a reader sees all of it or none); after each save
only the newest is kept. It holds:

- `state.json`: {"format": 1,
                 "config": the resolved config it was saved under (RunConfig.to_dict()),
                 "precision": what the run computed in (fp32 or bf16: train.precision resolved),
                 "progress": the loop's Progress as a dict (step, seen, tokens, micro_batches drawn
                             from the train stream (the data position), last_train, last_eval,
                             window: per-pair metric sums since the last train log, window_pairs),
                 "metrics_lines": rows metrics.jsonl had (synced to disk before the save),
                 "tracker_last": the latest value of every logged metric}
  (key order kept as logged: a resumed run writes its rows with the same key order);
- `weights.pt`: the policy's state_dict (torch.save);
- `training.pt`: {"optimizer": AdamW state_dict, "scheduler": LambdaLR state_dict,
                  "torch_rng": torch.get_rng_state() (ByteTensor), "cuda_rng": a ByteTensor per
                  cuda device or None, "python_rng": random.getstate()}.

With train.distributed: fsdp the directory holds `sharded/` in place of `weights.pt`: a
torch.distributed.checkpoint (DCP) of {"model": the policy's state dict, "optimizer": AdamW's},
keyed by parameter name as torch.distributed.checkpoint.state_dict.get_state_dict gives them,
one file per rank plus `.metadata`; `training.pt`'s "optimizer" is None. Under torchrun no rank
holds the whole weights: each writes its own shards into the directory rank 0 makes, and rank 0
writes the rest (its RNG states, restored on every rank as under DDP) and renames the directory
into place once every rank's shards are written. One process writes the same layout (one file)
and DCP reshards on load, so the checkpoint loads on any number of ranks.

A checkpoint is `usable` for a run only when it was saved under the same config (the resolved
config dicts compared apart from tracking.progress and tracking.tags) and in the same precision
(`auto` may resolve otherwise on another machine: a run never mixes two). Whether a run resumes
from it or starts over is harness.rundir.open_run_dir's decision (it also checks that
metrics.jsonl still holds the rows the checkpoint counted).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from harness import atomic
from harness.distributed import World

FORMAT = 1
STATE, WEIGHTS, TRAINING, SHARDED = "state.json", "weights.pt", "training.pt", "sharded"
PREFIX = "step-"
IGNORED = (("tracking", "progress"), ("tracking", "tags"))  # config fields a resume may change


class TrackerState(Protocol):
    """What a checkpoint records of the run's tracker (harness.tracking.Tracker)."""

    last: dict[str, float]  # the latest value of every logged metric

    def metrics_lines(self) -> int: ...  # rows in metrics.jsonl, synced to disk


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the step-<step> directory
    state: dict[str, Any]  # its state.json

    @property
    def step(self) -> int:
        return self.state["progress"]["step"]


# ----------------------------------------------------------------------------- save


def save(root: Path, config: dict, precision: str, progress: dict, tracker: TrackerState, policy,
         optimizer: torch.optim.Optimizer, scheduler, world: World = World()) -> Path | None:
    """Write a checkpoint of the loop at `progress["step"]` into `root`, then remove every older
    one; returns its directory. A run of strategy fsdp (`world.strategy`, in any number of
    processes: the same config always writes the same layout) writes `sharded/`; under torchrun
    every rank calls it, each writing its shards into the directory rank 0 makes, and the others
    return None."""
    root = Path(root)
    sharded = world.strategy == "fsdp"
    if world.fsdp and not world.main:
        _save_shards(Path(world.broadcast(None)), policy, optimizer)
        return None
    state = {"format": FORMAT, "config": config, "precision": precision, "progress": progress,
             "metrics_lines": tracker.metrics_lines(), "tracker_last": tracker.last}

    def write(d: Path) -> None:
        if sharded:
            _save_shards(Path(world.broadcast(str(d))), policy, optimizer)
        else:
            torch.save(policy.state_dict(), d / WEIGHTS)
        (d / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        torch.save(_training_state(None if sharded else optimizer, scheduler), d / TRAINING)

    target = atomic.atomic_dir(root / f"{PREFIX}{progress['step']:08d}", write)
    for other in root.iterdir():
        if other != target:
            shutil.rmtree(other, ignore_errors=True)
    return target


def _training_state(optimizer, scheduler) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": cuda, "python_rng": random.getstate()}


def _state_dicts(policy, optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} state dicts keyed by parameter name, each rank's shards (DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(policy, optimizer)
    return {"model": model, "optimizer": optim}


@contextlib.contextmanager
def _dcp() -> Iterator[Any]:
    """torch.distributed.checkpoint, without its warning that one process (no process group)
    saves or loads alone: that is what a one-process FSDP-config run means."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield dcp


def _save_shards(d: Path, policy, optimizer) -> None:
    with _dcp() as dcp:
        dcp.save(_state_dicts(policy, optimizer), checkpoint_id=d / SHARDED)


def _load_shards(d: Path, policy, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state_dicts(policy, optimizer)
    with _dcp() as dcp:
        dcp.load(state, checkpoint_id=d)
    set_state_dict(policy, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def remove(root: Path) -> None:
    """Delete the checkpoints in `root` (a finished run needs none)."""
    shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def latest(root: Path) -> Checkpoint | None:
    """The newest complete checkpoint in `root`, or None (also when its state is unreadable)."""
    root = Path(root)
    found = sorted(root.glob(f"{PREFIX}*/{STATE}")) if root.is_dir() else []
    if not found:
        return None
    try:  # step numbers are zero-padded: name order is step order
        return Checkpoint(found[-1].parent, json.loads(found[-1].read_text(encoding="utf-8")))
    except (OSError, ValueError):  # unreadable: as good as none
        return None


def restore(ckpt: Checkpoint, policy, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Load the checkpoint's weights, optimizer and scheduler state and RNG states over freshly
    built ones (the same config builds the same shapes, and the same layout: train.distributed
    fsdp, sharded). A sharded checkpoint (every rank calls it) loads each rank's shards."""
    if (ckpt.path / SHARDED).is_dir():
        _load_shards(ckpt.path / SHARDED, policy, optimizer)
    else:
        policy.load_state_dict(torch.load(ckpt.path / WEIGHTS, map_location="cpu", weights_only=True))
    saved = torch.load(ckpt.path / TRAINING, map_location="cpu", weights_only=True)
    if saved["optimizer"] is not None:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    random.setstate(_as_tuples(saved["python_rng"]))


def _as_tuples(x):
    """random.getstate() as it was (a loaded state may hold lists where tuples were)."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def same_config(saved: dict, config: dict) -> bool:
    """Whether two resolved config dicts describe the same run (IGNORED fields aside)."""

    def comparable(c: dict) -> dict:
        c = json.loads(json.dumps(c))  # a deep copy, tuples as lists (as in state.json)
        for section, name in IGNORED:
            c.get(section, {}).pop(name, None)
        return c

    return comparable(saved) == comparable(config)


# ----------------------------------------------------------------------------- resume


def usable(root: Path, config: dict, precision: str) -> tuple[Checkpoint | None, str]:
    """(the newest checkpoint in `root`, "") when a run of `config` computing in `precision` can
    continue from it, else (None, the reason)."""
    ckpt = latest(root)
    if ckpt is None:
        return None, "no checkpoint"
    if ckpt.state.get("format") != FORMAT:
        return None, f"checkpoint format {ckpt.state.get('format')}, not {FORMAT}"
    if not same_config(ckpt.state["config"], config):
        return None, "the checkpoint was saved under another config"
    if ckpt.state.get("precision") != precision:
        return None, (f"the checkpoint was computed in {ckpt.state.get('precision')}, this run "
                      f"computes in {precision}")
    return ckpt, ""
