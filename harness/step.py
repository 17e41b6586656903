"""One DPO micro-batch, evaluation passes and preference accuracy.

Takes the DPO settings and a precision (`StepSettings`), never a whole run config, so that the
training loop, the sweep and `harness bench` share exactly the same step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from harness import models as hmodels
from harness.data import TokenizedPair, batches
from harness.dpo import (
    LOSSES,
    check_loss_settings,
    dpo_loss,
    pair_metrics,
    per_token_nll,
)
from harness.packing import pair_logps

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepSettings:
    beta: float = 0.1  # the paper's β
    loss: str = "sigmoid"  # a name in harness.dpo.LOSSES
    label_smoothing: float = 0.0
    mask_prompt: bool = True  # prompt tokens do not count in a sequence log-prob
    reduction: str = "mean"  # sum | mean over the counted tokens
    precision: str = "auto"  # auto | fp32 | bf16 (harness.models.autocast)
    batch_size: int = 8  # pairs per micro-batch in evaluation passes
    simpo_gamma: float = 0.5  # SimPO's target margin γ (loss `simpo`)
    dpop_lambda: float = 50.0  # DPO-Positive's penalty weight λ (loss `dpop`)
    sft_weight: float = 0.0  # RPO: weight of the chosen responses' per-token NLL; 0 = off
    share_prompt: bool = True  # each pair's prompt run once (harness.packing) where the model allows

    def __post_init__(self):
        check_loss_settings(self.loss, self.reduction, self.label_smoothing, self.sft_weight)

    @classmethod
    def from_config(cls, cfg) -> StepSettings:
        d = cfg.dpo
        return cls(d.beta, d.loss, d.label_smoothing, d.mask_prompt, d.reduction,
                   cfg.train.precision, cfg.train.batch_size, d.simpo_gamma, d.dpop_lambda,
                   d.sft_weight, cfg.train.share_prompt)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def concatenated_logps(model, batch: Batch, reduction: str, share_prompt: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a batch's pairs → (chosen [B], rejected [B]): each pair's prompt
    once when `share_prompt` and the model allows it (harness.packing), else over the
    [2B, T] chosen and rejected rows."""
    args = (batch, reduction, share_prompt)
    # A DDP-wrapped harness.distributed.Logps returns the log-probs from its own forward.
    logps = model(*args) if isinstance(model, DistributedDataParallel) else pair_logps(model, *args)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def dpo_batch(policy, reference, ref_logps: torch.Tensor | None, idx: torch.Tensor, batch: Batch,
              s: StepSettings, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [B] and per-pair metrics for one micro-batch. The reference is either a
    frozen model (no_grad) or rows `idx` of cached log-probs `ref_logps` [n, 2]."""
    batch = to_device(batch, device)
    with hmodels.autocast(device, s.precision):
        pc, pr = concatenated_logps(policy, batch, s.reduction, s.share_prompt)
        if reference is not None:
            with torch.no_grad():
                rc, rr = concatenated_logps(reference, batch, s.reduction, s.share_prompt)
        else:
            rc, rr = ref_logps[idx, 0].to(device), ref_logps[idx, 1].to(device)
    nll = None
    if s.sft_weight or LOSSES[s.loss].nll_only:  # RPO's NLL term, or the sft loss itself
        n_chosen = batch["loss_mask"][: len(pc), 1:].sum(-1)
        nll = per_token_nll(pc, n_chosen, s.reduction)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, s.beta, s.loss, s.label_smoothing,
                              simpo_gamma=s.simpo_gamma, dpop_lambda=s.dpop_lambda,
                              sft_weight=s.sft_weight, chosen_nll=nll)
    return losses, pair_metrics(losses, cr, rj, pc, pr, s.beta)


def _file_order(items: list[TokenizedPair], s: StepSettings, pad_id: int):
    return batches(items, list(range(len(items))), s.batch_size, pad_id, s.mask_prompt)


@torch.no_grad()
def evaluate(policy, reference, ref_logps, items: list[TokenizedPair], s: StepSettings, pad_id: int,
             device, max_batches: int | None) -> dict[str, float]:
    """Mean per-pair metrics over the first `max_batches` batches of a split, in file order
    (the same pairs at every eval, so curves compare like with like)."""
    sums: dict[str, float] = defaultdict(float)
    n = 0
    with hmodels.eval_mode(policy):
        for i, (idx, batch) in enumerate(_file_order(items, s, pad_id)):
            if max_batches is not None and i >= max_batches:
                break
            _, metrics = dpo_batch(policy, reference, ref_logps, idx, batch, s, device)
            for k, v in metrics.items():
                sums[k] += v.sum().item()
            n += len(idx)
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def pref_accuracy(policy, reference, ref_logps, items: list[TokenizedPair],
                  true_rewards: list[tuple[float, float]], s: StepSettings, pad_id: int,
                  device) -> float | None:
    """Share of held-out pairs whose implicit-reward order matches the true reward's order (pairs
    with equal true rewards are left out; None when every pair is such a tie)."""
    margins: list[float] = []
    with hmodels.eval_mode(policy):
        for idx, batch in _file_order(items, s, pad_id):
            _, m = dpo_batch(policy, reference, ref_logps, idx, batch, s, device)
            margins += m["rewards/margins"].tolist()
    # A tie of the implicit rewards (as at step 0, where the policy is the reference) scores 1/2.
    agree = [0.5 if mg == 0 else float((mg > 0) == (rc > rr))
             for mg, (rc, rr) in zip(margins, true_rewards, strict=True) if rc != rr]
    return sum(agree) / len(agree) if agree else None
