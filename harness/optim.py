"""The optimizer and the learning-rate schedule, shared by the DPO loop and the SFT stage."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def adamw_fused(device) -> bool:
    return torch.device(device).type in ("cuda", "cpu")


def adamw(model: torch.nn.Module, device, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel (cuda, cpu): on 2 CPU cores its step over 135M
    parameters takes 0.08 s against 0.25 s for torch's default per-tensor loop (notes/perf.md)."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoRA run's adapters alone
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=adamw_fused(device))


def lr_factor(schedule: str, warmup: int, total: int,
              decay_in_warmup: bool = False) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based), for LambdaLR.

    Linear warmup over `warmup` steps ((step + 1) / warmup), then `constant`, `linear` (to 0 at
    `total`) or `cosine` (to 0 at `total`). By default the decay starts after the warmup and
    spans the remaining steps (the DPO loop); with `decay_in_warmup` the decay spans all `total`
    steps and the warmup factor multiplies it (the SFT stage).
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; valid: constant, linear, cosine")

    def shape(progress: float) -> float:
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def f(step: int) -> float:
        if decay_in_warmup:
            return min(1.0, (step + 1) / max(1, warmup)) * shape(step / max(1, total))
        if warmup and step < warmup:
            return (step + 1) / warmup
        return shape((step - warmup) / max(1, total - warmup))

    return f


def scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int,
              decay_in_warmup: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(schedule, warmup, total, decay_in_warmup))
