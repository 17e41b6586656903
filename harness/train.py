"""One DPO run, end to end: `train(cfg)` reads top to bottom.

    prepare (tokenizer, pairs, SFT start)  →  models (policy, reference or cached log-probs)
    →  optimizer and schedule  →  steps, with evals every `train.eval_every` pairs
    →  final eval, test split, samples  →  save

The parts are the library's (prepare, step, reference, optim, tracking); only the loop lives here.
"""

from __future__ import annotations

import copy
import math
import platform
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness import cache, metrics, optim
from harness import data as hdata
from harness import models as hmodels
from harness.config import RunConfig
from harness.generate import gen_eval
from harness.prepare import Prepared, prepare
from harness.reference import cached_logps
from harness.sft import load_checkpoint
from harness.step import StepSettings, dpo_batch, evaluate, pref_accuracy
from harness.tracking import DATA_COUNTS, Tracker, new_run_dir, run_labels

EvalHook = Callable[[int, dict[str, float]], None]


class RunPruned(Exception):
    """Raised by an eval hook to stop a run early (a sweep's pruner); the run ends as `pruned`."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, run_dir: str | Path | None = None, on_eval: EvalHook | None = None,
          labels: dict | None = None) -> dict:
    """Train one DPO run; returns the summary (also written to run_dir/summary.json).

    `on_eval(step, metrics)` is called after every validation pass; it may raise RunPruned.
    `labels` (study, cell, trial, role, storage) are set by a sweep and written into the run files.
    """
    run_dir = new_run_dir(cfg.tracking.results_dir, cfg.name, run_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = hmodels.pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    labels = run_labels(cfg, labels)
    tracker = Tracker.for_run(run_dir, cfg, labels)
    say = (lambda *a: print(*a, file=sys.stderr)) if cfg.tracking.progress else (lambda *a: None)
    started = time.time()
    try:
        summary = _run(cfg, run_dir, device, tracker, say, on_eval)
    except BaseException as err:
        status = {KeyboardInterrupt: "interrupted", RunPruned: "pruned"}.get(type(err), "failed")
        tracker.summary({"status": status, "error": repr(err), "wall_s": time.time() - started,
                         **labels, **tracker.last})
        tracker.close(exit_code=1)
        raise
    summary = tracker.summary({**summary, **labels, "wall_s": time.time() - started})
    tracker.close()
    say(f"run directory: {run_dir}")
    return summary


# ----------------------------------------------------------------------------- models


@dataclass
class Models:
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # the frozen start: live reference and generation metrics
    step_reference: torch.nn.Module | None  # what the DPO step scores with (None: cached log-probs)
    ref_logps: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [n, 2] when cached
    info: dict = field(default_factory=dict)


def build_models(cfg: RunConfig, prep: Prepared, s: StepSettings, device) -> Models:
    """The policy (the SFT checkpoint or the configured model), its frozen copy, and the cached
    reference log-probs when dpo.reference is `cache`."""
    seed_everything(cfg.train.seed)
    if prep.init_path is not None:
        policy = load_checkpoint(prep.init_path)
        info = {"model_source": f"{cfg.model.name} after SFT ({prep.init_path})",
                "n_params": hmodels.count_params(policy)}
    else:
        policy, info = hmodels.load_model(cfg.model, prep.tokenizer, cfg.data.max_length)
        info = {k: info[k] for k in ("model_source", "n_params")}
    hmodels.disable_dropout(policy)
    policy.to(device).train()
    live = cfg.dpo.reference == "model"
    reference = None
    if live or metrics.gen_enabled(cfg):  # generation metrics need the model itself
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    m = Models(policy, reference, reference if live else None, info=info)
    if not live:
        m.ref_logps, path, reused = cached_logps(policy, prep.splits, s, prep.tokenizer.pad_token_id,
                                                 device, cfg.dpo.reference_cache_dir,
                                                 cfg.tracking.progress)
        m.info.update({"reference_cache": str(path), "reference_cache_reused": reused})
    if cfg.train.gradient_checkpointing:
        hmodels.enable_checkpointing(policy)
    return m


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """A validation pass: pair metrics on `eval_batches`, preference accuracy when true rewards
    exist, generation metrics when on; logged, then handed to the eval hook."""

    def __init__(self, cfg: RunConfig, prep: Prepared, m: Models, s: StepSettings, device,
                 tracker: Tracker, on_eval: EvalHook | None):
        self.cfg, self.prep, self.m, self.s, self.device = cfg, prep, m, s, device
        self.tracker, self.on_eval = tracker, on_eval
        self.ref_samples = None  # the reference's samples, drawn once
        self.rows: list = []  # the last pass's generation table

    def __call__(self, step: int, seen: int) -> dict[str, float]:
        cfg, prep, m, s = self.cfg, self.prep, self.m, self.s
        pad, val, ref_val = prep.tokenizer.pad_token_id, prep.splits["validation"], m.ref_logps.get("validation")
        out = evaluate(m.policy, m.step_reference, ref_val, val, s, pad, self.device, cfg.train.eval_batches)
        out = {f"eval/{k}": v for k, v in out.items()}
        if prep.true_rewards.get("validation"):
            acc = pref_accuracy(m.policy, m.step_reference, ref_val, val, prep.true_rewards["validation"],
                                s, pad, self.device)
            if acc is not None:  # None: every validation pair has equal true rewards
                out["eval/pref_accuracy"] = acc
        if metrics.gen_enabled(cfg) and prep.eval_prompts:
            g, self.rows, self.ref_samples = gen_eval(
                m.policy, m.reference, prep.tokenizer, prep.eval_prompts, prep.reward_fn,
                cfg.gen_eval.max_new_tokens, cfg.gen_eval.seed, self.device, self.ref_samples)
            out.update(g)
        self.tracker.log(out, step, seen)
        if self.on_eval is not None:
            self.on_eval(step, out)
        return out


def micro_batches(cfg: RunConfig, items: list[hdata.TokenizedPair], pad_id: int
                  ) -> Iterator[tuple[torch.Tensor, hdata.Batch]]:
    """Training micro-batches, epoch after epoch: reshuffled (seeded) and optionally grouped by
    length each epoch."""
    t = cfg.train
    gen = torch.Generator().manual_seed(t.seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist() if t.shuffle else list(range(len(items)))
        if t.group_by_length:
            order = hdata.length_grouped(order, items, t.batch_size, gen)
        yield from hdata.batches(items, order, t.batch_size, pad_id, cfg.dpo.mask_prompt, t.drop_last)


def total_steps(cfg: RunConfig, n_train: int) -> int:
    t = cfg.train
    micro_per_epoch = n_train // t.batch_size if t.drop_last else math.ceil(n_train / t.batch_size)
    if micro_per_epoch == 0:
        raise ValueError(f"train.batch_size {t.batch_size} is larger than the {n_train} train pairs")
    return t.max_steps or max(1, int(t.epochs * micro_per_epoch) // t.grad_accum)


# ----------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Where the loop stands: what the final summary reports."""

    seen: int = 0  # pairs trained on
    tokens: int = 0  # non-padding tokens trained on
    last_train: dict[str, float] = field(default_factory=dict)  # the last logged train metrics
    last_eval: dict[str, float] = field(default_factory=dict)  # the last validation pass


