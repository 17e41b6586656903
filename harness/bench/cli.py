"""`harness bench`: the report table, the JSON file and the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness import atomic
from harness.bench import memory, state, trl_path
from harness.bench.agree import GUARD_STEPS, PathsDisagree
from harness.bench.cases import CASES, DEFAULT_CASES, TRL_CASES, TRL_ONLY, available
from harness.bench.gen import GEN_CASES, bench_gen, gen_table
from harness.bench.measure import bench_case, machine, matmul_rate, padding_report, profile_case
from harness.quiet import quiet_libraries


def table(results: list[dict], rate: float) -> str:
    lines = [f"fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s (MFU: of this rate, counting the positions "
             "each path runs; tok/s: each pair as two rows, speedup: against naive)", "",
             f"{'case':26} {'path':8} {'tok/s':>7} {'s/step':>7} {'MFU':>6} {'RSS GB':>7}"
             f" {'speedup':>8}"]
    for r in results:
        for name in (n for n in ("naive", "rows", "harness", "trl") if n in r["paths"]):
            p = r["paths"][name]
            rss = f"{p['peak_rss_gb']:.2f}" if "peak_rss_gb" in p else "-"
            sp = (f"{p['tokens_per_s'] / r['paths']['naive']['tokens_per_s']:.2f}x"
                  if name in ("rows", "harness") else "")
            lines.append(f"{r['case']['name']:26} {name:8} {p['tokens_per_s']:7.0f} "
                         f"{p['step_s']:7.2f} {p['mfu']:6.1%} {rss:>7} {sp:>8}")
    for r in results:
        checks = ", ".join(f"{c.get('path', 'harness')} {c['quantity']} {c['diff']:.2g} (tolerance "
                           f"{c['tolerance']:g} {c['unit']})" for c in r["agreement"]
                           if c.get("other", "naive") == "naive")
        lines.append(f"{r['case']['name']}: paths agree: {checks}")
        rows = r["paths"]["rows"]
        lines.append(f"{r['case']['name']}: prompt shared / two rows: {r['share_prompt_speedup']:.2f}x "
                     f"({r['paths']['harness']['tokens_run_per_step']:.0f} vs "
                     f"{rows['tokens_run_per_step']:.0f} positions per step)")
        trl = [c for c in r["agreement"] if c.get("other") == "trl"]
        if trl:
            agreed = ", ".join(f"{c['quantity']} {c['diff']:.2g}" for c in trl)
            rss = f", peak RSS {r['rss_ratio_vs_trl']:.2f}x" if "rss_ratio_vs_trl" in r else ""
            lines.append(f"{r['case']['name']}: trl agrees ({agreed}); harness / trl: tokens/s "
                         f"{r['speedup_vs_trl']:.2f}x{rss}")
        elif "trl_skipped" in r:
            lines.append(f"{r['case']['name']}: no trl row: {r['trl_skipped']}")
    return "\n".join(lines)


def run_bench(cases: list[str], steps: int, warmup: int, memory: bool, out_dir: Path,
              baseline: str | None = None, force_bf16: bool = False, models: bool = True) -> dict:
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s", file=sys.stderr)
    results, skipped = [], {}
    trl = baseline == "trl"
    if trl and trl_path.unavailable():
        skipped["baseline trl"], trl = trl_path.unavailable(), False
        print(f"skip the trl baseline: {skipped['baseline trl']}", file=sys.stderr)
    for name in cases:
        case = CASES[name]
        reason = available(case, force_bf16)
        if reason:
            skipped[name] = reason
            print(f"skip {name}: {reason}", file=sys.stderr)
            continue
        t0 = time.time()
        results.append(bench_case(case, steps, warmup, rate, memory, trl))
        print(f"{name}: {results[-1]['speedup']:.2f}x in {time.time() - t0:.0f}s", file=sys.stderr)
    model_rows = []
    if memory and models:
        reason = available(CASES["smollm2-live-mean"])
        if reason:
            skipped["model memory rows"] = reason
        else:
            model_rows = state.bench_rows()
    report = {"machine": machine(), "matmul_flops": rate, "results": results, "skipped": skipped,
              "padding": padding_report(), "model_memory": model_rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic.atomic_write(path, json.dumps(report, indent=2))
    print(table(results, rate))
    if model_rows:
        print(state.rows_table(model_rows))
    pad = report["padding"]
    print(f"\npadding ({pad['tokenizer']} tokens, batches of 8 pairs): file order "
          f"{pad['file_order']['padding_fraction']:.1%}, length-grouped "
          f"{pad['length_grouped']['padding_fraction']:.1%}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(f"\nwritten: {path}")
    return report


def run_gen(out_dir: Path) -> dict:
    """`--gen`: the sampling benchmark (harness/bench/gen.py) and its JSON report."""
    results, skipped = bench_gen(list(GEN_CASES))
    report = {"machine": machine(), "generation": results, "skipped": skipped,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-gen-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic.atomic_write(path, json.dumps(report, indent=2))
    print(gen_table(results))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(f"\nwritten: {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help=f"comma-separated, from: {', '.join(CASES)} (default: all but "
                   f"{', '.join(sorted(TRL_ONLY))}; with --baseline trl: all, TRL's row on "
                   f"{', '.join(TRL_CASES)})")
    p.add_argument("--baseline", choices=["trl"], help="also run TRL's DPOTrainer on the same "
                   "batches (fp32, summed log-probs: the *-sum cases), in a child process; needs "
                   "pip install -e '.[trl]'")
    p.add_argument("--force-bf16", action="store_true", help="run the bf16 cases on a CPU without "
                   "native bf16 (no AMX / AVX512-BF16: torch emulates it, slower than fp32)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per path (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--no-models", action="store_true", help="skip the model-memory rows (SmolLM2-135M "
                   "trained full fp32, with a bf16 reference, and as LoRA on a bf16 base)")
    p.add_argument("--models-only", action="store_true", help="only the model-memory rows")
    p.add_argument("--out", default="results/bench", help="directory for the JSON report")
    p.add_argument("--profile", metavar="CASE", help="print a torch.profiler table of one step of "
                   "each path for CASE instead of benchmarking")
    p.add_argument("--gen", action="store_true", help="time harness.generate.sample against "
                   "transformers' generate(do_sample=True) on the same prompts instead (tiny-s, and "
                   "SmolLM2-135M-Instruct when available)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    quiet_libraries()  # a child's stderr is a pipe its parent reads only on failure
    args = p.parse_args(argv)
    if args.child:  # one path's steps in a process of its own (memory.run_child): the job on stdin
        case, cfg, path, steps = memory.read_job(sys.stdin.read())
        out = (trl_path.child_main(case, cfg, steps) if path == "trl"
               else memory.child_main(case, cfg, path, steps))
        print(json.dumps(out))
        return 0
    if args.profile:
        if args.profile not in CASES:
            p.error(f"unknown case {args.profile}; valid: {', '.join(CASES)}")
        print(profile_case(CASES[args.profile]))
        return 0
    default = list(CASES) if args.baseline == "trl" else DEFAULT_CASES
    if args.gen:
        run_gen(Path(args.out))
        return 0
    names = [c.strip() for c in (args.cases or ",".join(default)).split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    if args.steps < 1 or args.steps + args.warmup < GUARD_STEPS:
        p.error(f"--steps {args.steps} --warmup {args.warmup}: at least 1 measured step and "
                f"{GUARD_STEPS} in all (the paths' losses are compared at step {GUARD_STEPS})")
    try:
        run_bench([] if args.models_only else names, args.steps, args.warmup, not args.no_memory,
                  Path(args.out), args.baseline, args.force_bf16, not args.no_models)
    except PathsDisagree as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
