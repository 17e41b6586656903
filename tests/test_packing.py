"""Prompt sharing (harness/packing.py): one row per pair scores every sequence as the two-row
layout does, its gradients are the same, a rejected token never sees the chosen response, and
models it cannot run exactly fall back to two rows."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from harness import packing
from harness.data import TokenizedPair, collate
from harness.dpo import model_logps
from harness.step import concatenated_logps

# prompt, chosen, rejected lengths: a one-token prompt, a one-token response, longer either side
SHAPES = [(5, 3, 7), (9, 4, 1), (1, 6, 6), (12, 2, 9)]


def _pairs(seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(1, 250, (n,), generator=g).tolist())

    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in SHAPES]


def _model(kind: str, attention: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0, attn_implementation=attention)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                         eos_token_id=0, attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


MODELS = [(k, a) for k in ("gpt2", "llama") for a in ("sdpa", "eager")]


def _other_model(kind: str):
    """A tiny model of another family harness.dpo.HEAD_SLICE_MODEL_TYPES names (sdpa)."""
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 0, "eos_token_id": 0,
              "pad_token_id": 0,
              "attn_implementation": "sdpa"}
    config, model = {
        "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    }[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    cfg = getattr(transformers, config)(**common, **extra)
    return getattr(transformers, model)(cfg).eval()


def test_pack_by_hand():
    """Pair (prompt 7 8, chosen 1 2, rejected 3): row 7 8 1 2 3, the rejected token at position
    2 (right after the prompt), scored from position 1 (the prompt's last token)."""
    batch = collate([TokenizedPair((7, 8), (1, 2), (3,)), TokenizedPair((9,), (4,), (5, 6))], 0, True)
    p = packing.pack(batch)
    assert p.input_ids.tolist() == [[7, 8, 1, 2, 3], [9, 4, 5, 6, 0]]
    assert p.position_ids.tolist()[0] == [0, 1, 2, 3, 2]
    assert p.position_ids.tolist()[1][:4] == [0, 1, 1, 2]
    assert p.segments.tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 2, -1]]
    # scored tokens (row, position, target): chosen 1 2, rejected 3; chosen 4, rejected 5 6
    scored = list(zip(p.rows.tolist(), p.positions.tolist(), p.targets.tolist(), strict=True))
    assert scored == [(0, 1, 1), (0, 2, 2), (0, 1, 3), (1, 0, 4), (1, 0, 5), (1, 2, 6)]
    assert p.sequences.tolist() == [0, 0, 2, 1, 3, 3]
    mask = packing.attention_mask(p.segments)[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True]  # rejected: prompt + itself
    assert mask[3].tolist() == [True, True, True, True, False]  # chosen: prompt + chosen so far
    pad_row = packing.attention_mask(p.segments)[1, 0, 4]
    assert pad_row.tolist() == [True, False, False, False, True]  # padding: the prompt and itself


def test_unmasked_prompt_scored_once_counted_twice():
    batch = collate([TokenizedPair((7, 8, 9), (1,), (2,))], 0, mask_prompt=False)
    p = packing.pack(batch)
    assert p.targets.tolist() == [8, 9, 1, 2]  # prompt tokens 8, 9 scored once
    assert p.terms.tolist() == [0, 1, 2, 0, 1, 3]
    assert p.sequences.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("kind,attention", MODELS)
@pytest.mark.parametrize("mask_prompt", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_packed_logps_equal_two_rows(kind, attention, mask_prompt, reduction):
    model = _model(kind, attention)
    batch = collate(_pairs(), 0, mask_prompt)
    assert packing.supported(model)
    with torch.no_grad():
        rows = model_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                           reduction)
        packed = packing.packed_logps(model, packing.pack(batch), reduction)
    torch.testing.assert_close(packed, rows, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "olmo2"])
def test_every_family_packing_claims_scores_as_two_rows(kind):
    """Every other architecture `supported` accepts gives the two-row log-probs packed."""
    model = _other_model(kind)
    assert model.config.model_type == kind and packing.supported(model)
    batch = collate(_pairs(), 0, False)
    with torch.no_grad():
        rows = model_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], "sum")
        packed = packing.packed_logps(model, packing.pack(batch), "sum")
    torch.testing.assert_close(packed, rows, atol=2e-5, rtol=1e-6)


