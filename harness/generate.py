"""Sampling from a causal LM and the evaluation of generations: reward, KL, win rate.

Samples are drawn from π exactly (temperature 1, no top-k / top-p), so that
    KL(π ‖ π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)]
is estimated without bias by the mean over the policy's own samples (with its standard error).
Log-probs are sequence sums over the continuation tokens (eos included when sampled).
"""

from __future__ import annotations

import functools
import json
import math

import torch

from harness import atomic, cache
from harness.dpo import model_logps
from harness.models import eval_mode


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           seed: int, device) -> list[list[int]]:
    """Continuations of each prompt (token ids, eos included when produced), batched with left
    padding and a KV cache. The same seed gives the same samples."""
    with eval_mode(model):
        return _sample(model, prompts, max_new_tokens, eos_id, pad_id, seed, device)


def _sample(model, prompts, max_new_tokens, eos_id, pad_id, seed, device) -> list[list[int]]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are needed: the prompt pass skips the LM head elsewhere.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _params(model) else {}
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **keep)
    cache_name = "cache" if "cache" in _params(model) and hasattr(out, "cache") else "past_key_values"
    done = torch.zeros(B, dtype=torch.bool)
    drawn = []  # [B] tokens per step; a row's continuation ends at its first eos
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        drawn.append(tok)
        done |= tok == eos_id
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok.to(device)[:, None], attention_mask=attn, position_ids=pos,
                    use_cache=True, **{cache_name: getattr(out, cache_name)}, **keep)
    return [until_eos(row, eos_id) for row in torch.stack(drawn, 1).tolist()] if drawn else [[] for _ in range(B)]


def until_eos(row: list[int], eos_id: int) -> list[int]:
    """A continuation up to and including its first eos (all of it without one)."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def _params(model) -> set[str]:
    """The keyword arguments the model's forward takes (looked up once per model class)."""
    return _forward_params(type(model))


@functools.lru_cache(maxsize=32)
def _forward_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.forward).parameters)


