"""A finished run as a Hugging Face model directory, `<run>/model`:

    full training   config.json, model.safetensors, generation_config.json, tokenizer files
                    (with the chat template), README.md (the model card)
                    -> AutoModelForCausalLM / AutoTokenizer.from_pretrained(<run>/model)
    LoRA            adapter_config.json, adapter_model.safetensors, tokenizer, README.md
                    -> PeftModel.from_pretrained(base, <run>/model); and with model.lora.merge_export
                    merged/ (the base with the adapter merged in, tokenizer included)
                    -> AutoModelForCausalLM.from_pretrained(<run>/model/merged)

Written whole or not at all (a temporary directory renamed into place); a directory left by an
attempt that was cut off is replaced.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from harness import adapters, atomic
from harness.rundir import MODEL_DIR

CARD_METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "gen/reward",
                "gen/kl", "test/loss", "test/rewards/accuracies")


def model_card(cfg, metrics: dict[str, float], lora: bool) -> str:
    """README.md of the directory: base model, data, loss and its settings, final metrics."""
    base = cfg.model.name + (" (after an SFT stage)" if cfg.sft.enabled or cfg.task.name != "none" else "")
    data = cfg.task.name if cfg.task.name != "none" else cfg.data.source
    rows = "\n".join(f"| {k} | {metrics[k]:.4f} |" for k in CARD_METRICS
                     if isinstance(metrics.get(k), int | float))
    how = (f"LoRA adapters (r {cfg.model.lora.r}, alpha {cfg.model.lora.alpha}, target "
           f"{cfg.model.lora.target_modules}) on a frozen base" if lora else "all weights trained")
    front = ["---", f"base_model: {cfg.model.name}", f"library_name: {'peft' if lora else 'transformers'}",
             "tags:", "- dpo", "- dpo-harness", "---"]
    return "\n".join(front) + f"""

# {cfg.name}

Direct Preference Optimization (Rafailov et al. 2023) of `{base}`: {how}.

| setting | value |
|---|---|
| data | `{data}` |
| loss | {cfg.dpo.loss}, beta {cfg.dpo.beta} |
| masking | {cfg.dpo.masking} (prompt {'masked' if cfg.dpo.mask_prompt else 'counted'}, {cfg.dpo.reduction} of token log-probs) |
| reference | {cfg.dpo.reference} |
| optimizer | AdamW, lr {cfg.train.lr}, batch {cfg.train.batch_size} x {cfg.train.grad_accum} |
| precision | {cfg.train.precision} (weights: trained {cfg.model.trainable_dtype}, frozen {cfg.model.dtype}) |

## Final metrics

| metric | value |
|---|---|
{rows}
"""


def model_dir(policy: torch.nn.Module, tokenizer, run_dir: Path, cfg, metrics: dict[str, float],
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `<run_dir>/model` (see the module docstring); returns it. `state_dict`: the full
    weights when the caller gathered them (a sharded policy)."""
    target = Path(run_dir) / MODEL_DIR
    lora = adapters.is_lora(policy)

    def save(d: Path) -> None:
        if lora:
            adapters.save(policy, d, cfg.model.lora.merge_export)
            if cfg.model.lora.merge_export:
                tokenizer.save_pretrained(d / adapters.MERGED)
        else:
            use_cache = policy.config.use_cache
            policy.config.use_cache = True  # gradient checkpointing turned it off for training
            try:
                policy.save_pretrained(d, state_dict=state_dict)
            finally:
                policy.config.use_cache = use_cache
        tokenizer.save_pretrained(d)
        (d / "README.md").write_text(model_card(cfg, metrics, lora), encoding="utf-8")

    if target.exists():  # left by an attempt cut off after writing it
        shutil.rmtree(target)
    return atomic.atomic_dir(target, save)