def test_a_sliding_window_runs_two_rows():
    """Mistral's default 4,096-token window: a custom mask would replace it."""
    import transformers

    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     attn_implementation="sdpa")
    assert cfg.sliding_window and not packing.supported(transformers.MistralForCausalLM(cfg))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packed_gradients_equal_two_rows(kind):
    """The gradient of a DPO-like objective through both layouts: the prompt's activations
    receive the chosen and the rejected response's gradients in one row."""
    batch = collate(_pairs(), 0, True)
    grads = []
    for share in (False, True):
        model = _model(kind, "sdpa")
        c, r = concatenated_logps(model, batch, "sum", share_prompt=share)
        (-torch.nn.functional.logsigmoid(0.1 * (c - 2 * r)).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    assert grads[0].abs().max() > 1e-4  # the loss reached the weights


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rejected_never_sees_the_chosen_response(kind):
    """Changing a pair's chosen tokens changes its chosen log-prob and leaves its rejected one
    as it was (the attention mask, not just the positions, keeps the responses apart)."""
    model = _model(kind, "sdpa")
    pairs = _pairs()
    other = [TokenizedPair(p.prompt_ids, tuple((t + 17) % 250 + 1 for t in p.chosen_ids), p.rejected_ids)
             for p in pairs]
    with torch.no_grad():
        a = packing.packed_logps(model, packing.pack(collate(pairs, 0, True)), "sum")
        b = packing.packed_logps(model, packing.pack(collate(other, 0, True)), "sum")
    B = len(pairs)
    assert (a[:B] - b[:B]).abs().min() > 1e-3
    torch.testing.assert_close(a[B:], b[B:], atol=1e-5, rtol=0)


def test_unsupported_models_run_two_rows(monkeypatch):
    """Flash attention takes no custom mask, and unknown architectures may scale their logits:
    both run the two-row layout, whatever share_prompt says."""
    batch = collate(_pairs(), 0, True)
    model = _model("llama", "sdpa")
    assert packing.supported(model)
    monkeypatch.setattr(packing, "ATTENTION", {"eager"})  # as flash attention is
    assert not packing.supported(model)
    monkeypatch.setattr(packing, "packed_logps", lambda *a: pytest.fail("packed an unsupported model"))
    with torch.no_grad():
        c, r = concatenated_logps(model, batch, "mean", share_prompt=True)
    assert c.shape == r.shape == (len(SHAPES),)
    monkeypatch.undo()
    model = _model("gpt2", "sdpa")
    model.config.model_type = "gemma2"  # soft-capped logits
    assert not packing.supported(model)


def test_rows_with_different_prompts_refused():
    batch = collate(_pairs(), 0, True)
    batch["input_ids"][len(SHAPES), 0] += 1  # rejected row of pair 0
    with pytest.raises(ValueError, match="pair 0 of the batch: .*different prompts"):
        packing.pack(batch)


def test_reference_cache_keeps_the_layouts_apart(tmp_path):
    """Cached reference log-probs are keyed on the layout that computed them (they differ in
    rounding): a two-row run does not read a shared-prompt run's cache, and each reads its own."""
    import dataclasses

    from harness.config import DPOConfig
    from harness.reference import cached_logps
    from harness.step import StepSettings

    model = _model("gpt2", "sdpa")
    splits = {"train": _pairs(1), "val": _pairs(2)}
    shared = StepSettings(DPOConfig(reduction="sum"), precision="fp32", batch_size=2)
    rows = dataclasses.replace(shared, share_prompt=False)
    run = [cached_logps(model, splits, s, 0, "cpu", root=str(tmp_path), progress=False)
           for s in (shared, rows, shared)]
    (a, path_a, reused_a), (b, path_b, reused_b), (_, path_c, reused_c) = run
    assert path_a != path_b and path_c == path_a
    assert (reused_a, reused_b, reused_c) == (False, False, True)
    for split in splits:
        torch.testing.assert_close(a[split], b[split], atol=2e-5, rtol=1e-6)