def _run(cfg: RunConfig, run_dir: Path, device, tracker: Tracker, say, on_eval) -> dict:
    t, s = cfg.train, StepSettings.from_config(cfg)
    prep = prepare(cfg, device, say)
    splits = prep.splits
    m = build_models(cfg, prep, s, device)
    steps = total_steps(cfg, len(splits["train"]))
    optimizer = optim.adamw(m.policy, device, t.lr, t.weight_decay, t.adam_betas)
    scheduler = optim.scheduler(optimizer, t.schedule, t.warmup_steps, steps)
    say(f"model: {m.info['model_source']} ({m.info['n_params'] / 1e6:.2f}M params) | "
        f"tokenizer: {prep.info['tokenizer_source']} | device: {device} | "
        f"wandb: {tracker.wandb.mode if tracker.wandb else 'disabled'}\n"
        f"pairs train/validation/test: {len(splits['train'])}/{len(splits['validation'])}/"
        f"{len(splits['test'])} | {t.batch_size * t.grad_accum} pairs per step ({t.batch_size} x "
        f"{t.grad_accum} accum) | {steps} steps | run dir: {run_dir}")
    evaluate_now = Evaluator(cfg, prep, m, s, device, tracker, on_eval)
    p = _loop(cfg, prep, m, s, optimizer, scheduler, steps, evaluate_now, tracker, device)
    return _finish(cfg, run_dir, prep, m, s, steps, p, evaluate_now, tracker, device)


