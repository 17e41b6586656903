"""The benchmark's agreement guard: the harness path must compute what the notebook's path
computes before its timing is reported.

Step 1's loss alone proves nothing: the policy equals the reference there, so both paths give
ln 2 whatever their masks or reductions. The guard compares instead
- the per-sequence policy log-probs of the first batch, before any step (prompt mask, reduction,
  the gathered token log-probs);
- the gradient norm after the first backward (β, the loss's derivative, the mean over pairs);
- the loss of every step, at least GUARD_STEPS of them, so that it is also compared after two
  optimizer updates, when the policy no longer equals the reference (the update itself).
Each is checked as soon as it is measured, so a path that disagrees costs no further steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

GUARD_STEPS = 3  # steps the losses are compared over: step 3 follows two optimizer updates

# fp32. The two paths sum the same per-token log-probs, one from a full log_softmax, the other
# from a logsumexp over the LM head's counted rows, and round differently: measured up to 3e-6
# per token on the tiny cases and 2e-5 on SmolLM2. A `sum` log-prob is compared per counted
# token (difference / counted tokens), as its rounding grows with its length; `mean` already is.
LOGP_TOLERANCE = 1e-4  # nats per counted token
# fp32 gradients summed in different orders (four forwards against one concatenated forward):
# their norms differed by 0 (tiny) and 2e-6 (SmolLM2) relative; a doubled β makes it 1.
GRAD_NORM_RTOL = 1e-4  # |naive - harness| / |naive|
# fp32 losses after updates of AdamW (torch's default in the naive path, fused in the harness
# path): measured up to 3e-7 apart over 3 steps. Smaller than how far step 3's loss has moved
# from ln 2 (2e-5 on tiny-live-mean, 5e-4 on tiny-live-sum, 1e-3 on SmolLM2), so an update
# that differs by as much as the whole move is seen.
LOSS_TOLERANCE = 1e-5  # |naive - harness|, every step
# bf16 autocast (harness path only) is held to these instead: it rounds each matmul's inputs
# to 8 bits of mantissa. Measured on SmolLM2 (AVX2, 3 steps): log-probs 0.021 per token apart,
# gradient norms 4e-3 relative, losses 1.4e-3 (more than step 3 has moved from ln 2, so in bf16
# the loss check bounds the drift, it cannot see a wrong update).
BF16_LOGP_TOLERANCE = 0.05  # nats per counted token
BF16_GRAD_NORM_RTOL = 0.05  # relative
BF16_LOSS_TOLERANCE = 0.01  # absolute, every step


@dataclass(frozen=True)
class Tolerances:
    logp: float
    grad_norm: float
    loss: float


def tolerances(bf16: bool) -> Tolerances:
    if bf16:
        return Tolerances(BF16_LOGP_TOLERANCE, BF16_GRAD_NORM_RTOL, BF16_LOSS_TOLERANCE)
    return Tolerances(LOGP_TOLERANCE, GRAD_NORM_RTOL, LOSS_TOLERANCE)


@dataclass(frozen=True)
class Check:
    """One quantity measured on both paths and their difference, in the tolerance's unit. `naive`
    holds the value of the path the harness is compared with: `other` names it (the notebook's
    path, or TRL's DPOTrainer with `--baseline trl`)."""

    quantity: str  # what was compared: "policy log-prob", "gradient norm", "loss" or "batch"
    where: str  # e.g. "first batch, rejected row 3"
    naive: float
    harness: float
    diff: float
    tolerance: float
    unit: str  # of diff and tolerance
    other: str = "naive"  # the path `naive` was measured on: naive | trl
    path: str = "harness"  # the path `harness` was measured on: harness | rows (two-row layout)

    @property
    def ok(self) -> bool:
        return self.diff <= self.tolerance  # False for nan

    def record(self) -> dict:
        return asdict(self) | {"ok": self.ok}

    def describe(self) -> str:
        return (f"{self.quantity} ({self.where}): {self.other} {self.naive:.7g}, {self.path} {self.harness:.7g}, "
                f"difference {self.diff:.3g} {self.unit} > tolerance {self.tolerance:g}")


class PathsDisagree(RuntimeError):
    """The harness path computed something else than the notebook's path (or TRL's)."""

    def __init__(self, case: str, checks: list[Check]):
        self.case, self.checks = case, checks
        bad = [c for c in checks if not c.ok]
        other = "TRL's DPOTrainer" if any(c.other == "trl" for c in bad) else "the notebook's path"
        super().__init__(f"{case}: the harness path disagrees with {other}, so its timing is not "
                         f"reported: {'; '.join(c.describe() for c in bad)}")


def require(case: str, checks: list[Check]) -> None:
    """Raise PathsDisagree naming every check that failed."""
    if not all(c.ok for c in checks):
        raise PathsDisagree(case, checks)


def logps_check(naive: torch.Tensor, harness: torch.Tensor, counted: torch.Tensor,
                reduction: str, tolerance: float, other: str = "naive", path: str = "harness") -> Check:
    """naive, harness: [2B] policy log-probs (chosen rows, then rejected); counted: [2B] counted
    tokens of each row. The worst row, its difference per counted token."""
    per_token = (naive.float() - harness.float()).abs()
    if reduction == "sum":
        per_token = per_token / counted.clamp(min=1)
    i = int(per_token.nan_to_num(math.inf).argmax())
    half = len(naive) // 2
    row = f"chosen row {i}" if i < half else f"rejected row {i - half}"
    return Check("policy log-prob", f"{reduction}, first batch, worst row: {row}", float(naive[i]),
                 float(harness[i]), float(per_token[i]), tolerance, "nats per counted token", other,
                 path)


def grad_norm_check(naive: float, harness: float, rtol: float, path: str = "harness") -> Check:
    diff = 0.0 if naive == harness else abs(naive - harness) / abs(naive) if naive else math.inf
    return Check("gradient norm", "after the first backward", naive, harness, diff, rtol, "relative",
                 path=path)


def loss_check(naive: list[float], harness: list[float], tolerance: float,
               other: str = "naive", path: str = "harness") -> Check:
    """The step whose losses differ most, of the steps so far (the bench runs GUARD_STEPS or
    more)."""
    diffs = [math.inf if math.isnan(a - b) else abs(a - b) for a, b in zip(naive, harness, strict=True)]
    i = max(range(len(diffs)), key=diffs.__getitem__)
    return Check("loss", f"step {i + 1}, the worst of steps 1-{len(diffs)}", naive[i], harness[i],
                 diffs[i], tolerance, "absolute", other, path)
