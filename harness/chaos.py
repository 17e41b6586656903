"""Named crash points for the chaos test (`make chaos`): a process whose DPO_HARNESS_CRASH_AT
names the point it reaches kills itself with SIGKILL there, as a power cut or the OOM killer
would. Unset (always, outside the chaos test), a crash point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "DPO_HARNESS_CRASH_AT"
# Where a sweep can be cut: inside the SFT stage, while sampling a pair set, while computing
# reference log-probs, at a run's eval step, after a run's summary.json but before Optuna records
# its value, and between creating a cell's seeds study and queuing its reruns.
POINTS = ("sft", "pairs", "reference", "eval", "summary", "seeds")
# Also: "checkpoint", right after a run saved a checkpoint (the resume tests of single runs).


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
