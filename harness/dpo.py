"""DPO math: sequence log-probs and the loss registry.

Pure functions with shapes in the docstrings. Notation (Rafailov et al. 2023, arXiv 2305.18290):
π is the policy, π_ref the frozen reference, y_w the chosen and y_l the rejected response, and

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]     (the "log-ratio margin")

Most losses are a function of h alone; the others read the log-ratios or policy log-probs of each
side (`PairLogps`), and `sft` (Preferred-FT) only the chosen responses' per-token NLL.
Every implicit reward is β·(log π(y|x) − log π_ref(y|x)) (paper §5).
Losses return per-pair values: callers take means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from harness import metrics

# ----------------------------------------------------------------------------- log-probs

# Rows of logits turned into float32 at a time.  A [rows, V] float32 block is the largest
# temporary: 1024 rows × 50k vocab ≈ 200 MB.  No [B, T, V] log-softmax is ever built.
CHUNK_ROWS = 1024


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for each row, in float32, without a full log-softmax.

    logits: [N, V] any float dtype; targets: [N] int64 → [N] float32.
    log p(t) = logit_t − logsumexp(logits), taken over chunks of CHUNK_ROWS rows.
    """
    out = []
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        block = logits[start : start + CHUNK_ROWS].float()
        tgt = targets[start : start + CHUNK_ROWS]
        picked = block.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(block, dim=-1))
    if not out:
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def reduce_logps(
    logps: torch.Tensor, rows: torch.Tensor, n_rows: int, reduction: str
) -> torch.Tensor:
    """Sum (or mean) per-token log-probs into per-sequence values.

    logps: [N] float32 log-probs of the counted tokens; rows: [N] sequence index of each.
    Returns [n_rows]: Σ_t log π(y_t | x, y_<t) (`sum`, the DPO paper) or that sum over the
    number of counted tokens (`mean`, the from-scratch notebook). A row with no counted
    token gets 0 (its count is clamped to 1 so mean is finite).
    """
    sums = torch.zeros(n_rows, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    if reduction == "sum":
        return sums
    if reduction == "mean":
        counts = torch.bincount(rows, minlength=n_rows).clamp(min=1).to(logps.dtype)
        return sums / counts
    raise ValueError(f"unknown reduction {reduction!r}; valid: mean, sum")


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Sequence log-probs from full logits.

    logits: [B, T, V]; input_ids: [B, T]; loss_mask: [B, T] bool, True where the token at that
    position counts (padding never; prompt only when not masked). Labels are shifted by one:
    logits at t score input_ids at t+1. Returns [B] float32.
    """
    mask = loss_mask[:, 1:]
    rows = mask.nonzero(as_tuple=True)[0]
    picked = token_logps(logits[:, :-1][mask], input_ids[:, 1:][mask])
    return reduce_logps(picked, rows, input_ids.shape[0], reduction)


# Model types whose logits are exactly lm_head(final hidden state): for these we run the
# LM head only on positions whose next token counts (no soft-capping or logit scaling).
HEAD_SLICE_MODEL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "olmo2"}


def model_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    reduction: str,
) -> torch.Tensor:
    """Sequence log-probs of a causal LM for a batch: [B, T] tensors → [B] float32.

    For known architectures the LM head runs only on the hidden states of positions whose
    next token counts: prompt and padding positions never reach the vocabulary projection.
    Other architectures go through the full forward and `sequence_logps`.
    """
    head = model.get_output_embeddings()
    if getattr(model.config, "model_type", None) in HEAD_SLICE_MODEL_TYPES and head is not None:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = loss_mask[:, 1:]
        rows = mask.nonzero(as_tuple=True)[0]
        logits = head(hidden[:, :-1][mask])  # [N, V], N = counted tokens
        picked = token_logps(logits, input_ids[:, 1:][mask])
        return reduce_logps(picked, rows, input_ids.shape[0], reduction)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return sequence_logps(logits, input_ids, loss_mask, reduction)


# ----------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of P pairs, each [P] float32: policy π and reference π_ref, chosen y_w
    and rejected y_l (summed or per-token averaged, as `dpo.reduction` says)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_nll: torch.Tensor | None = None  # [P] per-token NLL of y_w (`per_token_nll`), if given

    @property
    def chosen_ratio(self) -> torch.Tensor:  # log π(y_w|x) − log π_ref(y_w|x)
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_ratio(self) -> torch.Tensor:  # log π(y_l|x) − log π_ref(y_l|x)
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:  # h
        return self.chosen_ratio - self.rejected_ratio


class DPOSettings(Protocol):
    """What a loss reads of the run's `dpo` section (harness.config.DPOConfig, validated once
    at config load by `check_loss_settings`): the one carrier of the DPO settings."""

    beta: float  # β (τ in the IPO paper)
    loss: str  # a name in LOSSES
    mask_prompt: bool  # prompt tokens do not count in a sequence log-prob
    reduction: str  # sum | mean over the counted tokens
    label_smoothing: float  # ε, the assumed share of flipped labels: sigmoid, robust
    simpo_gamma: float  # γ, SimPO's target margin
    dpop_lambda: float  # λ, DPO-Positive's penalty weight
    sft_weight: float  # RPO's weight of the chosen responses' per-token NLL; 0 = off


def sigmoid_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """The DPO loss (paper eq. 7): −log σ(β·h). [P] → [P].

    With label_smoothing ε (conservative DPO, Mitchell 2023) the preference label is assumed
    flipped with probability ε: −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    """
    eps, bh = p.label_smoothing, p.beta * x.margin
    return -(1 - eps) * F.logsigmoid(bh) - eps * F.logsigmoid(-bh)


def robust_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), an unbiased loss under labels
    flipped with rate ε = label_smoothing < 1/2. [P] → [P].

        ((1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))) / (1 − 2ε)
    """
    eps, bh = p.label_smoothing, p.beta * x.margin  # ε < 1/2: checked at config load
    return ((1 - eps) * -F.logsigmoid(bh) - eps * -F.logsigmoid(-bh)) / (1 - 2 * eps)


