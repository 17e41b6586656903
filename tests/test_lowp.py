"""Frozen weights stored in bf16 and computed in fp32 (model.dtype bfloat16 in an fp32 run): the
same numbers as the bf16-rounded weights widened whole, the matrices staying bf16, gradients
through them right, and a trained weight refused."""

import copy

import pytest
import torch

from harness import lowp
from harness.models import build_tiny_model, frozen_copy, train_tokenizer
from harness.prepare import prepare
from harness.step import StepSettings
from harness.train import build_models, micro_batches
from tests.runs import quick_config
from tests.test_lora import _logps

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea"] * 20


def _tiny(name="tiny-xs"):
    tok = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    return build_tiny_model(name, len(tok), 64, tok.eos_token_id, tok.pad_token_id).eval()


def test_widened_layers_compute_what_the_rounded_weights_compute_in_fp32():
    """A bf16 frozen copy computing in fp32 gives the logits of the same bf16-rounded weights
    widened to float32 whole (to float rounding); its linear and embedding matrices stay bf16
    (half the bytes), its norms and biases are float32."""
    model = _tiny()
    low = lowp.compute_in(frozen_copy(model, torch.bfloat16))
    wide = frozen_copy(model, torch.bfloat16).float()
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    torch.testing.assert_close(low(ids).logits, wide(ids).logits, rtol=1e-5, atol=1e-5)
    assert low.transformer.wte.weight.dtype == torch.bfloat16
    assert low.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert low.transformer.ln_f.weight.dtype == torch.float32
    assert low(ids).logits.dtype == torch.float32 and lowp.stored_low(low)
    low_bytes = sum(p.numel() * p.element_size() for p in low.parameters())
    assert low_bytes < 0.6 * sum(p.numel() * 4 for p in low.parameters())


def test_gradients_flow_through_widened_frozen_layers():
    """The input gradient through a bf16-stored frozen model equals the widened model's: the
    backward widens the stored matrix too (no float32 copy kept for it)."""
    model = _tiny()
    low = lowp.compute_in(frozen_copy(model, torch.bfloat16))
    wide = frozen_copy(model, torch.bfloat16).float()
    grads = []
    for m in (low, wide):
        x = m.transformer.wte(torch.tensor([[3, 5, 7, 9]])).detach().float().requires_grad_(True)
        m(inputs_embeds=x).logits.pow(2).mean().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_trained_weights_are_refused():
    """Only frozen weights may be stored narrow: a trainable bf16 matrix is an error naming it."""
    model = copy.deepcopy(_tiny()).to(torch.bfloat16)
    with pytest.raises(ValueError, match="only frozen weights"):
        lowp.compute_in(model)


def test_lora_on_a_bf16_stored_base_in_an_fp32_run(seed_data, tmp_path):
    """model.dtype bfloat16 with train.precision fp32: the LoRA base stays bf16 and computes in
    fp32; at step 0 the policy's log-probs equal the reference's exactly; the adapters are fp32."""
    cfg = quick_config(seed_data, tmp_path, **{"train.precision": "fp32", "model.dtype": "bfloat16",
                                               "model.lora.r": 8})
    prep = prepare(cfg, torch.device("cpu"), lambda *a: None)
    s = StepSettings.from_config(cfg)
    m = build_models(cfg, prep, s, torch.device("cpu"))
    trained = {p.dtype for p in m.policy.parameters() if p.requires_grad}
    frozen_matrices = {p.dtype for p in m.policy.parameters() if not p.requires_grad and p.dim() == 2}
    assert trained == {torch.float32} and frozen_matrices == {torch.bfloat16}
    _, batch, _ = next(micro_batches(cfg, prep.splits["train"], prep.tokenizer.pad_token_id))
    pol = _logps(m.policy, batch, s)
    assert pol.dtype == torch.float32 and torch.equal(pol, _logps(m.step_reference, batch, s))
    assert m.info["state/weights_gb"] < 0.6 * m.info["n_params"] * 4 / 1e9
