"""One DPO run as a recipe: `train(cfg)` builds a `Run` once, then `loop` reads top to bottom.

    prepare (tokenizer, pairs, SFT start)  →  models (policy, reference or cached log-probs)
    →  optimizer and schedule  (→ the checkpoint's state, when resuming a cut-off run)
    →  steps, with evals every `train.eval_every` pairs and checkpoints every
       `train.checkpoint_every` pairs  →  final eval, test split, samples  →  save

A non-finite training loss or gradient norm ends the run (`RunDiverged`, status `diverged`)
before the optimizer steps on it. The parts are the library's (prepare, step, reference, optim,
checkpoint, evaluation, tracking); the run's state lives on `Run`, and only the loop lives here.
"""

from __future__ import annotations

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

from harness import (
    adapters,
    atomic,
    checkpoint,
    distributed,
    export,
    lowp,
    memory,
    metrics,
    optim,
    phases,
    plan,
)
from harness import data as hdata
from harness import device as hdevice
from harness import models as hmodels
from harness.chaos import crash_point
from harness.config import RunConfig
from harness.errors import CUT_OFF, RunDiverged
from harness.evaluation import EvalHook, Evaluator, degenerate, scoring, write_samples
from harness.prepare import Prepared, prepare
from harness.reference import cached_logps, weights_digest
from harness.rundir import DATA_COUNTS, checkpoint_dir, open_run_dir, run_labels
from harness.sft import load_checkpoint
from harness.step import Stepper, StepSettings, evaluate, optimizer_step
from harness.tracking import Tracker


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
    world, device = distributed.setup(cfg.train.device, cfg.train.distributed)
    distributed.check_batch(world, cfg.train.batch_size)
    distributed.check_strategy(world, {"gen_eval.enabled": metrics.gen_enabled(cfg),
                                       "train.sample_validation": bool(cfg.train.sample_validation),
                                       "train.sample_test": bool(cfg.train.sample_test),
                                       "model.lora.r": cfg.model.lora.enabled})
    # What the run computes in, and what the machine does natively: part of the result (a bf16
    # run and an fp32 run are different experiments; a study never pools them, a resume never
    # mixes them).
    arithmetic = hdevice.precision_record(device, cfg.train.precision)
    run_dir, resume = _start_or_resume(cfg, run_dir, arithmetic["precision"], world)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    labels = run_labels(cfg, labels)
    tracker = Tracker.for_run(run_dir, cfg, labels) if world.main else Tracker([])
    if resume is not None:
        tracker.last.update(resume.state["tracker_last"])
    say = (lambda *a: print(*a, file=sys.stderr)) if cfg.tracking.progress and world.main else (lambda *a: None)
    started = time.time()
    say(f"precision: {hdevice.describe_precision(arithmetic)}")
    ends = {"resumed_from_step": resume.step if resume else None, "diverged_at_step": None,
            **arithmetic}
    try:
        with phases.timing() as spent:
            run = Run.build(cfg, run_dir, device, world, tracker, say, on_eval, resume)
            loop(run)
            summary = finish(run)
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


def _start_or_resume(cfg: RunConfig, run_dir, precision: str, world: distributed.World):
    """(run directory, checkpoint to resume or None), decided on rank 0 and sent to every rank;
    an error there (a finished run_dir, say) is raised on every rank."""
    if world.main:  # under torchrun, rank 0 alone touches the run files; all resume alike
        try:
            start = open_run_dir(cfg.tracking.results_dir, cfg.name, run_dir, cfg.to_dict(), precision)
        except Exception as err:
            start = err
    start = world.broadcast(start if world.main else None)
    if isinstance(start, Exception):
        raise start
    return start


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


