"""The memory plan of a run: bytes per part of its training state, before anything is loaded.

    weights      every parameter of the policy, in its dtype (a LoRA base in model.dtype, its
                 adapters and full trained weights in model.trainable_dtype)
    gradients    one per trained parameter, in its dtype
    optimizer    AdamW's two moments per trained parameter (fused AdamW keeps the param's dtype)
    reference    a full run's frozen copy in model.dtype (none with LoRA: the base with the
                 adapter off; none with cached log-probs once they are computed)
    activations  what the largest micro-batch the run draws keeps for its backward pass (below)
    autocast     under bf16 autocast, the bf16 copies of float32 weights that the forward keeps
                 for the backward

`state_record` counts the same parts on a built model (summary.json); `estimate` computes them from
the config alone (`harness plan EXP.yaml`), on a model built on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GB = 1e9


def _unique(params) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def state_record(policy: torch.nn.Module, reference) -> dict[str, float | int]:
    """summary.json's count of a built run's training state: parameters, trained parameters, and
    the bytes of weights, gradients, AdamW moments and a separate reference copy (GB)."""
    params = _unique(policy.parameters())
    trained = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trained)
    ref_params = _unique(reference.parameters()) if reference is not None else []
    own = {id(p) for p in params}
    ref = sum(p.numel() * p.element_size() for p in ref_params if id(p) not in own)
    return {"n_params": sum(p.numel() for p in params), "n_trainable": sum(p.numel() for p in trained),
            "state/weights_gb": weights / GB, "state/gradients_gb": grads / GB,
            "state/optimizer_gb": 2 * grads / GB, "state/reference_gb": ref / GB,
            "state/total_gb": (weights + 3 * grads + ref) / GB}


@dataclass
class Plan:
    """The estimated peak of one run, per part (bytes), and where it fits."""

    name: str
    parts: dict[str, float] = field(default_factory=dict)
    n_params: int = 0
    n_trainable: int = 0
    device: str = "cpu"
    capacity: float | None = None  # the device's memory (bytes), when known

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak <= self.capacity

    def per_device(self, headroom: float = 0.9) -> int | None:
        """How many such runs share one device (at most `headroom` of it in use)."""
        if self.capacity is None:
            return None
        return max(0, math.floor(headroom * self.capacity / max(self.peak, 1.0)))


# ----------------------------------------------------------------------------- the estimate

# What one token keeps for the backward pass in one transformer layer, in float32 elements per
# unit of the hidden width h and of the MLP width i: norms' inputs and outputs, q/k/v and the
# attention output, the MLP's inputs, gates and activations. Counted with saved-tensor hooks on
# one micro-batch of the seed data (notes/memory-plan.md): gpt2 (tiny-l) 30.8 h at i = 4h,
# llama (SmolLM2-135M) 4 i + 11 h; other families take llama's.
PER_TOKEN = {"gpt2": (15.0, 4.0), "llama": (11.0, 4.0)}  # (x h, x i)
BF16_SAVED = 0.6  # under bf16 autocast: the share of float32's bytes the saved tensors take
LOGITS_COPIES = 3  # scored rows' logits: float32 logits, their gradient, the softmax of the backward
RUNTIME = 120e6  # bytes the first forward and backward add beside any tensor (kernels, threads)
# A LoRA step's peak RSS holds this share of the saved activations more than they are (measured
# on tiny-l and SmolLM2-135M over a frozen base, 0.71 and 0.61): glibc's heap fragments in the
# backward of a frozen base, and a fixed MALLOC_MMAP_THRESHOLD_ removes it (notes/memory-plan.md)
LORA_BACKWARD = 0.65


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from a model's config (built on the meta device)."""

    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    lora_params: int  # adapter parameters at the configured rank (0 without LoRA)
    model_type: str  # the config's model_type (gpt2, llama, ...): which PER_TOKEN row applies


def _dims(config) -> tuple[int, int, int]:
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return layers, hidden, inter


def lora_param_count(model: torch.nn.Module, lora) -> int:
    """Parameters of the adapters model.lora would add: r x (in + out) for each targeted linear
    layer (peft's all-linear: every Linear or Conv1D but the output head)."""
    if not lora.enabled:
        return 0
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    targets = lora.target_modules
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | Conv1D) or module is head:
            continue
        if targets != "all-linear":
            wanted = [targets] if isinstance(targets, str) else targets
            if not any(name == t or name.endswith(f".{t}") for t in wanted):
                continue
        w = module.weight
        total += lora.r * (w.shape[0] + w.shape[1])
    return total


