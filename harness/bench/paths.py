"""The paths the benchmark compares on the same batches: the seed notebook's naive DPO step, and
the harness's with each pair's prompt run once (`harness`, the default) or with chosen and
rejected as two rows (`rows`, `train.share_prompt: false`). The harness's step is the run's own
`harness.step.optimizer_step`: forward, backward, gradient norm and clipping, AdamW and the
learning-rate schedule, exactly what `harness train` times per step."""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from harness import device as hdevice
from harness import models as hmodels
from harness import optim, packing
from harness.distributed import World
from harness.step import Stepper, StepSettings, concatenated_logps, optimizer_step

# ----------------------------------------------------------------------------- the two paths


def naive_logps(model, ids, attn, loss_mask, reduction: str) -> torch.Tensor:
    """The notebook's compute_logprobs: full log_softmax over [B, T, V], gather, masked mean."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    logp = F.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = loss_mask[:, 1:].to(picked.dtype)
    total = (picked * mask).sum(-1)
    return total / mask.sum(-1) if reduction == "mean" else total


class _Path(ABC):
    """What both paths share: `step` is one timed optimizer step and returns (its loss, the
    gradient norm before the update); `logps` scores a batch without stepping."""

    name = ""
    policy: torch.nn.Module

    @abstractmethod
    def step(self, idx, batch) -> tuple[float, float]: ...

    def tokens_run(self, batch) -> int:
        """Token positions this path's forward runs per model (not padding): both rows' prompts."""
        return int(batch["attention_mask"].sum())


class NaivePath(_Path):
    """The notebook: policy and reference models, four forward passes per step."""

    name = "naive"

    def __init__(self, model, cfg):
        self.policy = copy.deepcopy(model).train()
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.cfg = cfg
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.train.lr,
                                     weight_decay=cfg.train.weight_decay)

    def pair_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]): one forward each, as the notebook does."""
        B = batch["input_ids"].shape[0] // 2
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        c, r = slice(0, B), slice(B, 2 * B)
        red = self.cfg.dpo.reduction
        return (naive_logps(model, ids[c], attn[c], mask[c], red),
                naive_logps(model, ids[r], attn[r], mask[r], red))

    @torch.no_grad()
    def logps(self, batch) -> torch.Tensor:
        """The policy's log-probs of a batch's rows [2B] (chosen, then rejected), no step."""
        with hmodels.eval_mode(self.policy):
            return torch.cat(self.pair_logps(self.policy, batch))

    def step(self, idx, batch) -> tuple[float, float]:
        """The notebook's step: four forwards, the mean loss's backward, AdamW; the gradient norm
        (all parameters, as `harness train` logs it) read before the update."""
        pc, pr = self.pair_logps(self.policy, batch)
        with torch.no_grad():
            rc, rr = self.pair_logps(self.reference, batch)
        loss = -F.logsigmoid(self.cfg.dpo.beta * ((pc - pr) - (rc - rr))).mean()
        loss.backward()
        norm = torch.stack([p.grad.detach().float().norm() for p in self.policy.parameters()
                            if p.grad is not None]).norm()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach()), float(norm)


class HarnessPath(_Path):
    """harness.step.optimizer_step, with the reference live or cached, as `harness train` runs it
    (one micro-batch per step; the case's clipping, schedule and fused AdamW)."""

    name = "harness"
    device = torch.device("cpu")

    def __init__(self, model, cfg, bats, share_prompt: bool = True):
        self.policy = copy.deepcopy(model).train()
        self.settings = dataclasses.replace(StepSettings.from_config(cfg), share_prompt=share_prompt)
        if not share_prompt:
            self.name = "rows"
        self.reference, self.cache, self.cache_s = None, None, 0.0
        if cfg.dpo.reference == "model":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        else:  # what reference_cache computes, for exactly these batches; timed apart
            t0 = time.perf_counter()
            n = sum(len(idx) for idx, _ in bats)
            self.cache = torch.zeros(n, 2)
            with torch.no_grad(), hmodels.eval_mode(self.policy):
                for idx, batch in bats:
                    c, r = concatenated_logps(self.policy, batch, self.settings.dpo.reduction,
                                              self.settings.share_prompt)
                    self.cache[idx, 0], self.cache[idx, 1] = c.float(), r.float()
            self.cache_s = time.perf_counter() - t0
        if cfg.train.gradient_checkpointing:
            hmodels.enable_checkpointing(self.policy)
        t = cfg.train
        opt = optim.adamw(self.policy, self.device, t.lr, t.weight_decay, t.adam_betas)
        schedule = optim.scheduler(opt, t.schedule, t.warmup_steps, max(len(bats), 1))
        self.stepper = Stepper(self.policy, self.policy, self.reference, self.cache, self.settings,
                               opt, schedule, t.max_grad_norm, self.device, World())
        self.steps = 0

    @torch.no_grad()
    def logps(self, batch) -> torch.Tensor:
        """The policy's log-probs of a batch's rows [2B] (chosen, then rejected), no step: the
        call dpo_batch makes, with the same settings and precision."""
        with hmodels.eval_mode(self.policy), hdevice.autocast(self.device, self.settings.precision):
            c, r = concatenated_logps(self.policy, batch, self.settings.dpo.reduction,
                                      self.settings.share_prompt)
        return torch.cat([c, r]).float()

    def tokens_run(self, batch) -> int:
        """Packed, each pair's prompt runs once (harness.packing)."""
        n = super().tokens_run(batch)
        if self.settings.share_prompt and packing.supported(self.policy):
            n -= int(batch["prompt_lens"][: batch["input_ids"].shape[0] // 2].sum())
        return n

    def step(self, idx, batch) -> tuple[float, float]:
        self.steps += 1
        out = optimizer_step(self.stepper, [(idx, batch, len(idx))], self.steps)
        return out.sums["loss"] / out.pairs, out.grad_norm


PATHS = ("naive", "rows", "harness")


def make_path(name: str, model, cfg, bats):
    """One of PATHS."""
    if name == "naive":
        return NaivePath(model, cfg)
    return HarnessPath(model, cfg, bats, share_prompt=name == "harness")