def start_model(cfg: RunConfig, prep: Prepared, device, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.nn.Module, dict]:
    """The model DPO starts from, in `dtype` on `device` in eval mode without dropout: the SFT
    checkpoint when the run has an SFT stage, else the configured model (seeded: a random init is
    the same every time). The one builder of the frozen start: the policy's initial weights (or a
    LoRA policy's base), the live reference, and the samples' reference when it is cached."""
    seed_everything(cfg.train.seed)
    if prep.init_path is not None:
        model = load_checkpoint(prep.init_path).to(dtype)
        info = {"model_source": f"{cfg.model.name} after SFT ({prep.init_path})",
                "n_params": hmodels.count_params(model)}
    else:
        model, info = hmodels.load_model(cfg.model, prep.tokenizer, cfg.data.max_length, dtype)
        info = {k: info[k] for k in ("model_source", "n_params")}
    hmodels.disable_dropout(model)
    return model.to(device).eval(), info


def build_models(cfg: RunConfig, prep: Prepared, s: StepSettings, device,
                 world: distributed.World = distributed.World()) -> Models:
    """The policy (the SFT checkpoint or the configured model, or LoRA adapters on it), its frozen
    reference, and the cached reference log-probs when dpo.reference is `cache`.

    Which weights are in which dtype (model.dtype, model.trainable_dtype): trained weights in
    float32 master copies; the frozen ones (a full run's reference copy, a LoRA run's base) in
    model.dtype. The reference is one of three things, chosen here: cached log-probs, the LoRA
    base with its adapter disabled, or a frozen copy of the start in model.dtype."""
    precision = hdevice.resolve_precision(device, cfg.train.precision)
    frozen = hmodels.frozen_dtype(cfg.model, precision)
    lora = cfg.model.lora.enabled
    # bf16-stored frozen weights in an fp32 run are widened layer by layer (harness.lowp)
    widen = lowp.compute_in if frozen != torch.float32 and precision == "fp32" else (lambda m: m)
    policy, info = start_model(cfg, prep, device, frozen if lora else hmodels.trainable_dtype(cfg.model))
    if lora:
        policy = adapters.wrap(widen(policy.requires_grad_(False)), cfg.model.lora)
        scorer = adapters.AdapterOff(policy)
    else:
        scorer = widen(hmodels.frozen_copy(policy, frozen))
    policy.train()
    live, gen = cfg.dpo.reference == "model", metrics.gen_enabled(cfg)
    reference = scorer if live or gen or lora else None
    m = Models(policy, policy, reference, scorer if live else None, info=info)
    if not live or gen:
        m.reference_digest = weights_digest(scorer)
    if not live:
        m.ref_logps, path, reused = cached_logps(scorer, prep.splits, s, prep.tokenizer.pad_token_id,
                                                 device, cfg.dpo.reference_cache_dir,
                                                 cfg.tracking.progress, world, m.reference_digest)
        m.info.update({"reference_cache": str(path), "reference_cache_reused": reused})
    del scorer  # a cached full reference is freed here
    m.info.update(plan.state_record(policy, m.reference))
    if cfg.train.gradient_checkpointing:
        hmodels.enable_checkpointing(policy)
    m.train_policy = distributed.wrap(world, policy, device)
    return m


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


