"""The memory plan of a run: bytes per part of its training state, before anything is loaded.

    weights      every parameter of the policy, in its dtype (a LoRA base in model.dtype, its
                 adapters and full trained weights in model.trainable_dtype)
    gradients    one per trained parameter, in its dtype
    optimizer    AdamW's two moments per trained parameter (fused AdamW keeps the param's dtype)
    reference    a full run's frozen copy in model.dtype (none with LoRA: the base with the
                 adapter off; none with cached log-probs once they are computed)
    activations  what the largest micro-batch the run draws keeps for its backward pass (below)
    autocast     under bf16 autocast, the bf16 copies of float32 weights that the forward keeps
                 for the backward

`state_record` counts the same parts on a built model (summary.json); `estimate` computes them from
the config alone (`harness plan EXP.yaml`), on a model built on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GB = 1e9


def _unique(params) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def state_record(policy: torch.nn.Module, reference) -> dict[str, float | int]:
    """summary.json's count of a built run's training state: parameters, trained parameters, and
    the bytes of weights, gradients, AdamW moments and a separate reference copy (GB)."""
    params = _unique(policy.parameters())
    trained = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trained)
    ref_params = _unique(reference.parameters()) if reference is not None else []
    ref = sum(p.numel() * p.element_size() for p in ref_params if all(p is not q for q in params))
    return {"n_params": sum(p.numel() for p in params), "n_trainable": sum(p.numel() for p in trained),
            "state/weights_gb": weights / GB, "state/gradients_gb": grads / GB,
            "state/optimizer_gb": 2 * grads / GB, "state/reference_gb": ref / GB,
            "state/total_gb": (weights + 3 * grads + ref) / GB}


@dataclass
class Plan:
    """The estimated peak of one run, per part (bytes), and where it fits."""

    name: str
    parts: dict[str, float] = field(default_factory=dict)
    n_params: int = 0
    n_trainable: int = 0
    device: str = "cpu"
    capacity: float | None = None  # the device's memory (bytes), when known

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak <= self.capacity

    def per_device(self, headroom: float = 0.9) -> int | None:
        """How many such runs share one device (at most `headroom` of it in use)."""
        if self.capacity is None:
            return None
        return max(0, math.floor(headroom * self.capacity / max(self.peak, 1.0)))


# ----------------------------------------------------------------------------- the estimate

# What one token keeps for the backward pass in one transformer layer, in units of the hidden
# width h and the MLP width i, and the element size of what it keeps: the norms' inputs and
# outputs, q/k/v and the attention output, the MLP's inputs, gates and activations (after
# Korthikanti et al. 2022, section 4.1, counted for these layers' own ops).
PER_TOKEN = {"h": 16, "i": 4}
LOGITS_COPIES = 3  # the scored rows' logits: float32 logits, their logsumexp input, the backward's grad
RUNTIME = 120e6  # bytes a first forward and backward add before any tensor (kernels, thread pools)


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from a model's config (built on the meta device)."""

    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    lora_params: int  # adapter parameters at the configured rank (0 without LoRA)


def _dims(config) -> tuple[int, int, int]:
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return layers, hidden, inter


def lora_param_count(model: torch.nn.Module, lora) -> int:
    """Parameters of the adapters model.lora would add: r x (in + out) for each targeted linear
    layer (peft's all-linear: every Linear or Conv1D but the output head)."""
    if not lora.enabled:
        return 0
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    targets = lora.target_modules
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | Conv1D) or module is head:
            continue
        if targets != "all-linear":
            wanted = [targets] if isinstance(targets, str) else targets
            if not any(name == t or name.endswith(f".{t}") for t in wanted):
                continue
        w = module.weight
        total += lora.r * (w.shape[0] + w.shape[1])
    return total


def model_shape(cfg, tokenizer, max_length: int) -> Shape:
    """The shape of the run's model, without loading weights: a tiny model built from config, any
    other from its config.json (a GGUF file's header), on the meta device."""
    from harness import models as hmodels

    with torch.device("meta"):
        if hmodels.is_tiny(cfg.model.name):
            model = hmodels.build_tiny_model(cfg.model.name, len(tokenizer), max(max_length, 128),
                                             tokenizer.eos_token_id, tokenizer.pad_token_id)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(hmodels.load_config(cfg.model))
    layers, hidden, inter = _dims(model.config)
    return Shape(hmodels.count_params(model), layers, hidden, inter, model.config.vocab_size,
                 lora_param_count(model, cfg.model.lora))
