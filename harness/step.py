"""One DPO micro-batch, one optimizer step, evaluation passes and preference accuracy.

Takes the DPO settings and a precision (`StepSettings`), never a whole run config, so that the
training loop and `harness bench` run exactly the same `optimizer_step`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from harness import device as hdevice
from harness import distributed
from harness import models as hmodels
from harness.data import TokenizedPair, batches
from harness.dpo import LOSSES, DPOSettings, dpo_loss, pair_metrics, per_token_nll
from harness.errors import RunDiverged
from harness.packing import pair_logps

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepSettings:
    """What a step needs: the run's validated `dpo` section itself (β, loss, masking, reduction,
    the loss's own settings: never copied field by field, checked once at config load) and how
    the step computes."""

    dpo: DPOSettings
    precision: str = "auto"  # auto | fp32 | bf16 (harness.device.autocast)
    batch_size: int = 8  # pairs per micro-batch in evaluation passes
    share_prompt: bool = True  # each pair's prompt run once (harness.packing) where the model allows

    @classmethod
    def from_config(cls, cfg) -> StepSettings:
        return cls(cfg.dpo, cfg.train.precision, cfg.train.batch_size, cfg.train.share_prompt)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def concatenated_logps(model, batch: Batch, reduction: str, share_prompt: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a batch's pairs → (chosen [B], rejected [B]): each pair's prompt
    once when `share_prompt` and the model allows it (harness.packing), else over the
    [2B, T] chosen and rejected rows."""
    args = (batch, reduction, share_prompt)
    # harness.distributed.Logps (in DDP, or an FSDP root) returns the log-probs from its forward.
    wrapped = isinstance(model, DistributedDataParallel | distributed.Logps)
    logps = model(*args) if wrapped else pair_logps(model, *args)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def dpo_batch(policy, reference, ref_logps: torch.Tensor | None, idx: torch.Tensor, batch: Batch,
              s: StepSettings, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [B] and per-pair metrics for one micro-batch. The reference is either a
    frozen model (no_grad) or rows `idx` of cached log-probs `ref_logps` [n, 2]."""
    batch = to_device(batch, device)
    with hdevice.autocast(device, s.precision):
        pc, pr = concatenated_logps(policy, batch, s.dpo.reduction, s.share_prompt)
        if reference is not None:
            with torch.no_grad():
                rc, rr = concatenated_logps(reference, batch, s.dpo.reduction, s.share_prompt)
        else:
            rc, rr = ref_logps[idx, 0].to(device), ref_logps[idx, 1].to(device)
    nll = None
    if s.dpo.sft_weight or LOSSES[s.dpo.loss].nll_only:  # RPO's NLL term, or the sft loss itself
        n_chosen = batch["loss_mask"][: len(pc), 1:].sum(-1)
        nll = per_token_nll(pc, n_chosen, s.dpo.reduction)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, s.dpo, chosen_nll=nll)
    return losses, pair_metrics(losses, cr, rj, pc, pr, s.dpo.beta)


@dataclass
class Stepper:
    """What an optimizer step reads and changes."""

    policy: torch.nn.Module  # whose parameters the optimizer steps
    forward: torch.nn.Module  # what runs the micro-batches: the policy, or DDP around its log-probs
    reference: torch.nn.Module | None  # the live reference; None: cached log-probs
    ref_logps: torch.Tensor | None  # the train split's cached reference log-probs [n, 2]
    settings: StepSettings
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler (harness.optim.scheduler)
    max_grad_norm: float | None  # clipping threshold; None or 0: the norm is measured, not clipped
    device: torch.device
    world: distributed.World = distributed.World()


@dataclass
class StepResult:
    grad_norm: float  # before clipping, over all ranks
    lr: float  # the rate this step used
    tokens: int  # non-padding tokens, over all ranks
    sums: dict[str, float]  # per-pair metric sums over this rank's micro-batches
    pairs: int  # pairs in `sums`


Micro = tuple[torch.Tensor, Batch, int]  # (pair indices, batch, pairs in the global batch)


def optimizer_step(st: Stepper, micro: Sequence[Micro], step: int) -> StepResult:
    """One optimizer step over the micro-batches of a global batch (gradient accumulation when
    there are several): each micro-batch's mean loss, scaled by 1/len(micro), backpropagated;
    the gradient norm clipped at max_grad_norm; AdamW and the schedule stepped. Raises
    RunDiverged on a non-finite micro-batch loss (on any rank) or gradient norm, before the
    optimizer steps on it."""
    sums: dict[str, float] = {}
    pairs = tokens = 0
    for i, (idx, batch, n) in enumerate(micro):
        with distributed.no_sync(st.forward, last=i == len(micro) - 1):
            losses, pair = dpo_batch(st.forward, st.reference, st.ref_logps, idx, batch, st.settings,
                                     st.device)
            # A rank's share of the global batch's mean loss (DDP averages over the ranks).
            loss = losses.sum() * (st.world.size / n) if st.world.active else losses.mean()
            total = st.world.sum([losses.detach().sum().item()])[0]
            if not math.isfinite(total):
                raise RunDiverged(step, "the train loss", total / n)
            (loss / len(micro)).backward()
        tokens += int(batch["attention_mask"].sum())
        for k, v in pair.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
        pairs += len(idx)
    grad_norm = torch.nn.utils.clip_grad_norm_(st.policy.parameters(), st.max_grad_norm or float("inf"))
    grad_norm = distributed.full(grad_norm)  # FSDP: a replicated DTensor over the sharded grads
    if not torch.isfinite(grad_norm):
        raise RunDiverged(step, "the gradient norm", float(grad_norm))
    lr = st.scheduler.get_last_lr()[0]
    tokens = int(st.world.sum([tokens])[0])
    st.optimizer.step()
    st.scheduler.step()
    st.optimizer.zero_grad(set_to_none=True)
    return StepResult(float(grad_norm), lr, tokens, sums, pairs)


def _file_order(items: list[TokenizedPair], s: StepSettings, pad_id: int):
    return batches(items, list(range(len(items))), s.batch_size, pad_id, s.dpo.mask_prompt)


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
