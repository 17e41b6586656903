"""`make bench`'s model-memory rows: one real model trained three ways, each a few steps of
`harness train` in a fresh process, with its peak memory increase over what the process held
before the models loaded (mem/peak_increase_gb), the plan's estimate of it (harness.plan), and
whether its validation loss fell.

    full fp32         every weight trained, float32 master copies and a float32 reference
    full, bf16 ref    every weight trained (float32), the frozen reference copy in bfloat16
    LoRA, bf16 base   adapters (r 16, every linear layer) trained on a bfloat16 base, the
                      reference being that base with the adapter off (no copy)

Computed in fp32 (train.precision), bf16-stored frozen weights widened layer by layer
(harness.lowp), so that the rows compare what the weights cost, at fp32 speed, whatever the CPU
does with bf16 arithmetic.
"""

from __future__ import annotations

import sys
import time

import torch

from harness import plan
from harness.bench.cases import SEED_EXPERIMENT, SMOLLM2
from harness.config import load_config

ROWS = {
    "full fp32": {"model.dtype": "float32"},
    "full, bf16 reference": {"model.dtype": "bfloat16"},
    "LoRA r16, bf16 base": {"model.dtype": "bfloat16", "model.lora.r": 16, "train.lr": 5e-4},
}
STEPS = 8  # optimizer steps of 8 pairs: enough for the validation loss to move


def row_config(model: str, overrides: dict, steps: int):
    cfg = load_config(SEED_EXPERIMENT, {"model.name": model, "train.precision": "fp32",
                                        "tracking.progress": False, **overrides})
    # validation passes at step 0 and at the end, on the same 3 batches
    return plan.quick(cfg, steps, **{"train.eval_every": 8 * steps, "train.eval_batches": 3})


def bench_rows(model: str = SMOLLM2, steps: int = STEPS) -> list[dict]:
    """One result per ROWS entry (see the module docstring)."""
    out = []
    for name, overrides in ROWS.items():
        cfg = row_config(model, overrides, steps)
        t0 = time.time()
        print(f"model memory: {name} ({steps} steps) ...", file=sys.stderr, flush=True)
        s = plan.run_summary(cfg)
        est = plan.plan_run(cfg, torch.device("cpu")).peak
        out.append({"row": name, "model": model, "peak_increase_gb": s["mem/peak_increase_gb"],
                    "plan_gb": est / plan.GB, "state_gb": s["state/total_gb"],
                    "n_trainable": s["n_trainable"], "n_params": s["n_params"],
                    "eval_loss_start": s["eval_loss_start"],
                    "eval_loss_end": s["eval/loss"], "wall_s": time.time() - t0})
    return out


def rows_table(rows: list[dict]) -> str:
    full = next((r["peak_increase_gb"] for r in rows if r["row"] == "full fp32"), None)
    lines = [f"\nmodel memory ({rows[0]['model']}, fp32 compute, batch 8; peak increase since the "
             "models loaded)",
             f"{'row':22} {'trained':>9} {'state GB':>8} {'peak GB':>8} {'vs full':>8} {'plan GB':>8}"
             f" {'eval loss start -> end':>24}"]
    for r in rows:
        ratio = f"{r['peak_increase_gb'] / full:.2f}x" if full else "-"
        start = f"{r['eval_loss_start']:.4f}" if r["eval_loss_start"] is not None else "?"
        lines.append(f"{r['row']:22} {r['n_trainable'] / 1e6:8.2f}M {r['state_gb']:8.3f} "
                     f"{r['peak_increase_gb']:8.3f} {ratio:>8} {r['plan_gb']:8.3f} "
                     f"{start:>14} -> {r['eval_loss_end']:.4f}")
    return "\n".join(lines)
