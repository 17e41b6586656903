"""Memory a process holds: resident set on the CPU, allocated bytes on CUDA. A run records its
peak increase over what it held before its models loaded (`mem/peak_increase_gb`), the figure
`harness plan` estimates."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident set (bytes). VmHWM, which starts afresh at exec; ru_maxrss
    (the fallback off Linux) would also count the parent's peak at fork time."""
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """This process's resident set now (bytes); 0 where /proc is not there."""
    return _status("VmRSS") or 0


def reset_peak_rss() -> bool:
    """Start the high-water mark afresh (Linux: clear_refs 5), so that what came before (loading,
    converting, an SFT stage) does not hide what the next part needs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Watermark:
    """The peak memory increase from `start` on: RSS on the CPU (VmHWM after a reset, minus the
    RSS at the start), torch.cuda.max_memory_allocated on CUDA."""

    device: torch.device
    base: int = 0
    reset: bool = False

    @classmethod
    def start(cls, device: torch.device) -> Watermark:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return cls(device, torch.cuda.memory_allocated(device), True)
        return cls(device, current_rss(), reset_peak_rss())

    def increase(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return peak_rss() - self.base

    def record(self) -> dict[str, float | bool]:
        """Summary keys: the peak increase (GB) and what it is of."""
        kind = "gpu_allocated" if self.device.type == "cuda" else "rss"
        return {"mem/peak_increase_gb": self.increase() / 1e9, "mem/measure": kind,
                "mem/peak_reset": self.reset}