def _loop(cfg: RunConfig, prep: Prepared, m: Models, s: StepSettings, optimizer, scheduler,
          steps: int, evaluate_now: Evaluator, tracker: Tracker, device) -> Progress:
    """The optimizer steps, with train metrics every `log_every` steps and a validation pass
    every `eval_every` pairs (and at step 0)."""
    t, p = cfg.train, Progress()
    validate, pairs_per_step = bool(prep.splits["validation"]), t.batch_size * t.grad_accum
    p.last_eval = evaluate_now(0, 0) if validate and t.eval_every else {}
    stream = micro_batches(cfg, prep.splits["train"], prep.tokenizer.pad_token_id)
    window: dict[str, float] = defaultdict(float)
    window_pairs = 0
    bar = tqdm(total=steps, desc="dpo", unit="step", disable=not cfg.tracking.progress)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(t.grad_accum):
            idx, batch = next(stream)
            losses, pair = dpo_batch(m.policy, m.step_reference, m.ref_logps.get("train"), idx, batch,
                                     s, device)
            (losses.mean() / t.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            for k, v in pair.items():
                window[k] += v.sum().item()
            window_pairs += len(idx)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            m.policy.parameters(), t.max_grad_norm if t.max_grad_norm else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
        p.seen += pairs_per_step
        p.tokens += tokens
        if step % t.log_every == 0 or step == steps:
            p.last_train = {f"train/{k}": v / window_pairs for k, v in window.items()}
            p.last_train.update({"train/grad_norm": float(grad_norm), "train/lr": lr,
                                 "perf/tokens_per_s": tokens / step_s, "perf/step_s": step_s})
            tracker.log(p.last_train, step, p.seen)
            window.clear()
            window_pairs = 0
            bar.set_postfix(loss=f"{p.last_train['train/loss']:.4f}",
                            margin=f"{p.last_train['train/rewards/margins']:.3f}")
        if t.eval_every and validate and p.seen // t.eval_every > (p.seen - pairs_per_step) // t.eval_every:
            p.last_eval = evaluate_now(step, p.seen)
        bar.update(1)
    bar.close()
    if validate and (not t.eval_every or p.seen % t.eval_every):
        p.last_eval = evaluate_now(steps, p.seen)
    return p


def _finish(cfg: RunConfig, run_dir: Path, prep: Prepared, m: Models, s: StepSettings, steps: int,
            p: Progress, evaluate_now: Evaluator, tracker: Tracker, device) -> dict:
    """Test split, sample tables, weights and tokenizer; returns the run's summary."""
    t, test = cfg.train, {}
    if t.test_at_end and prep.splits["test"]:
        test = evaluate(m.policy, m.step_reference, m.ref_logps.get("test"), prep.splits["test"], s,
                        prep.tokenizer.pad_token_id, device, None)
        test = {f"test/{k}": v for k, v in test.items()}
        tracker.log(test, steps, p.seen)
    if evaluate_now.rows:
        tracker.table("gen/samples", ["prompt", "reference", "policy", "reference reward",
                                      "policy reward"], evaluate_now.rows[: cfg.gen_eval.table_rows])
    if t.sample_validation or t.sample_test:
        write_samples(cfg, m, prep, tracker, device)
    if t.save_model:
        hmodels.save_policy(m.policy, run_dir / "model")
    prep.tokenizer.save_pretrained(run_dir / "tokenizer")
    cache.atomic_json(run_dir / DATA_COUNTS, prep.counts)
    return {
        "status": "finished", "steps": steps, "examples_seen": p.seen, "tokens_seen": p.tokens,
        **p.last_train, **p.last_eval, **test, **prep.counts, **prep.info, **m.info,
        "gen/reward_available": prep.reward_fn is not None,
        "device": str(device), "torch": torch.__version__, "platform": platform.platform(),
    }


def write_samples(cfg: RunConfig, m: Models, prep: Prepared, tracker: Tracker, device) -> None:
    """Greedy answers of reference and policy to the first validation and test prompts."""
    from harness.samples import side_by_side

    t = cfg.train
    reference = m.reference
    if reference is None:  # cached reference: rebuild the starting model
        seed_everything(t.seed)
        reference, _ = hmodels.load_model(cfg.model, prep.tokenizer, cfg.data.max_length)
        reference.to(device).eval()
    prompts = [("validation", p.prompt) for p in prep.raw_splits["validation"][: t.sample_validation]]
    prompts += [("test", p.prompt) for p in prep.raw_splits["test"][: t.sample_test]]
    rows = side_by_side(m.policy, reference, prep.tokenizer, prompts, t.sample_max_new_tokens, device,
                        special_tokens=prep.special_tokens)
    tracker.table("samples", ["split", "prompt", "reference", "policy"], rows)
