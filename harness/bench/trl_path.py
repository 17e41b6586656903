"""TRL's DPOTrainer as a third path (`harness bench --baseline trl`), on the same batches.

TRL runs in a child process of its own (its steps are timed and its peak RSS measured there):
the case's model and the same tokenised pairs as the other two paths (TRL's own tokenisation
is bypassed, the pairs are handed over as `prompt_ids`, `chosen_ids`, `rejected_ids`), batches
of the same 8 pairs in file order (sequential sampler), β, the sigmoid loss on log-probs summed
over the completion tokens (TRL's only reduction), fp32, no gradient checkpointing (TRL's default
is on), no clipping, constant learning rate, and the reference live (a copy of the model) or
precomputed before training (`precompute_ref_log_probs`). A step is timed from Trainer's
on_step_begin to on_step_end: forward, backward, gradient norm, optimizer update.

Before its timing is reported TRL must agree with the harness: its first collated batch equals
the harness's (input_ids, attention_mask, completion_mask = loss_mask), its per-sequence policy
log-probs of that batch, and its loss at every step (after updates too) within the fp32
tolerances of agree.py.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import tempfile
import time

import torch

from harness.bench import agree
from harness.bench.cases import Case, build, load_items
from harness.config import RunConfig
from harness.memory import peak_rss, reset_peak_rss

TRL_MISSING = "trl is not installed: pip install -e '.[trl]' (in .venv: .venv/bin/pip install -e '.[trl]')"


def unavailable() -> str | None:
    """None if trl can be imported, else how to install it."""
    return None if importlib.util.find_spec("trl") is not None else TRL_MISSING


def mismatch(case: Case) -> str | None:
    """None if TRL's DPOTrainer computes what this case computes, else why it does not."""
    if not case.mask_prompt:
        return f"TRL's DPOTrainer never counts prompt tokens; {case.name} does"
    if case.reduction != "sum":
        return f"TRL's DPOTrainer sums log-probs over the completion; {case.name} takes the {case.reduction}"
    if case.bf16 or case.checkpointing:
        return f"the TRL baseline runs in fp32 without gradient checkpointing; {case.name} does not"
    return None


# ----------------------------------------------------------------------------- the child


def trainer(case: Case, model, tokenizer, cfg, items, steps: int, out_dir: str):
    """A DPOTrainer over `items` (tokenised pairs, in order) for `steps` steps, its step times
    and losses recorded in `.step_times` and `.step_losses`."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Pretokenized(DPOTrainer):
        step_losses: list[float]

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already TRL's tokenised columns: the harness's token ids

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.step_losses.append(float(loss))
            return loss

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    t = cfg.train
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=t.batch_size, max_steps=steps,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        beta=cfg.dpo.beta, loss_type=["sigmoid"], max_length=None, bf16=False,
        gradient_checkpointing=False, precompute_ref_log_probs=case.reference == "cache",
        train_sampling_strategy="sequential", report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    rows = {"prompt_ids": [p.prompt_ids for p in items], "chosen_ids": [p.chosen_ids for p in items],
            "rejected_ids": [p.rejected_ids for p in items]}
    ref = copy.deepcopy(model).eval() if case.reference == "model" else None
    timer = Timer()
    tr = Pretokenized(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_dict(rows),
                      processing_class=tokenizer, callbacks=[timer])
    tr.step_losses, tr.step_times = [], timer.times
    return tr


def batch_differences(trl_batch: dict, batch: dict) -> int:
    """Positions where TRL's collated batch and the harness's differ (input_ids, attention mask,
    counted tokens); every position when their shapes differ."""
    ids = trl_batch["input_ids"]
    if ids.shape != batch["input_ids"].shape:
        return max(ids.numel(), batch["input_ids"].numel())
    counted = batch["loss_mask"].clone()
    counted[:, 0] = False  # position 0 is never predicted, by either
    trl_counted = trl_batch["completion_mask"].bool().clone()
    trl_counted[:, 0] = False
    differ = (ids != batch["input_ids"]) | (trl_batch["attention_mask"] != batch["attention_mask"])
    return int((differ | (trl_counted != counted)).sum())


def child_main(case: Case, cfg: RunConfig, steps: int) -> dict:
    """Runs in the child (memory.run_child's, path `trl`): TRL's first batch and log-probs, then
    `steps` timed steps."""
    cfg, tokenizer, items = load_items(case, 8 * steps, cfg)
    model, bats, _, _ = build(case, cfg, tokenizer, items)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        tr = trainer(case, model, tokenizer, cfg, items, steps, out)
        setup_s = time.perf_counter() - t0  # with precompute_ref_log_probs: the reference pass
        first = next(iter(tr.get_train_dataloader()))  # the batch TRL's step 1 trains on
        differences = batch_differences(first, bats[0][1])
        with torch.no_grad():
            chosen, rejected = tr.compute_ref_log_probs(tr.model, first)  # the policy's, before step 1
        del first
        reset = reset_peak_rss()  # from here the high-water mark is the training's own
        tr.train()
    import trl

    return {"trl": trl.__version__, "batch_differences": differences,
            "logps": torch.cat([chosen, rejected]).tolist(), "losses": tr.step_losses,
            "times": tr.step_times, "peak_rss": peak_rss(), "peak_rss_reset": reset,
            "setup_s": setup_s}


# ----------------------------------------------------------------------------- the parent


def checks(out: dict, harness_logps: torch.Tensor, counted: torch.Tensor, harness_losses: list[float],
           reduction: str, tol: agree.Tolerances) -> list[agree.Check]:
    """TRL against the harness: the first batch, its log-probs and every step's loss."""
    diff = out["batch_differences"]
    batch = agree.Check("batch", "first batch: input_ids, attention mask, counted tokens", 0.0, 0.0,
                        float(diff), 0.0, "differing positions", "trl")
    logps = agree.logps_check(torch.tensor(out["logps"]), harness_logps, counted, reduction,
                              tol.logp, "trl")
    return [batch, logps, agree.loss_check(out["losses"], harness_losses, tol.loss, "trl")]


def report(out: dict, warmup: int, tokens: list[int], flops_per_token: float, rate: float) -> dict:
    """TRL's row of the table: the steps after warm-up, timed as the other paths' are."""
    times = out["times"][warmup:]
    if len(times) != len(tokens):
        raise RuntimeError(f"TRL timed {len(out['times'])} steps, expected {warmup + len(tokens)}")
    tps = sum(tokens) / sum(times)
    return {"step_s": statistics.median(times), "tokens_per_s": tps, "mfu": tps * flops_per_token / rate,
            "roofline_tokens_per_s": rate / flops_per_token, "peak_rss_gb": out["peak_rss"] / 1e9,
            "trl_version": out["trl"], "setup_s": out["setup_s"]}
