"""Tolerances for two computation orders of one run (accumulated vs one batch, two ranks vs one
process, cached vs live reference, recomputed vs kept activations), per precision.

The orders compute the same function; they differ only in how float rounding falls (other batch
shapes pick other kernel blockings, sums run in another order). So each comparison runs twice:

- **fp32** (pinned, whatever the CPU): the tight tolerances the comparison always had; a bug that
  changes the math (a gradient not divided by the accumulation steps, a wrong reference) is far
  outside them.
- **bf16** (forced, so it runs on every CPU; emulated where bf16 is not native): autocast rounds
  every matmul input and output to bf16, whose significand has 8 bits (7 stored, 1 implicit): a
  unit roundoff of U = 2**-8 ≈ 3.9e-3, against 2**-24 in fp32. One order may round an element one
  unit up where the other rounds it down, so a quantity agrees to about U times the magnitude of
  what it is computed from:
    * the gradient norm and the log-probs (`logps/*`): relative U;
    * implicit rewards, margins and log-ratios: β·(log π − log π_ref) is a difference of two
      log-probs, so its error scales with the log-probs, not with the (much smaller) difference:
      absolute U·β·|log p| for rewards (U·|log p| for log-ratios, which carry no β), twice that
      for margins (a difference of two rewards) and for the loss (|d loss / d margin| ≤ 1);
    * reward accuracy: a pair whose margin lies within that bound of 0 may flip: one pair's
      share of the mean.
  Log-probs are taken in float32 after the bf16 matmuls (harness.dpo), so no error is larger.
  These bounds are far wider than what the orders usually differ by (≈1e-4 relative on this
  project's tiny models), yet a changed computation (a doubled gradient, a wrong reference's
  log-ratios of whole nats) is still far outside them.
"""

from __future__ import annotations

import math

PRECISIONS = ("fp32", "bf16")
BF16_U = 2.0 ** -8  # unit roundoff of bf16: 8 significant bits


def bf16_tolerance(key: str, row: dict, beta: float, pairs: int) -> tuple[float, float]:
    """(rel, abs) for metric `key` of a metrics row (or summary) in bf16, from the row's own
    log-probs: see the module docstring. `pairs`: how many pairs a mean of that row counts."""
    name = key.split("/", 1)[-1]
    split = key.split("/", 1)[0]
    logp = max((abs(row[f"{split}/logps/{s}"]) for s in ("chosen", "rejected")
                if isinstance(row.get(f"{split}/logps/{s}"), float)), default=0.0)
    if name in ("grad_norm",) or name.startswith("logps/"):
        return BF16_U, 0.0
    if name in ("rewards/chosen", "rewards/rejected"):
        return 0.0, BF16_U * beta * logp
    if name in ("rewards/margins", "loss"):
        return 0.0, 2 * BF16_U * beta * logp
    if name == "logratios/margins":
        return 0.0, 2 * BF16_U * logp
    if name == "rewards/accuracies":
        return 0.0, 1.0 / pairs
    return 0.0, 0.0  # lr, counts: exact in any precision


def assert_close(a: dict, b: dict, keys, precision: str, beta: float, pairs: int,
                 rel: float = 1e-4, abs_: float = 1e-6) -> int:
    """Every key of `keys` equal in rows a and b: to (rel, abs_) in fp32, to the bf16 bounds in
    bf16. Returns how many values were compared."""
    n = 0
    for k in keys:
        x, y = a[k], b[k]
        r, t = (rel, abs_) if precision == "fp32" else bf16_tolerance(k, a, beta, pairs)
        assert math.isclose(x, y, rel_tol=r, abs_tol=t), (a.get("step"), k, x, y, precision, r, t)
        n += 1
    return n
