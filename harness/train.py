"""One DPO run, end to end: `train(cfg)` reads top to bottom.

    prepare (tokenizer, pairs, SFT start)  →  models (policy, reference or cached log-probs)
    →  optimizer and schedule  (→ the checkpoint's state, when resuming a cut-off run)
    →  steps, with evals every `train.eval_every` pairs and checkpoints every
       `train.checkpoint_every` pairs  →  final eval, test split, samples  →  save

A non-finite training loss or gradient norm ends the run (`RunDiverged`, status `diverged`)
before the optimizer steps on it.

The parts are the library's (prepare, step, reference, optim, checkpoint, tracking); only the
loop lives here.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness import atomic, checkpoint, distributed, metrics, optim, phases
from harness import data as hdata
from harness import models as hmodels
from harness.chaos import crash_point
from harness.config import RunConfig
from harness.generate import gen_eval, reference_samples
from harness.prepare import Prepared, prepare
from harness.reference import cached_logps, weights_digest
from harness.rundir import DATA_COUNTS, checkpoint_dir, open_run_dir, run_labels
from harness.sft import load_checkpoint
from harness.step import StepSettings, dpo_batch, evaluate, pref_accuracy
from harness.tracking import Tracker

EvalHook = Callable[[int, dict[str, float]], None]
SAMPLE_COLUMNS = ["prompt", "reference", "policy", "reference reward", "policy reward"]  # gen/samples


class RunPruned(Exception):
    """Raised by an eval hook to stop a run early (a sweep's pruner); the run ends as `pruned`."""


class RunDiverged(Exception):
    """A non-finite training loss (of a micro-batch) or gradient norm at optimizer step `step`:
    the run ends as `diverged`, and the optimizer never stepped on it."""

    def __init__(self, step: int, quantity: str, value: float):
        super().__init__(f"step {step}: {quantity} is {value}")
        self.step, self.quantity, self.value = step, quantity, value

    def __reduce__(self):  # picklable across processes despite the custom signature
        return type(self), (self.step, self.quantity, self.value)


CUT_OFF = {KeyboardInterrupt: "interrupted", RunPruned: "pruned", RunDiverged: "diverged"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, run_dir: str | Path | None = None, on_eval: EvalHook | None = None,
          labels: dict | None = None) -> dict:
    """Train one DPO run; returns the summary (also written to run_dir/summary.json).

    `on_eval(step, metrics)` is called after every validation pass; it may raise RunPruned.
    `labels` (study, cell, trial, role, storage) are set by a sweep and written into the run files.
    A run_dir holding a cut-off run (no summary, or a status other than finished) resumes from
    its checkpoint when that was saved under the same config, else starts over; a finished run
    is refused (FileExistsError). RunDiverged, RunPruned and KeyboardInterrupt propagate after
    the summary is written.
    """
    world, device = distributed.setup(cfg.train.device)
    distributed.check_batch(world, cfg.train.batch_size)
    # What the run computes in, and what the machine does natively: part of the result (a bf16
    # run and an fp32 run are different experiments; a study never pools them, a resume never
    # mixes them).
    arithmetic = hmodels.precision_record(device, cfg.train.precision)
    if world.main:  # under torchrun, rank 0 alone touches the run files; all resume alike
        try:
            start = open_run_dir(cfg.tracking.results_dir, cfg.name, run_dir, cfg.to_dict(),
                                 arithmetic["precision"])
        except Exception as err:  # every rank raises it (a finished run_dir, say)
            start = err
    start = world.broadcast(start if world.main else None)
    if isinstance(start, Exception):
        raise start
    run_dir, resume = start
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    labels = run_labels(cfg, labels)
    tracker = Tracker.for_run(run_dir, cfg, labels) if world.main else Tracker([])
    if resume is not None:
        tracker.last.update(resume.state["tracker_last"])
    progress = cfg.tracking.progress and world.main
    say = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    started = time.time()
    say(f"precision: {hmodels.describe_precision(arithmetic)}")
    ends = {"resumed_from_step": resume.step if resume else None, "diverged_at_step": None,
            **arithmetic}
    try:
        with phases.timing() as spent:
            summary = _run(cfg, run_dir, device, tracker, say, on_eval, resume, world)
    except BaseException as err:
        if isinstance(err, RunDiverged):
            ends["diverged_at_step"] = err.step
        tracker.summary({"status": CUT_OFF.get(type(err), "failed"), "error": repr(err),
                         "wall_s": time.time() - started, **ends, **labels, **tracker.last,
                         **phases.summary_keys(spent)})
        tracker.close(exit_code=1)
        raise
    summary = tracker.summary({**summary, **labels, **ends, "wall_s": time.time() - started,
                               **phases.summary_keys(spent)})
    tracker.close()
    if not cfg.train.keep_checkpoint and world.main:
        checkpoint.remove(checkpoint_dir(run_dir))
    say(f"run directory: {run_dir}")
    return summary


# ----------------------------------------------------------------------------- models


@dataclass
class Models:
    policy: torch.nn.Module
    train_policy: torch.nn.Module  # what the step runs: the policy, or DDP around its log-probs
    reference: torch.nn.Module | None  # the frozen start: live reference and generation metrics
    step_reference: torch.nn.Module | None  # what the DPO step scores with (None: cached log-probs)
    ref_logps: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [n, 2] when cached
    info: dict = field(default_factory=dict)
    # weights_digest of the frozen start, hashed once: it keys the reference log-prob and sample
    # caches (None when neither is used)
    reference_digest: str | None = None


def start_model(cfg: RunConfig, prep: Prepared, device) -> tuple[torch.nn.Module, dict]:
    """The model DPO starts from, on `device` in eval mode without dropout: the SFT checkpoint
    when the run has an SFT stage, else the configured model (seeded: a random init is the same
    every time). The one builder of the frozen start: the policy's initial weights, the live
    reference, and the samples' reference when the reference is cached."""
    seed_everything(cfg.train.seed)
    if prep.init_path is not None:
        model = load_checkpoint(prep.init_path)
        info = {"model_source": f"{cfg.model.name} after SFT ({prep.init_path})",
                "n_params": hmodels.count_params(model)}
    else:
        model, info = hmodels.load_model(cfg.model, prep.tokenizer, cfg.data.max_length)
        info = {k: info[k] for k in ("model_source", "n_params")}
    hmodels.disable_dropout(model)
    return model.to(device).eval(), info


def build_models(cfg: RunConfig, prep: Prepared, s: StepSettings, device,
                 world: distributed.World = distributed.World()) -> Models:
    """The policy (the SFT checkpoint or the configured model), its frozen copy, and the cached
    reference log-probs when dpo.reference is `cache`."""
    policy, info = start_model(cfg, prep, device)
    policy.train()
    live = cfg.dpo.reference == "model"
    reference = None
    if live or metrics.gen_enabled(cfg):  # generation metrics need the model itself
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    m = Models(policy, policy, reference, reference if live else None, info=info)
    if not live or metrics.gen_enabled(cfg):
        m.reference_digest = weights_digest(policy)
    if not live:
        m.ref_logps, path, reused = cached_logps(policy, prep.splits, s, prep.tokenizer.pad_token_id,
                                                 device, cfg.dpo.reference_cache_dir,
                                                 cfg.tracking.progress, world, m.reference_digest)
        m.info.update({"reference_cache": str(path), "reference_cache_reused": reused})
    if cfg.train.gradient_checkpointing:
        hmodels.enable_checkpointing(policy)
    m.train_policy = distributed.wrap(world, policy, device)
    return m


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """A validation pass: pair metrics on `eval_batches`, preference accuracy when true rewards
    exist, generation metrics and their samples table (`gen/samples`) when on; logged, then
    handed to the eval hook."""

    def __init__(self, cfg: RunConfig, prep: Prepared, m: Models, s: StepSettings, device,
                 tracker: Tracker, on_eval: EvalHook | None,
                 world: distributed.World = distributed.World()):
        self.cfg, self.prep, self.m, self.s, self.device = cfg, prep, m, s, device
        self.tracker, self.on_eval, self.world = tracker, on_eval, world
        self.ref_samples = None  # the reference's samples: drawn once per reference, shared on disk
        self.rows: list = []  # the last pass's generation table

    def __call__(self, step: int, seen: int) -> dict[str, float]:
        """The pass on rank 0 while any other ranks wait (they return {})."""
        out = self._evaluate(step, seen) if self.world.main else {}
        self.world.barrier()
        return out

    def _evaluate(self, step: int, seen: int) -> dict[str, float]:
        cfg, prep, m, s = self.cfg, self.prep, self.m, self.s
        pad, val, ref_val = prep.tokenizer.pad_token_id, prep.splits["validation"], m.ref_logps.get("validation")
        with phases.phase("eval"):
            out = evaluate(m.policy, m.step_reference, ref_val, val, s, pad, self.device,
                           cfg.train.eval_batches)
            out = {f"eval/{k}": v for k, v in out.items()}
            if prep.true_rewards.get("validation"):
                acc = pref_accuracy(m.policy, m.step_reference, ref_val, val,
                                    prep.true_rewards["validation"], s, pad, self.device)
                if acc is not None:  # None: every validation pair has equal true rewards
                    out["eval/pref_accuracy"] = acc
        if metrics.gen_enabled(cfg) and prep.eval_prompts:
            with phases.phase("gen"):
                if self.ref_samples is None:
                    self.ref_samples, reused = reference_samples(
                        m.reference, prep.tokenizer, prep.eval_prompts, cfg.gen_eval.max_new_tokens,
                        cfg.gen_eval.seed, self.device, cfg.dpo.reference_cache_dir,
                        m.reference_digest)
                    m.info["reference_samples_reused"] = reused
                g, self.rows, _ = gen_eval(
                    m.policy, m.reference, prep.tokenizer, prep.eval_prompts, prep.reward_fn,
                    cfg.gen_eval.max_new_tokens, cfg.gen_eval.seed, self.device, self.ref_samples,
                    prep.parse_fn)
            out.update(g)
        self.tracker.log(out, step, seen)
        if self.rows:  # at every eval: wandb's step slider shows how the samples changed
            self.tracker.table("gen/samples", SAMPLE_COLUMNS, self.rows[: cfg.gen_eval.table_rows],
                               step, seen)
        if self.on_eval is not None:
            self.on_eval(step, out)
        return out


def micro_batches(cfg: RunConfig, items: list[hdata.TokenizedPair], pad_id: int,
                  world: distributed.World = distributed.World()
                  ) -> Iterator[tuple[torch.Tensor, hdata.Batch, int]]:
    """Training micro-batches, epoch after epoch: reshuffled (seeded) and optionally grouped by
    length each epoch, as (pair indices, batch, pairs in the global batch). Under torchrun each
    rank gets its slice of the same global batch."""
    t = cfg.train
    gen = torch.Generator().manual_seed(t.seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist() if t.shuffle else list(range(len(items)))
        if t.group_by_length:
            order = hdata.length_grouped(order, items, t.batch_size, gen)
        if not world.active:
            for idx, batch in hdata.batches(items, order, t.batch_size, pad_id, cfg.dpo.mask_prompt,
                                            t.drop_last):
                yield idx, batch, len(idx)
            continue
        for idx, n in world.shards(order, t.batch_size, t.drop_last):
            yield torch.tensor(idx), hdata.collate([items[i] for i in idx], pad_id, cfg.dpo.mask_prompt), n


def total_steps(cfg: RunConfig, n_train: int) -> int:
    t = cfg.train
    micro_per_epoch = n_train // t.batch_size if t.drop_last else math.ceil(n_train / t.batch_size)
    if micro_per_epoch == 0:
        raise ValueError(f"train.batch_size {t.batch_size} is larger than the {n_train} train pairs")
    return t.max_steps or max(1, int(t.epochs * micro_per_epoch) // t.grad_accum)


# ----------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Where the loop stands: what the final summary reports and what a checkpoint restores."""

    step: int = 0  # optimizer steps done
    seen: int = 0  # pairs trained on
    tokens: int = 0  # non-padding tokens trained on
    micro_batches: int = 0  # drawn from the train stream: the data position
    last_train: dict[str, float] = field(default_factory=dict)  # the last logged train metrics
    last_eval: dict[str, float] = field(default_factory=dict)  # the last validation pass
    window: dict[str, float] = field(default_factory=dict)  # per-pair metric sums since last log
    window_pairs: int = 0  # pairs in `window`


def _run(cfg: RunConfig, run_dir: Path, device, tracker: Tracker, say, on_eval,
         resume: checkpoint.Checkpoint | None, world: distributed.World) -> dict:
    t, s = cfg.train, StepSettings.from_config(cfg)
    prep = prepare(cfg, device, say)
    splits = prep.splits
    m = build_models(cfg, prep, s, device, world)
    steps = total_steps(cfg, len(splits["train"]))
    optimizer = optim.adamw(m.policy, device, t.lr, t.weight_decay, t.adam_betas)
    scheduler = optim.scheduler(optimizer, t.schedule, t.warmup_steps, steps)
    say(f"model: {m.info['model_source']} ({m.info['n_params'] / 1e6:.2f}M params) | "
        f"tokenizer: {prep.info['tokenizer_source']} | device: {device} | "
        f"wandb: {tracker.wandb.mode if tracker.wandb else 'disabled'}\n"
        f"pairs train/validation/test: {len(splits['train'])}/{len(splits['validation'])}/"
        f"{len(splits['test'])} | {t.batch_size * t.grad_accum} pairs per step ({t.batch_size} x "
        f"{t.grad_accum} accum) | {steps} steps | run dir: {run_dir}"
        + (f" | {world.size} processes ({world.backend})" if world.active else ""))
    p = Progress()
    if resume is not None:
        checkpoint.restore(resume, m.policy, optimizer, scheduler)
        p = Progress(**resume.state["progress"])

    def save(p: Progress) -> None:
        if world.main:
            checkpoint.save(checkpoint_dir(run_dir), cfg.to_dict(),
                            hmodels.resolve_precision(device, t.precision), asdict(p), tracker,
                            m.policy, optimizer, scheduler)
            crash_point("checkpoint")
        world.barrier()

    evaluate_now = Evaluator(cfg, prep, m, s, device, tracker, on_eval, world)
    p = _loop(cfg, prep, m, s, optimizer, scheduler, steps, evaluate_now, tracker, device, p, save,
              world)
    summary = _finish(cfg, run_dir, prep, m, s, steps, p, tracker, device) \
        if world.main else {"status": "finished", "steps": steps}
    world.barrier()
    return {**summary, "world_size": world.size, "distributed_backend": world.backend}


def _crossed(seen: int, pairs_per_step: int, every: int) -> bool:
    """Whether the last step's pairs crossed a multiple of `every` pairs."""
    return seen // every > (seen - pairs_per_step) // every


def _loop(cfg: RunConfig, prep: Prepared, m: Models, s: StepSettings, optimizer, scheduler,
          steps: int, evaluate_now: Evaluator, tracker: Tracker, device, p: Progress,
          save: Callable[[Progress], None], world: distributed.World) -> Progress:
    """The optimizer steps after p.step (0, or a checkpoint's step), with train metrics every
    `log_every` steps, a validation pass every `eval_every` pairs (and at step 0) and a
    checkpoint every `checkpoint_every` pairs (never at the last step: the run saves its end)."""
    t = cfg.train
    validate, pairs_per_step = bool(prep.splits["validation"]), t.batch_size * t.grad_accum
    if p.step == 0 and validate and t.eval_every:
        p.last_eval = evaluate_now(0, 0)
    stream = micro_batches(cfg, prep.splits["train"], prep.tokenizer.pad_token_id, world)
    stream = itertools.islice(stream, p.micro_batches, None)  # a resumed run's data position
    bar = tqdm(total=steps, initial=p.step, desc="dpo", unit="step",
               disable=not (cfg.tracking.progress and world.main))
    for step in range(p.step + 1, steps + 1):
        t0 = time.perf_counter()
        with phases.phase("train"):
            grad_norm, lr, tokens = _optimizer_step(cfg, m, s, optimizer, scheduler, stream, p,
                                                    step, device, world)
        step_s = time.perf_counter() - t0
        p.step, p.seen, p.tokens = step, p.seen + pairs_per_step, p.tokens + tokens
        if step % t.log_every == 0 or step == steps:
            _log_train(p, tracker, world, {"train/grad_norm": grad_norm, "train/lr": lr,
                                    "perf/tokens_per_s": tokens / step_s, "perf/step_s": step_s})
            bar.set_postfix(loss=f"{p.last_train['train/loss']:.4f}",
                            margin=f"{p.last_train['train/rewards/margins']:.3f}")
        if t.eval_every and validate and _crossed(p.seen, pairs_per_step, t.eval_every):
            p.last_eval = evaluate_now(step, p.seen)
        if t.checkpoint_every and step < steps and _crossed(p.seen, pairs_per_step, t.checkpoint_every):
            save(p)
        bar.update(1)
    bar.close()
    if validate and (not t.eval_every or p.seen % t.eval_every):
        p.last_eval = evaluate_now(steps, p.seen)
    return p


def _optimizer_step(cfg: RunConfig, m: Models, s: StepSettings, optimizer, scheduler,
                    stream: Iterator, p: Progress, step: int, device, world: distributed.World
                    ) -> tuple[float, float, int]:
    """One optimizer step over `grad_accum` micro-batches, their pair metrics summed into
    p.window: (gradient norm before clipping, learning rate, tokens). Raises RunDiverged on a
    non-finite micro-batch loss (on any rank) or gradient norm, before the optimizer steps."""
    t, tokens = cfg.train, 0
    for i in range(t.grad_accum):
        idx, batch, n = next(stream)
        p.micro_batches += 1
        with distributed.no_sync(m.train_policy, last=i == t.grad_accum - 1):
            losses, pair = dpo_batch(m.train_policy, m.step_reference, m.ref_logps.get("train"),
                                     idx, batch, s, device)
            # A rank's share of the global batch's mean loss (DDP averages over the ranks).
            loss = losses.sum() * (world.size / n) if world.active else losses.mean()
            total = world.sum([losses.detach().sum().item()])[0]
            if not math.isfinite(total):
                raise RunDiverged(step, "the train loss", total / n)
            (loss / t.grad_accum).backward()
        tokens += int(batch["attention_mask"].sum())
        for k, v in pair.items():
            p.window[k] = p.window.get(k, 0.0) + v.sum().item()
        p.window_pairs += len(idx)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        m.policy.parameters(), t.max_grad_norm if t.max_grad_norm else float("inf"))
    if not torch.isfinite(grad_norm):
        raise RunDiverged(step, "the gradient norm", float(grad_norm))
    lr = scheduler.get_last_lr()[0]
    tokens = int(world.sum([tokens])[0])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr, tokens


def _log_train(p: Progress, tracker: Tracker, world: distributed.World,
               extra: dict[str, float]) -> None:
    """Log the window's mean pair metrics over all ranks (and `extra`) as p.last_train; empty
    the window."""
    keys = sorted(p.window)
    *sums, pairs = world.sum([p.window[k] for k in keys] + [p.window_pairs])
    p.last_train = {f"train/{k}": v / pairs for k, v in zip(keys, sums, strict=True)}
    p.last_train.update(extra)
    tracker.log(p.last_train, p.step, p.seen)
    p.window.clear()
    p.window_pairs = 0


def _finish(cfg: RunConfig, run_dir: Path, prep: Prepared, m: Models, s: StepSettings, steps: int,
            p: Progress, tracker: Tracker, device) -> dict:
    """Test split, greedy samples, weights and tokenizer; returns the run's summary (the last
    eval logged the final gen/samples table)."""
    t, test = cfg.train, {}
    if t.test_at_end and prep.splits["test"]:
        with phases.phase("eval"):
            test = evaluate(m.policy, m.step_reference, m.ref_logps.get("test"), prep.splits["test"],
                            s, prep.tokenizer.pad_token_id, device, None)
        test = {f"test/{k}": v for k, v in test.items()}
        tracker.log(test, steps, p.seen)
    if t.sample_validation or t.sample_test:
        write_samples(cfg, m, prep, tracker, device)
    if t.save_model:
        hmodels.save_policy(m.policy, run_dir / "model")
    prep.tokenizer.save_pretrained(run_dir / "tokenizer")
    atomic.atomic_json(run_dir / DATA_COUNTS, prep.counts)
    return {
        "status": "finished", "steps": steps, "examples_seen": p.seen, "tokens_seen": p.tokens,
        **p.last_train, **p.last_eval, **test, **prep.counts, **prep.info, **m.info,
        "gen/reward_available": prep.reward_fn is not None,
        **degenerate(p.last_eval, cfg.gen_eval.kl_ceiling, cfg.gen_eval.parsed_floor),
        "device": str(device), "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__, "platform": platform.platform(),
    }


def degenerate(last_eval: dict[str, float], kl_ceiling: float | None,
               parsed_floor: float | None) -> dict[str, bool | str | None]:
    """`degenerate` (and why) from the final eval: gen/kl past gen_eval.kl_ceiling (a non-finite
    KL counts as past it) or gen/parsed below gen_eval.parsed_floor. None when no check applies."""
    kl, parsed = last_eval.get("gen/kl"), last_eval.get("gen/parsed")
    checks = []
    if kl is not None and kl_ceiling is not None:
        checks.append(None if kl <= kl_ceiling else f"gen/kl {kl:.3g} > {kl_ceiling:g} nats")
    if parsed is not None and parsed_floor is not None:
        checks.append(None if parsed >= parsed_floor else f"gen/parsed {parsed:.2f} < {parsed_floor:g}")
    if not checks:
        return {"degenerate": None}
    reasons = [r for r in checks if r]
    return {"degenerate": bool(reasons), "degenerate_reason": "; ".join(reasons) or None}


def write_samples(cfg: RunConfig, m: Models, prep: Prepared, tracker: Tracker, device) -> None:
    """Greedy answers of reference and policy to the first validation and test prompts."""
    from harness.samples import side_by_side

    t = cfg.train
    reference = m.reference
    if reference is None:  # cached reference: rebuild the start (the SFT checkpoint when there is one)
        reference, _ = start_model(cfg, prep, device)
    prompts = [("validation", p.prompt) for p in prep.raw_splits["validation"][: t.sample_validation]]
    prompts += [("test", p.prompt) for p in prep.raw_splits["test"][: t.sample_test]]
    rows = side_by_side(m.policy, reference, prep.tokenizer, prompts, t.sample_max_new_tokens, device,
                        special_tokens=prep.special_tokens)
    tracker.table("samples", ["split", "prompt", "reference", "policy"], rows)
