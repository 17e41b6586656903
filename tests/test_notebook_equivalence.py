"""The harness's DPO step equals the seed notebook's naive path on a tiny random model.

The naive path is written out here as the "DPO from scratch" notebook does it: four separate
forward passes (policy and reference, chosen and rejected), a full log_softmax over the
vocabulary, the mean log-prob over response tokens (prompt masked), and its loss
−log σ(β·h). The harness (harness.step.dpo_batch) uses one concatenated pass, logsumexp+gather on
counted positions only. Both are compared before and after an optimizer step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from harness.config import DPOConfig
from harness.step import StepSettings, dpo_batch


def notebook_compute_logprobs(logits, labels, selection_mask):
    """The notebook's compute_logprobs (labels shifted, full log_softmax, masked mean)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:].clone()
    selected = selected * mask
    return selected.sum(-1) / mask.sum(-1)


def notebook_dpo_loss(pc, pr, rc, rr, beta):
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits)
    return losses.mean(), (pc - rc).detach().mean(), (pr - rr).detach().mean()


def notebook_batch_loss(policy, reference, batch, beta):
    """Four forward passes, as the notebook's compute_dpo_loss_batch."""
    pc = notebook_compute_logprobs(policy(batch["chosen"]).logits, batch["chosen"], batch["chosen_mask"])
    pr = notebook_compute_logprobs(policy(batch["rejected"]).logits, batch["rejected"], batch["rejected_mask"])
    with torch.no_grad():
        rc = notebook_compute_logprobs(reference(batch["chosen"]).logits, batch["chosen"], batch["chosen_mask"])
        rr = notebook_compute_logprobs(reference(batch["rejected"]).logits, batch["rejected"], batch["rejected_mask"])
    return notebook_dpo_loss(pc, pr, rc, rr, beta)


def make_batch(V, B=4, seed=0):
    """Random pairs (each pair's prompt shared by its two rows) with prompts of different
    lengths, responses right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 8, 3, 6][:B]
    chosen_lens = [7, 2, 9, 4][:B]
    rejected_lens = [3, 6, 5, 8][:B]
    T = max(p + max(c, r) for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens, strict=True))
    prompts = [torch.randint(1, V, (p,), generator=g) for p in prompt_lens]
    rows, masks, attn = [], [], []
    for lens in (chosen_lens, rejected_lens):
        for prompt, p, n in zip(prompts, prompt_lens, lens, strict=True):
            ids = torch.zeros(T, dtype=torch.long)
            ids[:p] = prompt
            ids[p : p + n] = torch.randint(1, V, (n,), generator=g)
            m = torch.zeros(T, dtype=torch.bool)
            m[p : p + n] = True
            a = torch.zeros(T, dtype=torch.long)
            a[: p + n] = 1
            rows.append(ids), masks.append(m), attn.append(a)
    ids, masks, attn = torch.stack(rows), torch.stack(masks), torch.stack(attn)
    harness_batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": masks,
                     "prompt_lens": torch.tensor(prompt_lens * 2)}
    notebook = {"chosen": ids[:B], "rejected": ids[B:], "chosen_mask": masks[:B], "rejected_mask": masks[B:]}
    return harness_batch, notebook


def tiny_policy_and_reference():
    """A random tiny GPT-2 and a frozen reference 0.05·noise away from it (so the loss is not
    trivially ln 2)."""
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def harness_loss(policy, reference, hb, beta):
    s = StepSettings(DPOConfig(beta=beta, loss="sigmoid", mask_prompt=True, reduction="mean"),
                     precision="fp32")
    idx = torch.arange(hb["input_ids"].shape[0] // 2)  # rows 0..B-1 chosen, B..2B-1 rejected
    losses, metrics = dpo_batch(policy, reference, None, idx, hb, s, torch.device("cpu"))
    return losses.mean(), metrics


def compare(policy_h, policy_n, reference, hb, nb, beta):
    """Loss, rewards (the notebook's carry no β) and gradients of one batch, harness vs notebook,
    each on its own copy of the policy. Returns the loss and the gradients of both paths."""
    ours, metrics = harness_loss(policy_h, reference, hb, beta)
    g_ours = torch.autograd.grad(ours, list(policy_h.parameters()))
    nb_loss, nb_chosen, nb_rejected = notebook_batch_loss(policy_n, reference, nb, beta)
    g_nb = torch.autograd.grad(nb_loss, list(policy_n.parameters()))

    assert ours.item() == pytest.approx(nb_loss.item(), abs=1e-6)
    assert ours.item() != pytest.approx(0.693147, abs=1e-3)  # a non-trivial comparison
    assert metrics["rewards/chosen"].mean().item() == pytest.approx(beta * nb_chosen.item(), abs=1e-6)
    assert metrics["rewards/rejected"].mean().item() == pytest.approx(beta * nb_rejected.item(), abs=1e-6)
    assert metrics["logratios/margins"].mean().item() == pytest.approx(
        (nb_chosen - nb_rejected).item(), abs=1e-5)
    for a, b in zip(g_ours, g_nb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    return ours.item(), g_ours, g_nb


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_harness_step_matches_notebook(beta):
    """harness.step.dpo_batch (frozen reference model, ref_logps=None) gives the notebook's loss,
    rewards and policy gradients on a batch; then each path takes one SGD step on its own copy of
    the policy from its own gradients, and on a second batch the two updated policies still give
    the same loss, rewards and gradients (and the update did change that loss)."""
    policy_h, reference = tiny_policy_and_reference()
    policy_n = copy.deepcopy(policy_h)
    hb1, nb1 = make_batch(97, seed=0)
    hb2, nb2 = make_batch(97, seed=1)
    before, _, _ = compare(copy.deepcopy(policy_h), copy.deepcopy(policy_n), reference, hb2, nb2, beta)

    _, g_ours, g_nb = compare(policy_h, policy_n, reference, hb1, nb1, beta)
    lr = 0.5
    for model, grads in ((policy_h, g_ours), (policy_n, g_nb)):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(policy_h.parameters(), policy_n.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    after, _, _ = compare(policy_h, policy_n, reference, hb2, nb2, beta)
    assert abs(after - before) > 1e-4, "the update changed the second batch's loss"
