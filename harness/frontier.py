"""A run's reward at matched KL: the score a study compares runs by on a task with a true reward.

A run's validation passes trace a path in the (gen/kl, gen/reward) plane, from the reference
(KL 0 at step 0) outwards. Its frontier at k nats, F(k), is the highest reward on that path at
KL ≤ k, the path taken as straight segments between consecutive passes (so a pass that crosses
k is interpolated at k, not dropped). A run that stays below k keeps its best reward; one that
overshoots k keeps what it had on the way. `gen/reward_at_kl` is the mean of F at KL_POINTS.

Unlike a reward less a penalty per nat over a budget, F is bounded by the rewards the run
reached: one run that overshoots the budget moves a mean by no more than its rewards differ,
and the score changes continuously with every pass's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

KL_POINTS = (1.0, 2.0, 4.0)  # nats: where the frontier is read
NAMES = {k: f"gen/reward_at_kl_{k:g}" for k in KL_POINTS}
SCORE = "gen/reward_at_kl"


def _finite(*xs: float) -> bool:
    return all(isinstance(x, int | float) and math.isfinite(x) for x in xs)


def frontier(path: Sequence[tuple[float, float]], k: float) -> float | None:
    """F(k): the highest reward on the path of (kl, reward) points at KL ≤ k; None when no point
    of the path lies at KL ≤ k. A point with a non-finite value breaks the path there."""
    best = None

    def keep(r: float) -> None:
        nonlocal best
        best = r if best is None else max(best, r)

    for i, (kl, r) in enumerate(path):
        if not _finite(kl, r):
            continue
        if kl <= k:
            keep(r)
        if i + 1 < len(path) and _finite(*path[i + 1]):
            kl2, r2 = path[i + 1]
            if min(kl, kl2) <= k < max(kl, kl2):  # the segment crosses k: read it there
                keep(r + (r2 - r) * (k - kl) / (kl2 - kl))
    return best


def scores(path: Sequence[tuple[float, float]]) -> dict[str, float]:
    """{gen/reward_at_kl_<k>: F(k)} for each k of KL_POINTS and their mean as gen/reward_at_kl;
    {} when the path has no point at KL ≤ the smallest k (no pass scored the run yet)."""
    values = {NAMES[k]: frontier(path, k) for k in KL_POINTS}
    if any(v is None for v in values.values()):
        return {}
    return {**values, SCORE: sum(values.values()) / len(values)}


def path_of(rows: Iterable[dict]) -> list[tuple[float, float]]:
    """The (gen/kl, gen/reward) points of a run's metrics rows, in order (rows without both are
    not passes of generation metrics)."""
    return [(r["gen/kl"], r["gen/reward"]) for r in rows
            if r.get("gen/kl") is not None and r.get("gen/reward") is not None]
