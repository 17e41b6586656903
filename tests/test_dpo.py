"""The DPO math: log-probs, losses, and equivalence with the seed notebook's naive path."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from harness import dpo
from harness.config import DPOConfig


def naive_logps(logits, input_ids, loss_mask, reduction):
    """The plain reference: a full log_softmax over [B, T, V], then gather."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = lp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = loss_mask[:, 1:].float()
    s = (picked * m).sum(-1)
    return s if reduction == "sum" else s / m.sum(-1)


# ----------------------------------------------------------------------------- log-probs


def test_sequence_logps_by_hand():
    """Two-token vocabulary worked by hand: p(1) = 3/4 after token 0, p(1) = 1/2 after token 1.

    Sequence [0, 1, 1]; counting both response tokens: sum = ln(3/4) + ln(1/2) = ln 0.375,
    mean = ln(0.375) / 2. Masking the first as prompt leaves ln(1/2) for both reductions.
    """
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1, 1]])
    both = torch.tensor([[False, True, True]])
    last = torch.tensor([[False, False, True]])
    assert dpo.sequence_logps(logits, ids, both, "sum").item() == pytest.approx(math.log(0.375))
    assert dpo.sequence_logps(logits, ids, both, "mean").item() == pytest.approx(math.log(0.375) / 2)
    assert dpo.sequence_logps(logits, ids, last, "sum").item() == pytest.approx(math.log(0.5))
    assert dpo.sequence_logps(logits, ids, last, "mean").item() == pytest.approx(math.log(0.5))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_matches_log_softmax_with_gradients(reduction, monkeypatch):
    """logsumexp+gather (chunked, float32) equals log_softmax+gather to 1e-5, values and grads.

    CHUNK_ROWS is set small so that the chunked path really runs over several chunks.
    """
    monkeypatch.setattr(dpo, "CHUNK_ROWS", 7)
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 13, 97
    logits = (torch.randn(B, T, V, generator=g) * 3).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = False
    mask[:, 5] = True  # every row counts at least one token
    ours = dpo.sequence_logps(logits, ids, mask, reduction)
    (g1,) = torch.autograd.grad(ours.sum(), logits)
    ref = naive_logps(logits, ids, mask, reduction)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_bf16_logits_are_scored_in_float32():
    """bf16 logits (autocast on cuda) are upcast before logsumexp: the result is float32."""
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = dpo.sequence_logps(logits, ids, mask, "sum")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logps(logits.float(), ids, mask, "sum"))


def tiny_models():
    torch.manual_seed(0)
    yield GPT2LMHeadModel(GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    torch.manual_seed(0)
    yield LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=32))
    torch.manual_seed(0)
    # gpt_neo is not in HEAD_SLICE_MODEL_TYPES: exercises the full-logits fallback.
    yield GPTNeoForCausalLM(GPTNeoConfig(vocab_size=61, max_position_embeddings=32, hidden_size=16,
                                         num_layers=2, num_heads=2, attention_types=[[["global"], 2]]))


