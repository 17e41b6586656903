"""The SFT stage: next-token training on texts before DPO (the DPO paper's SFT on the IMDb text),
whose checkpoint is both the DPO starting point and the reference.

Checkpoints are cached under <cache root>/sft/<key>, the key a hash of everything that determines
them (base model, tokenizer, texts, SFT settings, seed), so every trial of a sweep that shares a
model size reuses one.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness import models as hmodels
from harness.config import cache_root


def sft_key(model_name: str, tokenizer, texts: list[str], settings: dict, seed: int) -> str:
    h = hashlib.sha256(json.dumps([model_name, settings, seed, len(tokenizer)]).encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:24]


def lm_loss(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over non-padding tokens. ids, attn: [B, T]."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100)


def train_sft(model, tokenizer, texts: list[str], sft, seed: int, device, progress: bool) -> dict:
    """Train `model` in place on `texts` for sft.steps AdamW steps; returns a few statistics."""
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][: sft.max_length - 1] + [eos]
               for t in texts]
    opt = hmodels.adamw(model, device, sft.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, sft.warmup_steps))
        * (0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, sft.steps))))))
    model.train()
    losses = []
    for _ in tqdm(range(sft.steps), desc="sft", unit="step", disable=not progress, leave=False):
        idx = torch.randint(len(encoded), (sft.batch_size,), generator=gen).tolist()
        rows = [encoded[i] for i in idx]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
        loss = lm_loss(model, ids.to(device), attn.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    k = max(1, len(losses) // 10)
    return {"sft/loss_first": sum(losses[:k]) / k, "sft/loss_last": sum(losses[-k:]) / k}


def sft_checkpoint(cfg, tokenizer, texts: list[str], device) -> tuple[Path, dict, bool]:
    """(checkpoint dir, stats, reused?) for the SFT of cfg.model on `texts`, from cache if there."""
    sft = cfg.sft
    settings = {**sft.model_dump(mode="json"), "n_positions": cfg.data.max_length,
                "optimizer": "adamw-fused" if hmodels.adamw_fused(device) else "adamw"}
    key = sft_key(cfg.model.name, tokenizer, texts, settings, sft.seed)
    path = cache_root() / "sft" / key
    with hmodels.file_lock(path.with_name(f"{key}.lock")):
        if (path / "sft.json").exists():
            return path, json.loads((path / "sft.json").read_text()), True
        return _train_checkpoint(cfg, tokenizer, texts, device, path)


def _train_checkpoint(cfg, tokenizer, texts: list[str], device, path: Path) -> tuple[Path, dict, bool]:
    sft = cfg.sft
    torch.manual_seed(sft.seed)
    model, _ = hmodels.load_model(cfg.model, tokenizer, cfg.data.max_length)
    model.to(device)
    t0 = time.time()
    stats = train_sft(model, tokenizer, texts, sft, sft.seed, device, cfg.tracking.progress)
    stats["sft/wall_s"] = time.time() - t0
    stats["sft/texts"] = len(texts)
    print(f"sft: loss {stats['sft/loss_first']:.3f} -> {stats['sft/loss_last']:.3f} in "
          f"{stats['sft/wall_s']:.0f}s; checkpoint {path}", file=sys.stderr)

    def save(d: Path) -> None:
        model.save_pretrained(d)
        (d / "sft.json").write_text(json.dumps(stats, indent=2))

    hmodels._atomic_save(save, path)
    return path, stats, False


def load_checkpoint(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
