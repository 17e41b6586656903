"""The two paths the benchmark compares on the same batches: the seed notebook's naive DPO step
and the harness's (harness.step)."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from harness import models as hmodels
from harness import optim
from harness.dpo import model_logps
from harness.step import StepSettings, concatenated_logps, dpo_batch

# ----------------------------------------------------------------------------- the two paths


def naive_logps(model, ids, attn, loss_mask, reduction: str) -> torch.Tensor:
    """The notebook's compute_logprobs: full log_softmax over [B, T, V], gather, masked mean."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    logp = F.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = loss_mask[:, 1:].to(picked.dtype)
    total = (picked * mask).sum(-1)
    return total / mask.sum(-1) if reduction == "mean" else total


class NaivePath:
    """The notebook: policy and reference models, four forward passes per step."""

    name = "naive"

    def __init__(self, model, cfg):
        self.policy = copy.deepcopy(model).train()
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.cfg = cfg
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.train.lr,
                                     weight_decay=cfg.train.weight_decay)

    def step(self, idx, batch) -> float:
        B = batch["input_ids"].shape[0] // 2
        red, beta = self.cfg.dpo.reduction, self.cfg.dpo.beta
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        c, r = slice(0, B), slice(B, 2 * B)
        pc = naive_logps(self.policy, ids[c], attn[c], mask[c], red)
        pr = naive_logps(self.policy, ids[r], attn[r], mask[r], red)
        with torch.no_grad():
            rc = naive_logps(self.reference, ids[c], attn[c], mask[c], red)
            rr = naive_logps(self.reference, ids[r], attn[r], mask[r], red)
        loss = -F.logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class HarnessPath:
    """harness.step.dpo_batch, with the reference live or cached, as `harness train` runs it."""

    name = "harness"

    def __init__(self, model, cfg, bats):
        self.policy = copy.deepcopy(model).train()
        self.cfg = cfg
        self.reference, self.cache, self.cache_s = None, None, 0.0
        if cfg.dpo.reference == "model":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        else:  # what reference_cache computes, for exactly these batches; timed apart
            t0 = time.perf_counter()
            n = sum(len(idx) for idx, _ in bats)
            self.cache = torch.zeros(n, 2)
            with torch.no_grad(), hmodels.eval_mode(self.policy):
                for idx, batch in bats:
                    c, r = concatenated_logps(self.policy, batch, cfg.dpo.reduction)
                    self.cache[idx, 0], self.cache[idx, 1] = c.float(), r.float()
            self.cache_s = time.perf_counter() - t0
        if cfg.train.gradient_checkpointing:
            hmodels.enable_checkpointing(self.policy)
        t = cfg.train
        self.opt = optim.adamw(self.policy, torch.device("cpu"), t.lr, t.weight_decay, t.adam_betas)
        self.settings = StepSettings.from_config(cfg)

    def step(self, idx, batch) -> float:
        losses, _ = dpo_batch(self.policy, self.reference, self.cache, idx, batch, self.settings,
                              torch.device("cpu"))
        loss = losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


@torch.no_grad()
def bf16_logp_difference(model, batch, cfg) -> float:
    """max |log-prob| difference (per sequence, in the run's reduction) between fp32 and CPU
    bf16 autocast on one batch."""
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"], cfg.dpo.reduction)
    with hmodels.eval_mode(model):
        fp32 = model_logps(model, *args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model_logps(model, *args)
    return float((fp32 - bf16.float()).abs().max())


def make_path(name: str, model, cfg, bats):
    return NaivePath(model, cfg) if name == "naive" else HarnessPath(model, cfg, bats)


