"""The SFT stage: next-token training on texts before DPO (the DPO paper's SFT on the IMDb text),
whose checkpoint is both the DPO starting point and the reference.

Checkpoints are cached under <cache root>/sft/<key>, the key a hash of everything that determines
them (base model, tokenizer, texts, SFT settings, seed), so every trial of a sweep that shares a
model size reuses one. A stage whose loss, gradient norm or weights stop being finite raises
ValueError (naming sft.lr and the step) and caches nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness import atomic, cache, optim
from harness import models as hmodels
from harness.chaos import crash_point


def sft_key(model_name: str, tokenizer, texts: list[str], settings: dict, seed: int) -> cache.Key:
    key = cache.Key([model_name, settings, seed, len(tokenizer)], tokenizer.get_vocab())
    return key.texts(texts)


def lm_loss(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over non-padding tokens. ids, attn: [B, T]."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100)


def train_sft(model, tokenizer, texts: list[str], sft, seed: int, device, progress: bool) -> dict:
    """Train `model` in place on `texts` for sft.steps AdamW steps; returns a few statistics.
    Raises ValueError when the loss or the gradient norm of a step is not finite (before the
    optimizer steps on it), or the weights are not finite at the end."""
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][: sft.max_length - 1] + [eos]
               for t in texts]
    opt = optim.adamw(model, device, sft.lr, weight_decay=0.0)
    sched = optim.scheduler(opt, "cosine", sft.warmup_steps, sft.steps, decay_in_warmup=True)
    model.train()
    losses = []
    for step in tqdm(range(1, sft.steps + 1), desc="sft", unit="step", disable=not progress,
                     leave=False):
        idx = torch.randint(len(encoded), (sft.batch_size,), generator=gen).tolist()
        rows = [encoded[i] for i in idx]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
        loss = lm_loss(model, ids.to(device), attn.to(device))
        _check_finite(sft, step, "loss", loss)
        loss.backward()
        _check_finite(sft, step, "gradient norm", torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == sft.steps // 2:
            crash_point("sft")
    bad = [n for n, w in model.named_parameters() if not bool(torch.isfinite(w).all())]
    if bad:
        raise ValueError(f"sft diverged: weights not finite after step {sft.steps} ({bad[0]}, ...); "
                         f"lower sft.lr (now {sft.lr})")
    k = max(1, len(losses) // 10)
    return {"sft/loss_first": sum(losses[:k]) / k, "sft/loss_last": sum(losses[-k:]) / k}


def _check_finite(sft, step: int, what: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value):
        raise ValueError(f"sft diverged at step {step}: {what} is {value.item()}; lower sft.lr "
                         f"(now {sft.lr})")


def sft_checkpoint(cfg, tokenizer, texts: list[str], device) -> tuple[Path, dict, bool]:
    """(checkpoint dir, stats, reused?) for the SFT of cfg.model on `texts`, from cache if there."""
    sft = cfg.sft
    settings = {**sft.model_dump(mode="json"), "n_positions": cfg.data.max_length,
                "optimizer": "adamw-fused" if optim.adamw_fused(device) else "adamw"}
    path = cache.entry("sft", sft_key(cfg.model.name, tokenizer, texts, settings, sft.seed))
    with atomic.file_lock(path.with_name(f"{path.name}.lock")):
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

    atomic.atomic_dir(path, save)
    return path, stats, False


def load_checkpoint(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