@torch.no_grad()
def continuation_logps(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int,
                       device, batch_size: int = 64) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) of each continuation under `model`: [N] float32."""
    with eval_mode(model):
        return torch.cat([_continuation_logps(model, prompts[s:s + batch_size],
                                              continuations[s:s + batch_size], pad_id, device)
                          for s in range(0, len(prompts), batch_size)])


def _continuation_logps(model, prompts, continuations, pad_id, device) -> torch.Tensor:
    """One batch of continuation_logps: prompt + continuation rows, right-padded."""
    rows = [p + c for p, c in zip(prompts, continuations, strict=True)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        mask[i, len(p):len(r)] = True
    return model_logps(model, ids.to(device), attn.to(device), mask.to(device), "sum").cpu()


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def kl_estimate(policy, reference, prompts, samples, pad_id, device) -> tuple[float, float]:
    """(KL(π‖π_ref) estimate, its standard error) from samples y ~ π of the prompts."""
    lp = continuation_logps(policy, prompts, samples, pad_id, device)
    lr = continuation_logps(reference, prompts, samples, pad_id, device)
    return mean_se((lp - lr).tolist())


def reference_samples(reference, tokenizer, prompt_texts: list[str], max_new_tokens: int, seed: int,
                      device, root: str | None = None, digest: str | None = None
                      ) -> tuple[list[list[int]], bool]:
    """The reference's samples of the eval prompts, drawn once per (reference weights, prompts,
    length, seed, eos/pad) and shared on disk by every run of that reference: every trial of a
    sweep on one SFT checkpoint compares against the same samples. `digest`: the reference's
    weights_digest when the caller has it. Returns (samples, reused)."""
    from harness.reference import weights_digest

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    key = cache.Key(digest or weights_digest(reference), prompts, [max_new_tokens, seed, eos, pad])
    path = cache.entry("reference-samples", key.hex(32), ".samples.json", root=root)

    def read(p):
        samples = json.loads(p.read_text())
        if len(samples) != len(prompts):
            raise ValueError("sample count differs from the prompts'")
        return samples

    def rebuild():
        samples = sample(reference, prompts, max_new_tokens, eos, pad, seed, device)
        atomic.atomic_json(path, samples, indent=None)
        return samples

    with atomic.file_lock(path.with_suffix(".lock")):
        return cache.read_or_rebuild(path, read, rebuild)


def gen_eval(policy, reference, tokenizer, prompt_texts: list[str], reward_fn, max_new_tokens: int,
             seed: int, device, ref_samples: list[list[int]] | None = None,
             parse_fn=None) -> tuple[dict, list, list]:
    """Generation metrics on held-out prompts.

    Returns (metrics, table rows (prompt, reference, policy, rewards), reference samples for reuse).
    With `reward_fn` None (no ground-truth reward) only KL and samples are reported; with
    `parse_fn` (does a sample parse in the task's language) also the fraction that does.
    While the policy's weights equal the reference's (the first eval) its samples are the
    reference's (the same seed: common random numbers) and the KL is exactly 0: neither is
    computed again.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    if ref_samples is None:
        # The same seed as the policy's samples (common random numbers): while the policy is the
        # reference both draw identical samples, and the reward difference has less variance.
        ref_samples = sample(reference, prompts, max_new_tokens, eos, pad, seed, device)
    if same_weights(policy, reference):
        pol, (kl, kl_se) = ref_samples, (0.0, 0.0)
    else:
        pol = sample(policy, prompts, max_new_tokens, eos, pad, seed, device)
        kl, kl_se = kl_estimate(policy, reference, prompts, pol, pad, device)
    metrics = {"gen/kl": kl, "gen/kl_se": kl_se,
               "gen/length": sum(len(s) for s in pol) / len(pol)}

    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t != eos])

    pol_text, ref_text = [text(s) for s in pol], [text(s) for s in ref_samples]
    parsed = None if parse_fn is None else list(map(parse_fn, prompt_texts, pol_text))
    if parsed is not None:
        metrics["gen/parsed"] = sum(parsed) / len(parsed)
    if reward_fn is None:
        return metrics, [[x, yr, yp, None, None] for x, yr, yp in
                         zip(prompt_texts, ref_text, pol_text, strict=True)], ref_samples
    r_pol = rewards(reward_fn, prompt_texts, pol_text)
    r_ref = rewards(reward_fn, prompt_texts, ref_text)
    metrics["gen/reward"], metrics["gen/reward_se"] = mean_se(r_pol)
    if parsed is not None:  # the reward of the samples that parse (nan, logged as null, if none)
        kept = [r for r, ok in zip(r_pol, parsed, strict=True) if ok]
        metrics["gen/reward_parsed"] = sum(kept) / len(kept) if kept else float("nan")
    metrics["gen/ref_reward"] = sum(r_ref) / len(r_ref)
    metrics["gen/win_rate"] = sum(1.0 if a > b else 0.5 if a == b else 0.0
                                  for a, b in zip(r_pol, r_ref, strict=True)) / len(r_pol)
    rows = [[x, yr, yp, rr, rp] for x, yr, yp, rr, rp in
            zip(prompt_texts, ref_text, pol_text, r_ref, r_pol, strict=True)]
    return metrics, rows, ref_samples


def rewards(reward_fn, prompts: list[str], texts: list[str]) -> list[float]:
    """r(x, y) of each prompt and continuation: one batched call where the reward has `batch`
    (a classifier, harness/tasks/imdb.py), else one call per sample (an exact reward)."""
    batch = getattr(reward_fn, "batch", None)
    if batch is not None:
        return [float(r) for r in batch(prompts, texts)]
    return [reward_fn(x, y) for x, y in zip(prompts, texts, strict=True)]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold identical parameters and buffers (bit for bit)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k].to(sa[k].device))
        for k in sa)