@dataclass
class Run:
    """Everything one run holds, built once: its config, data, models, optimizer step, where it
    stands, and where it reports."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    world: distributed.World
    tracker: Tracker
    prep: Prepared
    models: Models
    settings: StepSettings
    stepper: Stepper  # what optimizer_step reads and changes
    steps: int  # optimizer steps in all
    progress: Progress
    evaluate: Evaluator
    say: Callable[..., None]
    watermark: memory.Watermark  # memory from before the models loaded to the last step

    @classmethod
    def build(cls, cfg: RunConfig, run_dir: Path, device, world: distributed.World, tracker: Tracker,
              say, on_eval: EvalHook | None, resume: checkpoint.Checkpoint | None) -> Run:
        t, s = cfg.train, StepSettings.from_config(cfg)
        prep = prepare(cfg, device, say)
        watermark = memory.Watermark.start(device)  # what harness plan estimates starts here
        m = build_models(cfg, prep, s, device, world)
        m.step_reference = distributed.wrap_reference(world, m.step_reference, device)  # FSDP: sharded
        steps = total_steps(cfg, len(prep.splits["train"]))
        optimizer = optim.adamw(m.policy, device, t.lr, t.weight_decay, t.adam_betas)
        scheduler = optim.scheduler(optimizer, t.schedule, t.warmup_steps, steps)
        stepper = Stepper(m.policy, m.train_policy, m.step_reference, m.ref_logps.get("train"), s,
                          optimizer, scheduler, t.max_grad_norm, device, world)
        p = Progress()
        if resume is not None:
            checkpoint.restore(resume, m.policy, optimizer, scheduler)
            p = Progress(**resume.state["progress"])
        run = cls(cfg, run_dir, device, world, tracker, prep, m, s, stepper, steps, p, None, say,
                  watermark)
        run.evaluate = Evaluator(run, on_eval)
        say(run.header())
        return run

    def header(self) -> str:
        t, splits, m, w = self.cfg.train, self.prep.splits, self.models, self.world
        wandb = self.tracker.wandb.mode if self.tracker.wandb else "disabled"
        return (f"model: {m.info['model_source']} ({m.info['n_params'] / 1e6:.2f}M params) | "
                f"tokenizer: {self.prep.info['tokenizer_source']} | device: {self.device} | "
                f"wandb: {wandb}\npairs train/validation/test: {len(splits['train'])}/"
                f"{len(splits['validation'])}/{len(splits['test'])} | {t.batch_size * t.grad_accum} "
                f"pairs per step ({t.batch_size} x {t.grad_accum} accum) | {self.steps} steps | "
                f"run dir: {self.run_dir}" + (f" | {w.size} processes ({w.strategy}, {w.backend})"
                                            if w.active else ""))

    def save_checkpoint(self) -> None:
        if self.world.main or self.world.fsdp:  # FSDP: every rank writes its shards
            precision = hdevice.resolve_precision(self.device, self.cfg.train.precision)
            checkpoint.save(checkpoint_dir(self.run_dir), self.cfg.to_dict(), precision, asdict(self.progress),
                            self.tracker, self.models.policy, self.stepper.optimizer,
                            self.stepper.scheduler, self.world)
        if self.world.main:
            crash_point("checkpoint")
        self.world.barrier()

    def log_train(self, extra: dict[str, float]) -> None:
        """Log the window's mean pair metrics over all ranks (and `extra`) as the last train
        metrics; empty the window."""
        p = self.progress
        keys = sorted(p.window)
        *sums, pairs = self.world.sum([p.window[k] for k in keys] + [p.window_pairs])
        p.last_train = {f"train/{k}": v / pairs for k, v in zip(keys, sums, strict=True)}
        p.last_train.update(extra)
        self.tracker.log(p.last_train, p.step, p.seen)
        p.window.clear()
        p.window_pairs = 0


def _crossed(seen: int, pairs_per_step: int, every: int) -> bool:
    """Whether the last step's pairs crossed a multiple of `every` pairs."""
    return seen // every > (seen - pairs_per_step) // every


