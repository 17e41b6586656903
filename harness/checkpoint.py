"""Run checkpoints: what the training loop needs to continue a cut-off run as if it never stopped.

A checkpoint is one directory <run dir>/checkpoint/step-<step, 8 digits>/, written whole by
harness.atomic.atomic_dir (a reader sees all of it or none); after each save only the newest is
kept. It holds:

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

Resuming (`resume_point`) re-uses a checkpoint only when it was saved under the same config (the
resolved config dicts compared apart from tracking.progress and tracking.tags), in the same
precision (`auto` may resolve otherwise on another machine: a run never mixes two), and
metrics.jsonl still holds the rows it counted; anything else starts the run over.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import atomic, tracking

FORMAT = 1
STATE, WEIGHTS, TRAINING = "state.json", "weights.pt", "training.pt"
PREFIX = "step-"
IGNORED = (("tracking", "progress"), ("tracking", "tags"))  # config fields a resume may change


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the step-<step> directory
    state: dict[str, Any]  # its state.json

    @property
    def step(self) -> int:
        return self.state["progress"]["step"]


# ----------------------------------------------------------------------------- save


def save(run_dir: Path, config: dict, precision: str, progress: dict, tracker: tracking.Tracker,
         policy, optimizer: torch.optim.Optimizer, scheduler) -> Path:
    """Write a checkpoint of the loop at `progress["step"]`, then remove every older one."""
    root = Path(run_dir) / tracking.CHECKPOINT
    state = {"format": FORMAT, "config": config, "precision": precision, "progress": progress,
             "metrics_lines": tracker.metrics_lines(), "tracker_last": tracker.last}

    def write(d: Path) -> None:
        (d / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        torch.save(policy.state_dict(), d / WEIGHTS)
        torch.save(_training_state(optimizer, scheduler), d / TRAINING)

    target = atomic.atomic_dir(root / f"{PREFIX}{progress['step']:08d}", write)
    for other in root.iterdir():
        if other != target:
            shutil.rmtree(other, ignore_errors=True)
    return target


def _training_state(optimizer, scheduler) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "python_rng": random.getstate()}


def remove(run_dir: Path) -> None:
    """Delete run_dir's checkpoints (a finished run needs none)."""
    shutil.rmtree(Path(run_dir) / tracking.CHECKPOINT, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of run_dir, or None (also when its state is unreadable)."""
    root = Path(run_dir) / tracking.CHECKPOINT
    found = sorted(root.glob(f"{PREFIX}*/{STATE}")) if root.is_dir() else []
    if not found:
        return None
    try:  # step numbers are zero-padded: name order is step order
        return Checkpoint(found[-1].parent, json.loads(found[-1].read_text(encoding="utf-8")))
    except (OSError, ValueError):  # unreadable: as good as none
        return None


def restore(ckpt: Checkpoint, policy, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Load the checkpoint's weights, optimizer and scheduler state and RNG states over freshly
    built ones (the same config builds the same shapes)."""
    policy.load_state_dict(torch.load(ckpt.path / WEIGHTS, map_location="cpu", weights_only=True))
    saved = torch.load(ckpt.path / TRAINING, map_location="cpu", weights_only=True)
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


def resume_point(run_dir: Path, config: dict, precision: str) -> Checkpoint | None:
    """The checkpoint to resume run_dir from, with metrics.jsonl cut back to its rows; or None,
    after clearing what an earlier attempt left (metrics, summary, checkpoints). Prints one line
    saying which when run_dir held an earlier attempt."""
    earlier = tracking.earlier_attempt(run_dir)
    ckpt, why = _usable(run_dir, config, precision)
    if ckpt is not None:
        p = ckpt.state["progress"]
        print(f"{run_dir}: resuming from the checkpoint at step {p['step']} ({p['seen']} pairs seen)",
              file=sys.stderr)
        return ckpt
    tracking.start_over(run_dir)
    if earlier:
        print(f"{run_dir}: starting over ({why})", file=sys.stderr)
    return None


def _usable(run_dir: Path, config: dict, precision: str) -> tuple[Checkpoint | None, str]:
    """(the checkpoint, "") when run_dir can resume from it, else (None, the reason)."""
    ckpt = latest(run_dir)
    if ckpt is None:
        return None, "no checkpoint"
    if ckpt.state.get("format") != FORMAT:
        return None, f"checkpoint format {ckpt.state.get('format')}, not {FORMAT}"
    if not same_config(ckpt.state["config"], config):
        return None, "the checkpoint was saved under another config"
    if ckpt.state.get("precision") != precision:
        return None, (f"the checkpoint was computed in {ckpt.state.get('precision')}, this run "
                      f"computes in {precision}")
    if not tracking.resume_files(run_dir, ckpt.state["metrics_lines"]):
        return None, f"{tracking.METRICS} holds fewer rows than the checkpoint counted"
    return ckpt, ""
