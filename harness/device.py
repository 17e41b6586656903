"""Where a run computes and in what arithmetic: the device (`auto`: cuda, then mps, then cpu),
what it does natively (bf16 matmuls on cuda, on CPUs with AMX or AVX512-BF16), the precision
`train.precision` resolves to ($DPO_HARNESS_PRECISION overrides `auto` for a whole process), the
record every summary keeps of it, and the autocast a step runs under.

Precision is part of the experiment: bf16 and fp32 runs drift apart over a run, so a study never
pools them (harness.sweep.study.pin_precision) and a checkpoint is never resumed in the other.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch


def pick_device(spec: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu. An explicit device that is not there is an error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {spec!r} asked for, but no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device: {spec!r} asked for, but MPS is not available")
    return device


CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # /proc/cpuinfo flags of native bf16


def capability(device: torch.device) -> dict:
    """What `device` does natively. cuda: {"device", "bf16_native"} from
    torch.cuda.is_bf16_supported(). cpu: also "isa" (torch's dispatch level, e.g. AVX2, AVX512)
    and "flags" (those of BF16_CPU_FLAGS that /proc/cpuinfo lists; None when it cannot be read).
    A CPU runs bf16 matmuls natively only with AMX or AVX512-BF16; on AVX2 torch emulates them
    (slower than fp32). bf16_native is None when unknown (no /proc/cpuinfo)."""
    if device.type == "cuda":
        return {"device": "cuda", "bf16_native": bool(torch.cuda.is_bf16_supported())}
    if device.type != "cpu":
        return {"device": device.type, "bf16_native": None}
    flags = _cpu_flags(CPUINFO)
    native = None if flags is None else bool({"amx_bf16", "avx512_bf16"} & set(flags))
    return {"device": "cpu", "isa": torch.backends.cpu.get_cpu_capability(), "flags": flags,
            "bf16_native": native}


@functools.lru_cache(maxsize=4)  # autocast asks every step; the file does not change
def _cpu_flags(cpuinfo: Path) -> list[str] | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return [f for f in BF16_CPU_FLAGS if f in present]


PRECISION_ENV = "DPO_HARNESS_PRECISION"  # bf16 | fp32: what `auto` means for this whole process
PRECISIONS = ("fp32", "bf16")


def precision_override() -> str | None:
    """$DPO_HARNESS_PRECISION when set (bf16 or fp32), else None. It replaces `auto`'s choice for
    every run of the process (a test suite forced to bf16 on an AVX2 CPU, say); a config that
    names fp32 or bf16 keeps its own."""
    value = os.environ.get(PRECISION_ENV, "").strip().lower()
    if not value:
        return None
    if value not in PRECISIONS:
        raise ValueError(f"${PRECISION_ENV}={value!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def resolve_precision(device: torch.device, precision: str) -> str:
    """`auto` -> $DPO_HARNESS_PRECISION when set, else bf16 where bf16 matmuls are native (cuda
    with bf16 support, a CPU with AMX or AVX512-BF16), else fp32; `fp32` and `bf16` as given."""
    if precision != "auto":
        return precision
    forced = precision_override()
    if forced is not None:
        return forced
    return "bf16" if device.type in ("cuda", "cpu") and capability(device)["bf16_native"] else "fp32"


def precision_record(device: torch.device, precision: str) -> dict:
    """What a run's summary says of its arithmetic: `precision` (what it computed in),
    `precision_setting` (train.precision as configured), `precision_source` (config, env or
    auto), `bf16_native` and, on a CPU, `cpu_isa` (torch's dispatch level) and `cpu_bf16_flags`."""
    cap = capability(device)
    source = "config" if precision != "auto" else "env" if precision_override() else "auto"
    out = {"precision": resolve_precision(device, precision), "precision_setting": precision,
           "precision_source": source, "bf16_native": cap["bf16_native"]}
    if device.type == "cpu":
        out.update({"cpu_isa": cap["isa"], "cpu_bf16_flags": " ".join(cap["flags"] or []) or None})
    return out


def describe_precision(record: dict) -> str:
    """One line for a run's header: `bf16 (auto: native bf16, AVX512)`."""
    native = {True: "native bf16", False: "bf16 emulated", None: "bf16 support unknown"}[record["bf16_native"]]
    where = f", {record['cpu_isa']}" if record.get("cpu_isa") else ""
    return f"{record['precision']} ({record['precision_source']}: {native}{where})"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `bf16`, and for `auto` where it resolves to bf16 (resolve_precision)."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
