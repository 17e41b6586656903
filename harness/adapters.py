"""LoRA through `peft`: the policy trains low-rank adapters on a frozen base, and the DPO reference
is that same base with its adapter disabled, so a run holds one copy of the weights.

    policy     = the transformers model with LoRA layers injected (what the step, generation and
                 DDP call: `PeftModel.get_base_model()`, whose `base_model` is the transformer
                 body the packed log-prob path needs; a PeftModel's own `base_model` is peft's
                 LoraModel, whose output is logits, not hidden states)
    reference  = AdapterOff(policy): every call runs under `disable_adapter()`
    saved      = the adapter in peft's format (<run>/model), and the merged model (<run>/model/merged)

At initialisation every B matrix is zero, so the policy's log-probs equal the reference's bit for
bit (LoRA, Hu et al. 2021, section 4.1: ΔW = BA with B = 0 at the start).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

MERGED = "merged"  # <run>/model/merged: the base with the adapter merged in
LORA_KEY = "lora_"  # peft names every adapter tensor lora_A / lora_B / lora_embedding_*


def wrap(model: torch.nn.Module, lora) -> torch.nn.Module:
    """`model` with LoRA adapters of `lora` (model.lora) injected in place; returns the
    transformers model (its peft wrapper stays reachable through `peft_of`). Only the adapters
    train; they are created in float32 whatever the base's dtype."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is part of `make install`
        raise ImportError("model.lora.r > 0 needs peft: pip install -e '.[lora]'") from err

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as err:
        raise ValueError(f"model.lora.target_modules: {err}") from err
    inner = peft_model.get_base_model()
    inner._harness_peft = [peft_model]  # a list: not registered as a submodule of its own child
    return inner


def peft_of(model: torch.nn.Module):
    """The PeftModel around a policy built by `wrap`, else None."""
    box = getattr(model, "_harness_peft", None)
    return box[0] if box else None


def is_lora(model: torch.nn.Module) -> bool:
    return peft_of(model) is not None


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's tensors without the adapters', under the base model's own names (what a
    LoRA run's reference is: it keys the reference caches, so that runs of any rank share them)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if LORA_KEY in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


class AdapterOff:
    """The reference of a LoRA policy: the same modules, called with the adapter disabled. Reads
    like the transformers model (config, dtype, device, base_model, get_output_embeddings,
    __call__, generate) for the log-prob, generation and sampling paths. Not a torch Module: its
    eval()/train() leave the policy's mode alone, and it owns no parameters to optimize."""

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy
        self.peft = peft_of(policy)
        self.training = False

    def off(self) -> contextlib.AbstractContextManager:
        return self.peft.disable_adapter()

    def _disabled(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with self.off():
                return fn(*args, **kwargs)

        return call

    def __call__(self, *args, **kwargs) -> Any:
        return self._disabled(self.policy)(*args, **kwargs)

    forward = __call__

    def generate(self, *args, **kwargs):
        return self._disabled(self.policy.generate)(*args, **kwargs)

    @property
    def base_model(self) -> Callable:
        return self._disabled(self.policy.base_model)

    def get_output_embeddings(self) -> Callable | None:
        head = self.policy.get_output_embeddings()
        return None if head is None else self._disabled(head)

    @property
    def config(self):
        return self.policy.config

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.dtype

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def state_dict(self) -> dict[str, torch.Tensor]:
        return base_state_dict(self.policy)

    def eval(self) -> AdapterOff:
        return self

    def train(self, mode: bool = True) -> AdapterOff:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdapterOff:
        return self

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())


def save(model: torch.nn.Module, out_dir: Path, merge: bool) -> list[str]:
    """The adapter in peft's format into `out_dir` (adapter_config.json,
    adapter_model.safetensors), and with `merge` the base with the adapter merged in, as a plain
    transformers model, into `out_dir/merged`. Merging is done on a copy: the policy keeps its
    adapter. Returns what was written."""
    import copy

    peft_model = peft_of(model)
    peft_model.save_pretrained(str(out_dir))
    written = ["adapter_config.json", "adapter_model.safetensors"]
    if merge:
        merged = copy.deepcopy(peft_model).merge_and_unload()
        merged.save_pretrained(str(Path(out_dir) / MERGED))
        written.append(f"{MERGED}/")
    return written
