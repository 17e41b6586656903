"""`harness bench --gen`: sampling speed of harness.generate.sample (batched, KV cache, each row
stopped at its eos) against transformers' `model.generate(do_sample=True)` on the same prompts.

Both sample from the model's distribution exactly (temperature 1, no top-k / top-p), from the
same left-padded batch of the first train prompts of the seed data, up to the same number of
new tokens. A generated token is one of a row's continuation up to and including its eos (what
`sample` returns; `generate` pads the rows that finished first, and those pads are not counted).
Both draw with torch.multinomial from the same probabilities and the same seed, so they are
expected to draw the same tokens and so do the same work: the report says whether they did
(`same_samples`). Runs alternate between the two after one short warm-up of each.
"""

from __future__ import annotations

import statistics
import time

import torch

from harness import models as hmodels
from harness.bench.cases import CASES, available, load_items
from harness.generate import sample, until_eos

GEN_CASES = {"tiny-s": CASES["tiny-live-mean"], "SmolLM2-135M-Instruct": CASES["smollm2-live-mean"]}
GEN_PROMPTS = 8  # prompts in the batch: the first train prompts of the seed data
GEN_TOKENS = 64  # new tokens at most per prompt
GEN_REPEATS = 3  # timed runs of each, alternating


def load_gen(name: str, n_prompts: int):
    """(model, tokenizer, prompts): tiny-s (its own trained tokenizer, seeded initial weights)
    or SmolLM2, and the first `n_prompts` train prompts as token ids."""
    cfg, tokenizer, items = load_items(GEN_CASES[name], n_prompts)
    torch.manual_seed(0)
    model, _ = hmodels.load_model(cfg.model, tokenizer, cfg.data.max_length)
    return model.eval(), tokenizer, [list(p.prompt_ids) for p in items[:n_prompts]]


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                seed: int) -> list[list[int]]:
    """transformers' sampling on the same left-padded batch: continuations up to their eos."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
                         eos_token_id=eos_id, pad_token_id=pad_id)
    return [until_eos(row, eos_id) for row in out[:, P:].tolist()]


def time_gen(model, prompts, eos_id: int, pad_id: int, max_new_tokens: int, repeats: int) -> dict:
    """Generated tokens and seconds of each sampler over `repeats` alternating runs."""
    samplers = {
        "harness": lambda s, n: sample(model, prompts, n, eos_id, pad_id, s, torch.device("cpu")),
        "transformers": lambda s, n: hf_generate(model, prompts, n, eos_id, pad_id, s),
    }
    for run in samplers.values():
        run(0, 4)  # warm-up
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in samplers}
    same = True
    for r in range(repeats):
        drawn = {}
        for name in (list(samplers) if r % 2 == 0 else list(samplers)[::-1]):
            t0 = time.perf_counter()
            drawn[name] = samplers[name](r + 1, max_new_tokens)
            runs[name].append((sum(len(row) for row in drawn[name]), time.perf_counter() - t0))
        same = same and drawn["harness"] == drawn["transformers"]
    out: dict = {"same_samples": same}
    for name, rs in runs.items():
        tokens, seconds = sum(n for n, _ in rs), sum(s for _, s in rs)
        out[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "median_run_s": statistics.median(s for _, s in rs)}
    out["ratio"] = out["harness"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    return out


def bench_gen(names: list[str], n_prompts: int = GEN_PROMPTS, max_new_tokens: int = GEN_TOKENS,
              repeats: int = GEN_REPEATS) -> tuple[list[dict], dict[str, str]]:
    """(a result per model that can run here, {model: why it cannot})."""
    results, skipped = [], {}
    for name in names:
        reason = available(GEN_CASES[name])
        if reason:
            skipped[name] = reason
            continue
        model, tok, prompts = load_gen(name, n_prompts)
        timing = time_gen(model, prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens, repeats)
        results.append({"model": name, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                        "repeats": repeats, **timing})
    return results, skipped


def gen_table(results: list[dict]) -> str:
    lines = [f"{'model':24} {'sampler':13} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ratio':>7}"]
    for r in results:
        for name in ("transformers", "harness"):
            p = r[name]
            ratio = f"{r['ratio']:.2f}x" if name == "harness" else ""
            lines.append(f"{r['model']:24} {name:13} {p['tokens']:7d} {p['seconds']:8.2f} "
                         f"{p['tokens_per_s']:8.1f} {ratio:>7}")
        same = "the same tokens" if r["same_samples"] else "different tokens"
        lines.append(f"{r['model']}: both samplers drew {same} from the same seeds")
    return "\n".join(lines)
