"""Greedy generations of the reference and the policy for a few prompts, side by side."""

from __future__ import annotations

import torch

from harness.models import eval_mode


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, device, special_tokens: bool) -> str:
    """Greedy continuation of one prompt, up to eos or max_new_tokens (deterministic)."""
    ids = tokenizer(prompt, add_special_tokens=special_tokens, return_tensors="pt")["input_ids"].to(device)
    with eval_mode(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def side_by_side(policy, reference, tokenizer, prompts: list[tuple[str, str]], max_new_tokens: int,
                 device, special_tokens: bool = True) -> list[list[str]]:
    """Rows of (split, prompt, reference answer, policy answer)."""
    rows = []
    for split, prompt in prompts:
        rows.append([split, prompt,
                     greedy(reference, tokenizer, prompt, max_new_tokens, device, special_tokens),
                     greedy(policy, tokenizer, prompt, max_new_tokens, device, special_tokens)])
    return rows
