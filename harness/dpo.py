"""DPO math: sequence log-probs and the loss registry.

Pure functions with shapes in the docstrings. Notation (Rafailov et al. 2023, arXiv 2305.18290):
π is the policy, π_ref the frozen reference, y_w the chosen and y_l the rejected response, and

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]     (the "log-ratio margin")

Every loss is a function of h; every implicit reward is β·(log π(y|x) − log π_ref(y|x)) (paper §5).
Losses return per-pair values: callers take means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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

LossFn = Callable[[torch.Tensor, float, float], torch.Tensor]


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The DPO loss (paper eq. 7): −log σ(β·h). [P] → [P].

    With label_smoothing ε (conservative DPO, Mitchell 2023) the preference label is assumed
    flipped with probability ε: −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h − 1/(2β))². [P] → [P].

    The IPO paper's h uses per-token averaged log-probs: pair it with `reduction: mean`.
    """
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinge / SLiC (Zhao et al. 2023, arXiv 2305.10425): max(0, 1 − β·h). [P] → [P]."""
    return torch.relu(1 - beta * h)


LOSSES: dict[str, LossFn] = {"sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and detached implicit rewards.

    All inputs [P] sequence log-probs. Returns (losses [P], chosen_rewards [P],
    rejected_rewards [P]) with reward = β·(log π − log π_ref) (paper §5).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(sorted(LOSSES))}")
    if label_smoothing and loss != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss!r}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = LOSSES[loss](chosen_ratio - rejected_ratio, beta, label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Per-pair metric tensors, keyed by their `{group}/{name}` (callers prefix the split).

    `rewards/margins` is the paper's (with β); `logratios/margins` is the same margin without β,
    the quantity the from-scratch notebook plots as its "reward margin".
    """
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": margins,
        "rewards/accuracies": (margins > 0).float(),
        "logratios/margins": margins / beta,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }
