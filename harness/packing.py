"""Prompt sharing: one row per pair, prompt + chosen + rejected, the prompt run once.

A collated batch (harness.data.collate) holds each prompt twice, once before its chosen and once
before its rejected response. Here each pair becomes one row

    [ x_1 … x_P | y_w,1 … y_w,C | y_l,1 … y_l,R | pad ]

with an attention mask that lets a chosen token see the prompt and the chosen tokens before it,
a rejected token the prompt and the rejected tokens before it (never the chosen ones), and
position ids that restart the rejected response at P. Every counted token is scored from the
hidden state that precedes it in its own sequence (the first rejected token from x_P), so each
sequence's log-prob is the one the two-row layout gives, up to float rounding, while the prompt's
activations (and their backward) are computed once per pair instead of twice.

Which models: the architectures in harness.dpo.HEAD_SLICE_MODEL_TYPES that take a custom 4D
attention mask with position ids (sdpa or eager attention: flash attention takes no 4D mask)
and attend without a sliding window (a custom mask replaces the window); any other model falls
back to the two-row layout (`supported`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.dpo import HEAD_SLICE_MODEL_TYPES, model_logps, reduce_logps, token_logps

ATTENTION = {"sdpa", "eager"}  # implementations that apply a custom [B, 1, T, T] mask
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment of each position in a packed row


@dataclass(frozen=True)
class Packed:
    """One row per pair. input_ids, position_ids, segments: [B, T]. The scored tokens, each [N]:
    row, position of the hidden state that predicts it and its id. The counted terms, each [M]:
    which scored token and which sequence it counts in (0..B-1 chosen, B..2B-1 rejected, as
    harness.data.collate's rows): an unmasked prompt token is scored once and counts in both."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    terms: torch.Tensor
    sequences: torch.Tensor

    @property
    def n_sequences(self) -> int:
        return 2 * self.input_ids.shape[0]


def supported(model) -> bool:
    """Whether `model` computes packed rows exactly (see the module docstring)."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) \
        else None
    return (getattr(config, "model_type", None) in HEAD_SLICE_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in ATTENTION
            and not window and model.get_output_embeddings() is not None)


def packed_width(batch: dict[str, torch.Tensor]) -> int:
    """The width of a collated batch's packed rows: the longest prompt + chosen + rejected."""
    B = batch["input_ids"].shape[0] // 2
    lengths = batch["attention_mask"].sum(-1)
    return int((lengths[:B] + lengths[B:] - batch["prompt_lens"][:B]).max())


def pack(batch: dict[str, torch.Tensor], pad_id: int = 0) -> Packed:
    """The packed form of a collated batch ([2B, T] rows: B chosen, then B rejected)."""
    ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    prompt_lens = batch["prompt_lens"]
    B = ids.shape[0] // 2
    lengths = attn.sum(-1).tolist()
    P = prompt_lens[:B].tolist()
    width = packed_width(batch)
    device = ids.device
    input_ids = torch.full((B, width), pad_id, dtype=ids.dtype, device=device)
    position_ids = torch.zeros((B, width), dtype=torch.long, device=device)
    segments = torch.full((B, width), PAD, dtype=torch.long, device=device)
    rows, positions, targets, terms, sequences = [], [], [], [], []
    n = 0
    for b in range(B):
        p, lc, lr = P[b], lengths[b], lengths[B + b]
        if int(prompt_lens[B + b]) != p or not torch.equal(ids[b, :p], ids[B + b, :p]):
            raise ValueError(f"pair {b} of the batch: its chosen and rejected rows start with "
                             "different prompts, so the prompt cannot be shared")
        n_rej = lr - p
        input_ids[b, :lc] = ids[b, :lc]
        input_ids[b, lc : lc + n_rej] = ids[B + b, p:lr]
        position_ids[b, :lc] = torch.arange(lc, device=device)
        position_ids[b, lc : lc + n_rej] = torch.arange(p, lr, device=device)
        segments[b, :p] = PROMPT
        segments[b, p:lc] = CHOSEN
        segments[b, lc : lc + n_rej] = REJECTED
        # Chosen: the two-row layout's own positions (token t scored from t - 1). Its counted
        # prompt tokens (unmasked prompt) are the rejected row's too.
        t = loss_mask[b].nonzero(as_tuple=True)[0]
        rows.append(torch.full_like(t, b))
        positions.append(t - 1)
        targets.append(ids[b, t])
        chosen_terms = torch.arange(n, n + len(t), device=device)
        terms.append(chosen_terms)
        sequences.append(torch.full_like(t, b))
        shared = chosen_terms[t < p]
        n += len(t)
        # Rejected: token t >= p of its row sits at lc + (t - p); it is scored from the rejected
        # token before it, or from the prompt's last position for the first one.
        t = loss_mask[B + b].nonzero(as_tuple=True)[0]
        t = t[t >= p]
        rows.append(torch.full_like(t, b))
        positions.append(torch.where(t == p, p - 1, lc + (t - 1 - p)))
        targets.append(ids[B + b, t])
        terms += [shared, torch.arange(n, n + len(t), device=device)]
        sequences.append(torch.full((len(shared) + len(t),), B + b, dtype=torch.long, device=device))
        n += len(t)
    return Packed(input_ids, position_ids, segments, torch.cat(rows), torch.cat(positions),
                  torch.cat(targets), torch.cat(terms), torch.cat(sequences))


def attention_mask(segments: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 1, T, T] mask of a packed batch: query i sees key j <= i when j is a prompt position
    or in i's own segment; padding is seen by no query (a padding query sees the prompt and
    itself, so no row is empty). Bool (True = attend), or additive (0 / the dtype's minimum)
    when `additive_dtype` is given (eager attention)."""
    T = segments.shape[-1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k != PAD) & ((k == PROMPT) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


def packed_logps(model, packed: Packed, reduction: str) -> torch.Tensor:
    """Sequence log-probs [2B] float32 (chosen rows, then rejected) of a packed batch: one
    forward over [B, T], the LM head on the scored positions only."""
    eager = model.config._attn_implementation == "eager"
    mask = attention_mask(packed.segments, model.dtype if eager else None)
    hidden = model.base_model(input_ids=packed.input_ids, attention_mask=mask,
                              position_ids=packed.position_ids)[0]
    logits = model.get_output_embeddings()(hidden[packed.rows, packed.positions])
    picked = token_logps(logits, packed.targets)
    return reduce_logps(picked[packed.terms], packed.sequences, packed.n_sequences, reduction)


def pair_logps(model, batch: dict[str, torch.Tensor], reduction: str, share_prompt: bool
               ) -> torch.Tensor:
    """Sequence log-probs [2B] of a collated batch's rows: packed (each prompt once) when
    `share_prompt` and the model is `supported`, else one forward over the [2B, T] rows."""
    if share_prompt and supported(model):
        return packed_logps(model, pack(batch), reduction)
    return model_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                       reduction)