def padded_batch(V=61, B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([12, 9, 6])
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * attn  # pad id 0 on the right
    loss_mask = attn.bool() & (torch.arange(T)[None] >= 3)  # prompt of 3 tokens
    return ids, attn, loss_mask


@pytest.mark.parametrize("model", list(tiny_models()), ids=["gpt2", "llama", "gpt_neo"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_model_logps_equals_full_forward(model, reduction):
    """Running the LM head only on counted positions gives the full forward's log-probs and grads."""
    model.eval()  # dropout off, as in a DPO run: both forwards score the same function
    ids, attn, mask = padded_batch()
    ours = dpo.model_logps(model, ids, attn, mask, reduction)
    g1 = torch.autograd.grad(ours.sum(), list(model.parameters()))
    ref = naive_logps(model(input_ids=ids, attention_mask=attn).logits, ids, mask, reduction)
    g2 = torch.autograd.grad(ref.sum(), list(model.parameters()))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- losses

# One pair worked by hand: log π(y_w) = −1, log π(y_l) = −2, log π_ref = −1.5 for both,
# so h = (−1 + 1.5) − (−2 + 1.5) = 1.0 and with β = 0.1, β·h = 0.1.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))


@pytest.mark.parametrize(
    "name,smoothing,expected",
    [
        ("sigmoid", 0.0, math.log(1 + math.exp(-0.1))),  # −log σ(0.1) = 0.644397
        # conservative DPO, ε = 0.2: 0.8·(−log σ(0.1)) + 0.2·(−log σ(−0.1))
        ("sigmoid", 0.2, 0.8 * math.log(1 + math.exp(-0.1)) + 0.2 * math.log(1 + math.exp(0.1))),
        ("ipo", 0.0, (1.0 - 1 / (2 * 0.1)) ** 2),  # (h − 1/(2β))² = (1 − 5)² = 16
        ("hinge", 0.0, 0.9),  # max(0, 1 − β·h) = 0.9
    ],
)
def test_losses_by_hand(name, smoothing, expected):
    """Each registered loss on the hand-worked pair; rewards are β·(log π − log π_ref)."""
    losses, chosen, rejected = dpo.dpo_loss(PC, PR, RC, RR, DPOConfig(beta=0.1, loss=name,
                                                                      label_smoothing=smoothing))
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.item() == pytest.approx(0.05)
    assert rejected.item() == pytest.approx(-0.05)
    assert not chosen.requires_grad


@pytest.mark.parametrize("name", sorted(dpo.LOSSES))
def test_every_registered_loss_has_its_true_gradient(name):
    """Each loss's autograd gradient w.r.t. the policy's chosen and rejected log-probs equals the
    central finite difference of the loss itself (float64, torch's gradcheck): no detached term,
    no custom backward that drifts from the value. The points are spread so hinge's kink and
    DPOP's penalty switch are not hit; the gradient must also be non-zero somewhere."""
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (3 * torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(4))

    def per_pair(chosen, rejected):
        return dpo.dpo_loss(chosen, rejected, rc, rr, DPOConfig(beta=0.3, loss=name),
                            chosen_nll=-chosen)[0]  # per-token NLL of mean-reduced log-probs

    inputs = (pc.clone().requires_grad_(), pr.clone().requires_grad_())
    assert torch.autograd.gradcheck(per_pair, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    (gc,) = torch.autograd.grad(per_pair(*inputs).sum(), inputs[0])
    assert gc.abs().sum() > 0, name


def test_loss_at_equal_policy_and_reference_is_log2():
    """At initialisation (π = π_ref) h = 0, so the sigmoid loss is ln 2 = 0.693 for any β."""
    x = torch.randn(4)
    losses, c, r = dpo.dpo_loss(x, x - 1, x, x - 1, DPOConfig(beta=0.5))
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)))
    assert (c == 0).all() and (r == 0).all()


def test_unknown_loss_lists_valid_names():
    """An unknown loss name is an error naming every valid one."""
    with pytest.raises(ValueError, match="apo_zero, dpop, hinge, ipo, robust, sft, sigmoid, simpo"):
        DPOConfig(beta=0.1, loss="kto")


@pytest.mark.parametrize("name", [n for n, s in dpo.LOSSES.items() if not s.uses_label_smoothing])
def test_label_smoothing_only_for_sigmoid_and_robust(name):
    """label_smoothing with a loss that ignores it is an error, not a silent no-op."""
    with pytest.raises(ValueError, match="sigmoid and robust"):
        DPOConfig(beta=0.1, loss=name, label_smoothing=0.1)


def test_pair_metrics_margins_with_and_without_beta():
    """rewards/margins carries β; logratios/margins is the notebook's margin (without β)."""
    losses, c, r = dpo.dpo_loss(PC, PR, RC, RR, DPOConfig(beta=0.1))
    m = dpo.pair_metrics(losses, c, r, PC, PR, beta=0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.1)
    assert m["logratios/margins"].item() == pytest.approx(1.0)
    assert m["rewards/accuracies"].item() == 1.0