def ipo_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h − 1/(2β))². [P] → [P].

    The IPO paper's h uses per-token averaged log-probs, hence `reduction: mean`.
    """
    return (x.margin - 1 / (2 * p.beta)) ** 2


def hinge_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """Hinge / SLiC (Zhao et al. 2023, arXiv 2305.10425): max(0, 1 − β·h). [P] → [P]."""
    return torch.relu(1 - p.beta * x.margin)


def simpo_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free:
    −log σ(β·(avg log π(y_w) − avg log π(y_l)) − γ). [P] → [P].

    avg log π is the per-token averaged policy log-prob (`reduction: mean`); the reference
    log-probs are not used.
    """
    return -F.logsigmoid(p.beta * (x.policy_chosen - x.policy_rejected) - p.simpo_gamma)


def apo_zero_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7; TRL's `apo_zero`):
    1 − σ(β·(log π(y_w) − log π_ref(y_w))) + σ(β·(log π(y_l) − log π_ref(y_l))). [P] → [P].

    Raises the chosen likelihood and lowers the rejected one, each against the reference.
    """
    return 1 - torch.sigmoid(p.beta * x.chosen_ratio) + torch.sigmoid(p.beta * x.rejected_ratio)


def dpop_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228, eq. 3):
    −log σ(β·(h − λ·max(0, log π_ref(y_w) − log π(y_w)))). [P] → [P].

    The penalty is on only when the policy makes the chosen response less likely than the
    reference does, which plain DPO allows as long as the rejected one falls faster.
    """
    penalty = torch.relu(x.ref_chosen - x.policy_chosen)
    return -F.logsigmoid(p.beta * (x.margin - p.dpop_lambda * penalty))


def sft_loss(x: PairLogps, p: DPOSettings) -> torch.Tensor:
    """Preferred-FT (the DPO paper's baseline, §6): supervised fine-tuning on the chosen responses
    only, −(1/|y_w|)·log π(y_w|x), the per-token NLL of y_w whatever the reduction. [P] → [P].

    Neither the rejected response nor the reference enters the loss (β is unused); the implicit
    rewards are still reported, as for every loss.
    """
    if x.chosen_nll is None:
        raise ValueError("the sft loss needs chosen_nll, the chosen responses' per-token NLL")
    return x.chosen_nll


