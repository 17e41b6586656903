"""Frozen weights stored in bfloat16, computed in float32: what `model.dtype: bfloat16` means in a
run whose precision is fp32 (a CPU without native bf16, where torch's bf16 matmuls are ~100x
slower than fp32's: notes/memory-plan.md).

Every matrix of a linear layer (nn.Linear, GPT-2's Conv1D, a tied LM head) and of an embedding
stays in bf16 (2 bytes a parameter) and is widened to float32 one layer at a time, inside that
layer's forward and backward: the backward keeps the bf16 matrix, never a float32 copy, so a LoRA
base costs half its float32 size for the whole step. Vectors (norms, biases) are widened to float32
once (they are few). Only frozen weights: a trained matrix keeps float32 master weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class _FrozenMatmul(torch.autograd.Function):
    """y = x @ W(.T) with W stored in another dtype and frozen: W is widened to x's dtype for the
    product and again for the backward's grad_x; only the stored W is kept for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.transposed = transposed
        w = weight.to(x.dtype)
        return x @ (w.t() if transposed else w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        w = weight.to(grad.dtype)
        return grad @ (w if ctx.transposed else w.t()), None, None


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    y = _FrozenMatmul.apply(x, self.weight, True)  # nn.Linear: x @ W.T
    return y if self.bias is None else y + self.bias


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape[:-1] + (self.nf,)
    y = _FrozenMatmul.apply(x.reshape(-1, x.shape[-1]), self.weight, False)  # Conv1D: x @ W
    return (y + self.bias).view(shape)


def _embedding_forward(self, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                       self.scale_grad_by_freq, self.sparse).to(self.compute_dtype)


@functools.cache
def _widening(cls: type, forward) -> type:
    return type(f"{cls.__name__}StoredLow", (cls,), {"forward": forward})


def _forward_of(module: torch.nn.Module):
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return _linear_forward
    if isinstance(module, Conv1D):
        return _conv1d_forward
    if isinstance(module, torch.nn.Embedding):
        return _embedding_forward
    return None


def compute_in(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`model` (frozen, its matrices in a narrower dtype) computing in `dtype`, in place: linear
    and embedding matrices stay stored as they are and are widened layer by layer; every other
    parameter and buffer is converted to `dtype`. Returns `model`."""
    kept = set()
    for module in model.modules():
        forward = _forward_of(module)
        w = getattr(module, "weight", None)
        if forward is None or not isinstance(w, torch.Tensor) or w.dtype == dtype:
            continue
        if w.requires_grad:
            raise ValueError(f"{type(module).__name__}: only frozen weights can be stored in "
                             f"{w.dtype} and computed in {dtype}")
        module.__class__ = _widening(type(module), forward)
        module.compute_dtype = dtype
        kept.add(id(w))
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in kept and p.is_floating_point() and p.dtype != dtype:
                setattr(module, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)
    return model


def stored_low(model: torch.nn.Module) -> bool:
    """Whether compute_in has made some of `model`'s layers widen their weights."""
    return any(type(m).__name__.endswith("StoredLow") for m in model.modules())
