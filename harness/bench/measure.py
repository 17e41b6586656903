"""Measuring one case: both paths step by step on the same batches (tokens/s, MFU against the
fp32 matmul rate measured in the run), peak RSS in a child process per path (memory.py), and the
profiler."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from harness import data as hdata
from harness import device as hdevice
from harness.bench import agree, trl_path
from harness.bench.cases import CASES, Case, available, load, load_items
from harness.bench.memory import add_peak_rss, run_child
from harness.bench.paths import PATHS, make_path
from harness.config import RunConfig


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


def bench_case(case: Case, steps: int, warmup: int, rate: float, memory: bool,
               trl: bool = False) -> dict:
    """Both paths on the same batches, interleaved step by step, and with `trl` TRL's DPOTrainer
    on them in a child process; raises PathsDisagree (and reports no timing) unless agree.py's
    guard holds."""
    if steps < 1 or steps + warmup < agree.GUARD_STEPS:
        raise ValueError(f"steps {steps}, warm-up {warmup}: at least 1 measured step and "
                         f"{agree.GUARD_STEPS} in all (the agreement guard compares step "
                         f"{agree.GUARD_STEPS}'s losses)")
    model, bats, cfg, n_params = load(case, 8 * (steps + warmup))
    if len(bats) < steps + warmup:
        raise RuntimeError(f"{case.name}: only {len(bats)} batches of seed data")
    paths = [make_path(name, model, cfg, bats) for name in PATHS]
    naive, rows, harness = paths  # PATHS' order: the first is the one the others are checked against
    tol = agree.tolerances(case.bf16)
    first = bats[0][1]
    counted = first["loss_mask"][:, 1:].sum(-1)
    naive_logps = naive.logps(first)
    harness_logps = harness.logps(first)
    checks = [agree.logps_check(naive_logps, harness_logps, counted, cfg.dpo.reduction, tol.logp),
              agree.logps_check(naive_logps, rows.logps(first), counted, cfg.dpo.reduction,
                                tol.logp, path="rows")]
    agree.require(case.name, checks)  # before spending any step on a path that scores otherwise
    run = run_steps(case.name, paths, bats[: steps + warmup], warmup, checks, tol)
    result = report_case(case, run, checks, harness.cache_s, n_params, rate)
    if memory:
        add_peak_rss(result, case, cfg)
    if trl:
        del paths, naive, rows, harness, model  # the child's memory is its own, but the machine's is shared
        gc.collect()
        add_trl(result, case, cfg, run, harness_logps, counted, tol, rate)
    return result


def add_trl(result: dict, case: Case, cfg: RunConfig, run: dict, harness_logps, counted, tol,
            rate: float) -> None:
    """TRL's DPOTrainer on the same batches (a child process): its agreement checks, its row
    and the ratios harness / trl of tokens/s and peak RSS; or why the case has none."""
    reason = trl_path.mismatch(case)
    if reason:
        result["trl_skipped"] = reason
        return
    out = run_child(case, cfg, "trl", len(run["losses"]["harness"]))  # trl_path.child_main's
    checks = trl_path.checks(out, harness_logps, counted, run["losses"]["harness"],
                             case.reduction, tol)
    agree.require(case.name, checks)
    result["agreement"] += [c.record() for c in checks]
    result["losses"]["trl"] = out["losses"]
    fpt = (8 if case.reference == "model" else 6) * result["n_params"]
    h = result["paths"]["harness"]
    t = result["paths"]["trl"] = trl_path.report(out, result["warmup"], run["tokens"], fpt, rate)
    result["speedup_vs_trl"] = h["tokens_per_s"] / t["tokens_per_s"]
    if "peak_rss_gb" in h:
        result["rss_ratio_vs_trl"] = h["peak_rss_gb"] / t["peak_rss_gb"]


def run_steps(name: str, paths: list, bats: list, warmup: int, checks: list, tol) -> dict:
    """Every batch through every path (the order reverses each step); a step's time is all of
    one optimizer step: forward, backward, the gradient norm (a run clips with it), the update.
    Appends each path's gradient-norm (step 1) and loss checks against the first (naive) path
    to `checks`, raising as soon as one fails."""
    losses: dict[str, list[float]] = {p.name: [] for p in paths}
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    run: dict[str, list[int]] = {p.name: [] for p in paths}
    tokens: list[int] = []
    norms: dict[str, float] = {}
    base, others = paths[0].name, [p.name for p in paths[1:]]
    for i, (idx, batch) in enumerate(bats):
        for p in paths if i % 2 == 0 else paths[::-1]:
            t0 = time.perf_counter()
            loss, norm = p.step(idx, batch)
            dt = time.perf_counter() - t0
            losses[p.name].append(loss)
            if i == 0:
                norms[p.name] = norm
            if i >= warmup:
                times[p.name].append(dt)
                run[p.name].append(p.tokens_run(batch))
        if i == 0:
            checks += [agree.grad_norm_check(norms[base], norms[o], tol.grad_norm, path=o)
                       for o in others]
        loss = [agree.loss_check(losses[base], losses[o], tol.loss, path=o) for o in others]
        agree.require(name, [*checks, *loss])
        if i >= warmup:
            tokens.append(int(batch["attention_mask"].sum()))
    checks += loss
    return {"losses": losses, "times": times, "tokens": tokens, "tokens_run": run}


def report_case(case: Case, run: dict, checks: list, cache_s: float, n_params: int,
                rate: float) -> dict:
    losses, times, tokens = run["losses"], run["times"], run["tokens"]
    result = {"case": asdict(case), "n_params": n_params, "steps": len(tokens),
              "warmup": len(losses["naive"]) - len(tokens),
              "tokens_per_step": statistics.mean(tokens), "cache_build_s": cache_s, "paths": {},
              "losses": losses, "agreement": [c.record() for c in checks],
              "loss_max_abs_diff": max(c.diff for c in checks if c.quantity == "loss")}
    if case.bf16:
        result["bf16_logp_max_abs_diff"] = checks[0].diff
    flops_per_token = (8 if case.reference == "model" else 6) * n_params
    naive_flops_per_token = 8 * n_params  # the notebook always runs the reference
    for name in PATHS:
        # tokens/s counts each pair's tokens as two rows (the work asked of every path); MFU
        # counts the positions the path's forward actually runs (each prompt once when shared).
        tps = sum(tokens) / sum(times[name])
        fpt = naive_flops_per_token if name == "naive" else flops_per_token
        run_tps = sum(run["tokens_run"][name]) / sum(times[name])
        result["paths"][name] = {
            "step_s": statistics.median(times[name]), "tokens_per_s": tps,
            "mfu": run_tps * fpt / rate, "tokens_run_per_step": statistics.mean(run["tokens_run"][name]),
            "roofline_tokens_per_s": rate / fpt,
        }
    h, n = result["paths"]["harness"], result["paths"]["naive"]
    result["speedup"] = h["tokens_per_s"] / n["tokens_per_s"]
    result["share_prompt_speedup"] = h["tokens_per_s"] / result["paths"]["rows"]["tokens_per_s"]
    result["roofline_fraction"] = h["mfu"]
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
            "torch": torch.__version__, "python": platform.python_version(),
            "capability": hdevice.capability(torch.device("cpu"))}