@dataclass(frozen=True)
class Loss:
    fn: Callable[[PairLogps, DPOSettings], torch.Tensor]
    uses_label_smoothing: bool = False  # reads ε; any other loss refuses ε > 0
    per_token: bool = False  # defined on per-token averaged log-probs: needs reduction `mean`
    reference_free: bool = False  # the loss does not read the reference log-probs
    nll_only: bool = False  # the loss is the chosen responses' NLL: an NLL term on top is refused


LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid_loss, uses_label_smoothing=True),
    "robust": Loss(robust_loss, uses_label_smoothing=True),
    "ipo": Loss(ipo_loss, per_token=True),
    "hinge": Loss(hinge_loss),
    "simpo": Loss(simpo_loss, per_token=True, reference_free=True),
    "apo_zero": Loss(apo_zero_loss),
    "dpop": Loss(dpop_loss),
    "sft": Loss(sft_loss, reference_free=True, nll_only=True),
}


def check_loss_settings(loss: str, reduction: str, label_smoothing: float,
                        sft_weight: float = 0.0) -> None:
    """Refuse settings a loss is not defined for, naming the `dpo.*` field to change. Run once,
    when the `dpo` section is validated (harness.config.DPOConfig); the step trusts it."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(sorted(LOSSES))}")
    if label_smoothing and not LOSSES[loss].uses_label_smoothing:
        users = " and ".join(n for n, s in LOSSES.items() if s.uses_label_smoothing)
        raise ValueError(f"dpo.label_smoothing: {label_smoothing} applies to the {users} losses "
                         f"only, not {loss!r}; set dpo.label_smoothing: 0")
    if sft_weight and LOSSES[loss].nll_only:
        raise ValueError(f"dpo.sft_weight: {sft_weight} adds the chosen responses' NLL, which "
                         f"the {loss} loss already is; set dpo.sft_weight: 0")
    if LOSSES[loss].per_token and reduction != "mean":
        raise ValueError(f"dpo.reduction: {reduction!r} does not suit the {loss} loss, which is "
                         "defined on per-token averaged log-probs; set dpo.reduction: mean")


def per_token_nll(logps: torch.Tensor, n_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """Negative log-likelihood per counted token: [P] sequence log-probs and [P] token counts
    → [P]. Mean-reduced log-probs already are per token; summed ones are divided by the count."""
    if reduction == "mean":
        return -logps
    return -logps / n_tokens.clamp(min=1).to(logps.dtype)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    d: DPOSettings,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and detached implicit rewards, for the loss and settings of `d` (the
    validated `dpo` section).

    All inputs [P] sequence log-probs. Returns (losses [P], chosen_rewards [P],
    rejected_rewards [P]) with reward = β·(log π − log π_ref) (paper §5) for every loss.
    With d.sft_weight w > 0 (RPO, Pang et al. 2024, arXiv 2404.19733) each pair's loss
    gains w · chosen_nll, the per-token NLL of its chosen response ([P], see `per_token_nll`);
    the `sft` loss is chosen_nll alone.
    """
    x = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_nll)
    losses = LOSSES[d.loss].fn(x, d)
    if d.sft_weight:
        if chosen_nll is None:
            raise ValueError("dpo.sft_weight > 0 needs chosen_nll, the chosen responses' per-token NLL")
        losses = losses + d.sft_weight * chosen_nll
    return losses, d.beta * x.chosen_ratio.detach(), d.beta * x.rejected_ratio.detach()


def pair_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Per-pair metric tensors [P], keyed by the registry's pair-metric keys (harness.metrics
    PAIR_METRICS: `{group}/{name}`; callers prefix the split).

    `rewards/margins` is the paper's (with β); `logratios/margins` is the same margin without β,
    the quantity the from-scratch notebook plots as its "reward margin".
    """
    margins = chosen_rewards - rejected_rewards
    return {
        metrics.LOSS: losses.detach(),
        metrics.REWARDS_CHOSEN: chosen_rewards,
        metrics.REWARDS_REJECTED: rejected_rewards,
        metrics.REWARDS_MARGINS: margins,
        metrics.REWARDS_ACCURACIES: (margins > 0).float(),
        metrics.LOGRATIOS_MARGINS: margins / beta,
        metrics.LOGPS_CHOSEN: policy_chosen.detach(),
        metrics.LOGPS_REJECTED: policy_rejected.detach(),
    }