def model_shape(cfg, tokenizer, max_length: int) -> Shape:
    """The shape of the run's model, without loading weights: a tiny model built from config, any
    other from its config.json (a GGUF file's header), on the meta device."""
    from harness import models as hmodels

    with torch.device("meta"):
        if hmodels.is_tiny(cfg.model.name):
            model = hmodels.build_tiny_model(cfg.model.name, len(tokenizer), max(max_length, 128),
                                             tokenizer.eos_token_id, tokenizer.pad_token_id)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(hmodels.load_config(cfg.model))
    layers, hidden, inter = _dims(model.config)
    return Shape(hmodels.count_params(model), layers, hidden, inter, model.config.vocab_size,
                 lora_param_count(model, cfg.model.lora), model.config.model_type)


def batch_tokens(items, cfg) -> tuple[int, int]:
    """(tokens through the model, scored tokens) of the largest micro-batch the run draws: its
    data order, batch after batch, as harness.train.micro_batches gives it."""
    from harness.packing import packed_width
    from harness.train import micro_batches, total_steps

    n = total_steps(cfg, len(items)) * cfg.train.grad_accum
    worst = (0, 0)
    for _, (_, batch, _) in zip(range(n), micro_batches(cfg, items, 0), strict=False):
        B, T = batch["input_ids"].shape
        # the packed rows when prompts are shared (the setting, not whether a model supports it)
        tokens = (B // 2) * packed_width(batch) if cfg.train.share_prompt else B * T
        scored = int(batch["loss_mask"][:, 1:].sum())
        worst = max(worst, (tokens, scored))
    return worst


def task_tokens(cfg) -> tuple[int, int]:
    """The same bound for a task that samples its pairs: prompts of up to 16 tokens and
    continuations of task.max_new_tokens."""
    b, new = cfg.train.batch_size, cfg.task.max_new_tokens
    prompt = 16
    if cfg.train.share_prompt:
        return b * (prompt + 2 * new), 2 * b * new
    return 2 * b * (prompt + new), 2 * b * new


def estimate(cfg, shape: Shape, tokens: int, scored: int, precision: str,
             device: str = "cpu", capacity: float | None = None) -> Plan:
    """The peak memory of a run of `cfg` (module docstring), its largest micro-batch having
    `tokens` tokens through the model and `scored` tokens whose log-probs count."""
    from harness import metrics
    from harness import models as hmodels

    lora = cfg.model.lora.enabled
    frozen = hmodels.frozen_dtype(cfg.model, precision).itemsize
    trained_b = hmodels.trainable_dtype(cfg.model).itemsize
    n_train = shape.lora_params if lora else shape.n_params
    parts: dict[str, float] = {}
    parts["weights"] = shape.n_params * (frozen if lora else trained_b) + (n_train * trained_b if lora else 0)
    parts["gradients"] = n_train * trained_b
    parts["optimizer"] = 2 * n_train * trained_b
    live = cfg.dpo.reference == "model"
    parts["reference"] = 0 if lora or not (live or metrics.gen_enabled(cfg)) else shape.n_params * frozen
    a_h, a_i = PER_TOKEN["gpt2" if shape.model_type == "gpt2" else "llama"]
    per_token = shape.n_layers * (a_h * shape.hidden + a_i * shape.intermediate) * 4
    saved = per_token * tokens * (BF16_SAVED if precision == "bf16" else 1.0)
    if cfg.train.gradient_checkpointing:  # each layer keeps its input; one layer's inside at a time
        saved = saved / shape.n_layers + shape.n_layers * tokens * shape.hidden * 4
    parts["activations"] = saved * (1 + LORA_BACKWARD if lora else 1) + LOGITS_COPIES * scored * shape.vocab * 4
    # bf16 autocast keeps bf16 casts of float32 weights for the backward
    parts["autocast"] = shape.n_params * 2 if precision == "bf16" and not lora and trained_b == 4 else 0
    parts["runtime"] = RUNTIME if device == "cpu" else 0
    total = shape.n_params + (shape.lora_params if lora else 0)
    return Plan(cfg.name, parts, total, n_train, device, capacity)


# ----------------------------------------------------------------------------- per experiment


def device_capacity(device: torch.device) -> float | None:
    """The memory a run on `device` may use (bytes): the GPU's total, or this machine's RAM."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_run(cfg, device: torch.device, capacity: float | None = None) -> Plan:
    """The plan of one run config: its model's shape (meta device), its largest micro-batch (the
    tokenized data in the run's order; a task's bound), its precision on `device`, against
    `capacity` bytes (default: the device's own; give it to plan for a device not here)."""
    from harness import device as hdevice
    from harness import models as hmodels
    from harness.prepare import preview

    precision = hdevice.resolve_precision(device, cfg.train.precision)
    if cfg.task.name == "none":
        prep = preview(cfg)
        tokenizer = prep.tokenizer
        tokens, scored = batch_tokens(prep.splits["train"], cfg)
    else:
        tokenizer, _ = hmodels.load_tokenizer(cfg.model, lambda: iter(["a b c"]))
        tokens, scored = task_tokens(cfg)
    shape = model_shape(cfg, tokenizer, cfg.data.max_length)
    return estimate(cfg, shape, tokens, scored, precision, device.type,
                    capacity or device_capacity(device))


def runs_of(path, overrides: dict | None = None) -> list:
    """(label, run config) of every grid cell of an experiment (one run without a sweep)."""
    from harness.config import load_config, load_experiment

    cfg = load_config(path, overrides)
    if cfg.sweep is None:
        return [(cfg.name, cfg)]
    exp = load_experiment(path)
    out = []
    for cell in exp.cells:
        if cell.search not in (None, 0):
            continue
        run = exp.run_config(cell, dict(overrides or {}), 0, cell.id, [])
        out.append((cell.id, run))
    return out


def quick(cfg, steps: int, **overrides):
    """`cfg` cut to its first `steps` optimizer steps with evaluation, samples and saving off
    (dotted `overrides` on top): what `measure` runs, and so what a measured plan is for."""
    from harness.config import build_config
    from harness.config.load import apply_overrides

    cut = {"train.max_steps": steps, "train.eval_every": 0, "train.test_at_end": False,
           "train.sample_validation": 0, "train.sample_test": 0, "train.save_model": False,
           "train.checkpoint_every": 0, "tracking.progress": False, "tracking.wandb": "disabled",
           "gen_eval.enabled": False, "sweep": None, **overrides}
    return build_config(apply_overrides(cfg.to_dict(), cut), where=cfg.name)


def measure(cfg, steps: int = 3) -> float:
    """The measured peak memory increase (bytes) of quick(cfg, steps) in a fresh process
    (`harness train`): its mem/peak_increase_gb."""
    return run_summary(quick(cfg, steps))["mem/peak_increase_gb"] * GB


def run_summary(cfg) -> dict:
    """summary.json of `cfg` run by `harness train` in a fresh process (a temporary run dir), with
    `eval_loss_start`: its first validation loss (metrics.jsonl), None without one."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from harness.rundir import METRICS

    with tempfile.TemporaryDirectory() as tmp:
        raw = cfg.to_dict()
        exp = Path(tmp) / "run.json"
        exp.write_text(json.dumps(raw))
        out = subprocess.run([sys.executable, "-m", "harness", "train", str(exp), "--run-dir",
                              str(Path(tmp) / "run")], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"measuring {cfg.name}: the run failed:\n{out.stderr[-2000:]}")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        rows = [json.loads(line) for line in (Path(tmp) / "run" / METRICS).read_text().splitlines()]
    first = next((r["eval/loss"] for r in rows if "eval/loss" in r), None)
    return {**summary, "eval_loss_start": first}


def table(plans: list[Plan], measured: dict[str, float] | None = None) -> str:
    """The plans as a text table, GB per part; with `measured`, the measured peak beside."""
    names = ["weights", "gradients", "optimizer", "reference", "activations", "autocast", "runtime"]
    head = ["run", "params", "trained", *names, "peak", "fits", "per device"]
    if measured:
        head += ["measured", "est/meas"]
    rows = [head]
    for p in plans:
        row = [p.name, f"{p.n_params / 1e6:.1f}M", f"{p.n_trainable / 1e6:.2f}M",
               *(f"{p.parts.get(n, 0) / GB:.3f}" for n in names), f"{p.peak / GB:.3f}",
               {True: "yes", False: "NO", None: "?"}[p.fits], str(p.per_device() or "-")]
        if measured:
            m = measured.get(p.name)
            row += [f"{m / GB:.3f}" if m else "-", f"{p.peak / m:.2f}" if m else "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
