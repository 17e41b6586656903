"""Where a run's time goes: wall seconds per phase, written to summary.json as
`perf/phase/<name>_s` (a sweep adds them up over its runs).

    setup      everything not below: building models, loading data, checkpoints, saving
    sft        the SFT stage (trained, or its cached checkpoint found)
    pairs      the pair set (sampled and labelled, or read from the cache)
    reference  cached reference log-probs (computed, or read)
    train      optimizer steps
    eval       validation and test passes (pair metrics, preference accuracy)
    gen        generation metrics (sampling, KL, reward)

`phase(name)` times a block into the run that `timing()` is collecting for (a no-op outside one).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

NAMES = ("setup", "sft", "pairs", "reference", "train", "eval", "gen")
_current: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("phases", default=None)


@contextlib.contextmanager
def timing() -> Iterator[dict[str, float]]:
    """Collect the phases of the code inside; the dict is filled on exit (setup = the rest)."""
    spent = dict.fromkeys(NAMES, 0.0)
    token = _current.set(spent)
    start = time.perf_counter()
    try:
        yield spent
    finally:
        _current.reset(token)
        spent["setup"] = max(0.0, time.perf_counter() - start - sum(spent.values()))


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    if name not in NAMES:
        raise ValueError(f"unknown phase {name!r}; phases: {', '.join(NAMES)}")
    start = time.perf_counter()
    try:
        yield
    finally:
        spent = _current.get()
        if spent is not None:
            spent[name] += time.perf_counter() - start


def summary_keys(spent: dict[str, float]) -> dict[str, float]:
    return {f"perf/phase/{name}_s": round(spent.get(name, 0.0), 3) for name in NAMES}