def loop(run: Run) -> None:
    """The optimizer steps after the run's progress (0, or a checkpoint's step): train metrics
    every `log_every` steps, a validation pass every `eval_every` pairs (and at step 0), a
    checkpoint every `checkpoint_every` pairs (never at the last step: the run saves its end)."""
    t, p, steps = run.cfg.train, run.progress, run.steps
    validate, pairs_per_step = bool(run.prep.splits["validation"]), t.batch_size * t.grad_accum
    if p.step == 0 and validate and t.eval_every:
        p.last_eval = run.evaluate(0, 0)
    stream = micro_batches(run.cfg, run.prep.splits["train"], run.prep.tokenizer.pad_token_id, run.world)
    stream = itertools.islice(stream, p.micro_batches, None)  # a resumed run's data position
    bar = tqdm(total=steps, initial=p.step, desc="dpo", unit="step",
               disable=not (run.cfg.tracking.progress and run.world.main))
    for step in range(p.step + 1, steps + 1):
        t0 = time.perf_counter()
        with phases.phase("train"):
            micro = [next(stream) for _ in range(t.grad_accum)]
            p.micro_batches += len(micro)
            out = optimizer_step(run.stepper, micro, step)
        step_s = time.perf_counter() - t0
        p.step, p.seen, p.tokens = step, p.seen + pairs_per_step, p.tokens + out.tokens
        for k, v in out.sums.items():
            p.window[k] = p.window.get(k, 0.0) + v
        p.window_pairs += out.pairs
        if step % t.log_every == 0 or step == steps:
            run.log_train({"train/grad_norm": out.grad_norm, "train/lr": out.lr,
                           "perf/tokens_per_s": out.tokens / step_s, "perf/step_s": step_s})
            bar.set_postfix(loss=f"{p.last_train['train/loss']:.4f}",
                            margin=f"{p.last_train['train/rewards/margins']:.3f}")
        if t.eval_every and validate and _crossed(p.seen, pairs_per_step, t.eval_every):
            p.last_eval = run.evaluate(step, p.seen)
        if t.checkpoint_every and step < steps and _crossed(p.seen, pairs_per_step, t.checkpoint_every):
            run.save_checkpoint()
        bar.update(1)
    bar.close()
    run.models.info.update(run.watermark.record())  # the training's peak, before eval and export
    if validate and (not t.eval_every or p.seen % t.eval_every):
        p.last_eval = run.evaluate(steps, p.seen)


def evaluate_test(run: Run) -> dict[str, float]:
    """test/* metrics of the whole test split, logged (rank 0 alone logs; under FSDP every rank
    runs the pass); {} without a test pass."""
    cfg, prep, m = run.cfg, run.prep, run.models
    if not (cfg.train.test_at_end and prep.splits["test"]):
        return {}
    with phases.phase("eval"):
        test = evaluate(scoring(run), m.step_reference, m.ref_logps.get("test"), prep.splits["test"],
                        run.settings, prep.tokenizer.pad_token_id, run.device, None)
    test = {f"test/{k}": v for k, v in test.items()}
    run.tracker.log(test, run.steps, run.progress.seen)
    return test


def finish(run: Run) -> dict:
    """Test split, greedy samples, weights and tokenizer (rank 0); returns the run's summary (the
    last eval logged the final gen/samples table). Under FSDP every rank runs the test pass and
    gathers the weights, which rank 0 then holds whole on its CPU as `models.policy`."""
    cfg, prep, m, p, device = run.cfg, run.prep, run.models, run.progress, run.device
    ranks = {"world_size": run.world.size, "distributed_backend": run.world.backend}
    test = evaluate_test(run) if run.world.main or run.world.fsdp else {}
    if run.world.fsdp and cfg.train.save_model:
        m.policy = distributed.gathered(run.world, m.train_policy)
    if not run.world.main:
        run.world.barrier()
        return {"status": "finished", "steps": run.steps, **ranks}
    if cfg.train.sample_validation or cfg.train.sample_test:
        # a cached reference: rebuild the frozen start (the SFT checkpoint when there is one)
        write_samples(run, m.reference or start_model(cfg, prep, device)[0])
    prep.tokenizer.save_pretrained(run.run_dir / "tokenizer")
    atomic.atomic_json(run.run_dir / DATA_COUNTS, prep.counts)
    ends = {**p.last_train, **p.last_eval, **test}
    if cfg.train.save_model:  # a Hugging Face model directory: weights or adapter, tokenizer, card
        m.info["model_dir"] = str(export.model_dir(m.policy, prep.tokenizer, run.run_dir, cfg, ends))
    run.world.barrier()
    return {
        "status": "finished", "steps": run.steps, "examples_seen": p.seen, "tokens_seen": p.tokens,
        **ends, **prep.counts, **prep.info, **m.info,
        "gen/reward_available": prep.reward_fn is not None,
        **degenerate(p.last_eval, cfg.gen_eval.kl_ceiling, cfg.gen_eval.parsed_floor),
        "device": str(device), "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__, "platform": platform.platform(), **ranks,
    }
