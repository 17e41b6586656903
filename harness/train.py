"""One DPO run, end to end: `train(cfg)` reads top to bottom.

setup → data → models → reference log-probs → optimizer → loop (log, eval) → final eval → save.
The library parts (data, models, dpo, tracking) are imported; the loop lives here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness import data as hdata
from harness import models as hmodels
from harness.config import RunConfig, cache_root
from harness.dpo import dpo_loss, model_logps, pair_metrics
from harness.generate import gen_eval
from harness.sft import load_checkpoint, sft_checkpoint
from harness.tasks import TASKS
from harness.tracking import RunTracker, write_json_atomic

Batch = dict[str, torch.Tensor]
EvalHook = Callable[[int, dict[str, float]], None]


class RunPruned(Exception):
    """Raised by an eval hook to stop a run early (a sweep's pruner); the run ends as `pruned`."""


# ----------------------------------------------------------------------------- helpers

PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logratios/margins", "logps/chosen", "logps/rejected")


def logged_metrics(cfg: RunConfig) -> set[str]:
    """Every metric name a run of this config logs (a sweep checks its objective against it)."""
    names = {f"{split}/{m}" for split in ("train", "eval", "test") for m in PAIR_METRICS}
    names |= {"train/grad_norm", "train/lr", "perf/tokens_per_s", "perf/step_s"}
    if gen_enabled(cfg):
        names |= {"gen/kl", "gen/kl_se", "gen/length"}
        if cfg.task.name != "none":
            names |= {"gen/reward", "gen/reward_se", "gen/ref_reward", "gen/win_rate",
                      "eval/pref_accuracy"}
    return names


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(cfg: RunConfig, run_dir: str | Path | None) -> Path:
    """`--run-dir` as given, else results_dir/runs/<name>-<time>. A finished run is never overwritten."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.tracking.results_dir) / "runs" / f"{cfg.name}-{stamp}"
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        raise FileExistsError(f"{run_dir} already holds a finished run (summary.json); pick another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl",):  # an earlier attempt that was cut off starts over
        (run_dir / stale).unlink(missing_ok=True)
    return run_dir


def batches(
    items: list[hdata.TokenizedPair], order: list[int], batch_size: int, pad_id: int,
    mask_prompt: bool, drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, Batch]]:
    """(pair indices [B], collated batch) in the given order."""
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield torch.tensor(idx), hdata.collate([items[i] for i in idx], pad_id, mask_prompt)


def length_grouped(order: list[int], items: list[hdata.TokenizedPair], batch_size: int,
                   generator: torch.Generator, chunk_batches: int = 16) -> list[int]:
    """`order` regrouped so that each batch holds pairs of similar length (less padding): sorted
    by length within chunks of `chunk_batches` batches, then the batches shuffled (seeded). Every
    pair still appears once; a partial batch stays last, so `drop_last` drops the same count."""
    lengths = [hdata.pair_length(p) for p in items]
    size = batch_size * chunk_batches
    full, partial = [], []
    for s in range(0, len(order), size):
        chunk = sorted(order[s : s + size], key=lambda i: lengths[i])
        for k in range(0, len(chunk), batch_size):
            (full if len(chunk[k : k + batch_size]) == batch_size else partial).append(chunk[k : k + batch_size])
    perm = torch.randperm(len(full), generator=generator).tolist()
    return [i for b in perm for i in full[b]] + [i for b in partial for i in b]


def concatenated_logps(model, batch: Batch, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over chosen and rejected rows ([2B, T]) → (chosen [B], rejected [B])."""
    logps = model_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], reduction
    )
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def make_optimizer(model, t, device: torch.device) -> torch.optim.Optimizer:
    """The DPO optimizer: AdamW with the run's settings (fused where available)."""
    return hmodels.adamw(model, device, t.lr, t.weight_decay, t.adam_betas)


def enable_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them: the
    activations of a step shrink to the layer inputs, for about one more forward pass."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO runs without dropout: policy and reference must score the same function."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- reference


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: the identity of the reference model."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    model, items: list[hdata.TokenizedPair], cfg: RunConfig, pad_id: int, device, desc: str
) -> torch.Tensor:
    """Reference log-probs of every pair of a split: [n, 2] (chosen, rejected), float32."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(items), 2)
    order = list(range(len(items)))
    bs = cfg.train.batch_size
    it = batches(items, order, bs, pad_id, cfg.dpo.mask_prompt)
    for idx, batch in tqdm(it, total=math.ceil(len(items) / bs), desc=desc, leave=False,
                           disable=not cfg.tracking.progress):
        with hmodels.autocast(device, cfg.train.precision):
            chosen, rejected = concatenated_logps(model, to_device(batch, device), cfg.dpo.reduction)
        out[idx, 0], out[idx, 1] = chosen.float().cpu(), rejected.float().cpu()
    model.train(was_training)
    return out


def reference_cache(
    model, splits: dict[str, list[hdata.TokenizedPair]], cfg: RunConfig, pad_id: int, device
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """Reference log-probs for all splits, computed once per distinct (weights, tokens, masking,
    reduction, precision) and kept on disk. Returns (logps per split, cache file, was it reused)."""
    key = hashlib.sha256()
    key.update(weights_digest(model).encode())
    key.update(json.dumps([cfg.dpo.mask_prompt, cfg.dpo.reduction, cfg.train.precision]).encode())
    for name in sorted(splits):
        key.update(name.encode())
        key.update(json.dumps([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in splits[name]]).encode())
    root = Path(cfg.dpo.reference_cache_dir or cache_root() / "reference").expanduser()
    path = root / f"{key.hexdigest()[:32]}.pt"
    if path.exists():
        return torch.load(path), path, True
    logps = {
        name: compute_reference_logps(model, items, cfg, pad_id, device, f"reference {name}")
        for name, items in splits.items()
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(logps, tmp)
    tmp.replace(path)
    return logps, path, False


# ----------------------------------------------------------------------------- the step


def dpo_batch(policy, reference, ref_cache, idx, batch: Batch, cfg: RunConfig, device):
    """Losses and per-pair metrics for one micro-batch. The reference is either a frozen model
    (no_grad, eval mode) or rows of the cached log-probs."""
    batch = to_device(batch, device)
    with hmodels.autocast(device, cfg.train.precision):
        pc, pr = concatenated_logps(policy, batch, cfg.dpo.reduction)
        if reference is not None:
            with torch.no_grad():
                rc, rr = concatenated_logps(reference, batch, cfg.dpo.reduction)
        else:
            rc, rr = ref_cache[idx, 0].to(device), ref_cache[idx, 1].to(device)
    d = cfg.dpo
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, d.beta, d.loss, d.label_smoothing)
    return losses, pair_metrics(losses, cr, rj, pc, pr, d.beta)


@torch.no_grad()
def evaluate(policy, reference, ref_cache, items, cfg: RunConfig, pad_id, device, max_batches):
    """Mean per-pair metrics over the first `max_batches` batches of a split, in file order
    (the same pairs at every eval, so curves compare like with like)."""
    was_training = policy.training
    policy.eval()
    sums: dict[str, float] = defaultdict(float)
    n = 0
    order = list(range(len(items)))
    for i, (idx, batch) in enumerate(batches(items, order, cfg.train.batch_size, pad_id, cfg.dpo.mask_prompt)):
        if max_batches is not None and i >= max_batches:
            break
        _, metrics = dpo_batch(policy, reference, ref_cache, idx, batch, cfg, device)
        for k, v in metrics.items():
            sums[k] += v.sum().item()
        n += len(idx)
    policy.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()}


# ----------------------------------------------------------------------------- tasks and generations


def gen_enabled(cfg: RunConfig) -> bool:
    g = cfg.gen_eval.enabled
    return cfg.task.name != "none" if g is None else g


def task_pairs(cfg: RunConfig, task, init_path: Path, tokenizer, device, say):
    """Train/validation pairs from the SFT model's own samples (cached by a hash of the SFT
    checkpoint and the task settings), their true rewards, and held-out eval prompts."""
    tc = cfg.task
    n = tc.n_train_prompts + tc.n_val_prompts + tc.n_eval_prompts
    prompts = [r.prompt for r in task.generate_reviews(n, tc.seed + 1)]
    key = hashlib.sha256(json.dumps([str(init_path), tc.model_dump(mode="json")]).encode()).hexdigest()[:24]
    path = cache_root() / "pairs" / f"{key}.json"
    with hmodels.file_lock(path.with_suffix(".lock")):
        cached, reused = _sample_pairs(cfg, task, init_path, tokenizer, device, say, prompts, path)
    splits = {name: [hdata.Pair(p["prompt"], p["chosen"], p["rejected"]) for p in cached[name]]
              for name in ("train", "validation")}
    splits["test"] = []
    rewards = {name: [(p["r_chosen"], p["r_rejected"]) for p in cached[name]]
               for name in ("train", "validation")}
    info = {"pairs/cache": str(path), "pairs/reused": reused}
    return splits, rewards, prompts[tc.n_train_prompts + tc.n_val_prompts:], info


def _sample_pairs(cfg, task, init_path, tokenizer, device, say, prompts, path) -> tuple[dict, bool]:
    tc = cfg.task
    reused = path.exists()
    if reused:
        cached = json.loads(path.read_text())
        say(f"pairs: reused {path}")
    else:
        t0 = time.time()
        model = load_checkpoint(init_path).to(device)
        cached = {}
        for split, ps in (("train", prompts[: tc.n_train_prompts]),
                          ("validation", prompts[tc.n_train_prompts: tc.n_train_prompts + tc.n_val_prompts])):
            cached[split] = task.build_pairs(model, tokenizer, ps, tc.samples_per_prompt,
                                             tc.bt_temperature, tc.max_new_tokens,
                                             tc.seed + (0 if split == "train" else 10_000), device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached))
        tmp.replace(path)
        say(f"pairs: sampled {sum(len(v) for v in cached.values())} in {time.time() - t0:.0f}s -> {path}")
    return cached, reused


@torch.no_grad()
def pref_accuracy(policy, reference, ref_cache, items, true_rewards, cfg, pad_id, device) -> float:
    """Share of held-out pairs whose implicit-reward order matches the true reward's order
    (pairs with equal true rewards are left out)."""
    was_training = policy.training
    policy.eval()
    margins = []
    order = list(range(len(items)))
    for idx, batch in batches(items, order, cfg.train.batch_size, pad_id, cfg.dpo.mask_prompt):
        _, m = dpo_batch(policy, reference, ref_cache, idx, batch, cfg, device)
        margins += m["rewards/margins"].tolist()
    policy.train(was_training)
    # A tie of the implicit rewards (as at step 0, where the policy is the reference) scores 1/2.
    agree = [0.5 if mg == 0 else float((mg > 0) == (rc > rr))
             for mg, (rc, rr) in zip(margins, true_rewards, strict=True) if rc != rr]
    return sum(agree) / len(agree) if agree else None


# ----------------------------------------------------------------------------- the run


def write_samples(cfg: RunConfig, policy, reference, tokenizer, raw_splits, tracker, device) -> None:
    """Greedy answers of reference and policy to the first validation and test prompts."""
    from harness.samples import side_by_side

    t = cfg.train
    if reference is None:  # cached reference: rebuild the starting model
        seed_everything(t.seed)
        reference, _ = hmodels.load_model(cfg.model, tokenizer, cfg.data.max_length)
        reference.to(device).eval()
    prompts = [("validation", p.prompt) for p in raw_splits["validation"][: t.sample_validation]]
    prompts += [("test", p.prompt) for p in raw_splits["test"][: t.sample_test]]
    rows = side_by_side(policy, reference, tokenizer, prompts, t.sample_max_new_tokens, device,
                        special_tokens=cfg.data.format != "messages")
    tracker.log_table("samples", ["split", "prompt", "reference", "policy"], rows)


def train(cfg: RunConfig, run_dir: str | Path | None = None, on_eval: EvalHook | None = None) -> dict:
    """Train one DPO run; returns the summary (also written to run_dir/summary.json).

    `on_eval(step, metrics)` is called after every validation pass; it may raise RunPruned.
    """
    # ---------------------------------------------------------------- setup
    run_dir = new_run_dir(cfg, run_dir)
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = hmodels.pick_device(t.device)
    seed_everything(t.seed)
    tracker = RunTracker(run_dir, cfg.to_dict(), cfg.tracking, name=run_dir.name)
    say = (lambda *a: print(*a, file=sys.stderr)) if cfg.tracking.progress else (lambda *a: None)
    started = time.time()
    try:
        summary = _run(cfg, run_dir, device, tracker, say, on_eval)
    except BaseException as err:
        status = {KeyboardInterrupt: "interrupted", RunPruned: "pruned"}.get(type(err), "failed")
        tracker.write_summary({"status": status, "error": repr(err), "wall_s": time.time() - started,
                               **tracker.last})
        tracker.close(exit_code=1)
        raise
    summary["wall_s"] = time.time() - started
    summary = tracker.write_summary(summary)
    tracker.close()
    say(f"run directory: {run_dir}")
    return summary


def _run(cfg: RunConfig, run_dir: Path, device, tracker: RunTracker, say, on_eval) -> dict:
    t, d = cfg.train, cfg.dpo
    # ---------------------------------------------------------------- data, tokenizer, SFT
    task = TASKS.get(cfg.task.name)
    if task is not None:
        reviews = task.generate_reviews(cfg.task.n_sft_texts, cfg.task.seed)
        sft_corpus = [r.prompt + r.continuation for r in reviews]
        texts = lambda: iter(sft_corpus)  # noqa: E731
        raw_splits = None
    else:
        raw_splits = hdata.load_pairs(cfg.data) if cfg.data.format != "messages" else None
        texts = (lambda: hdata.iter_texts(raw_splits["train"])) if raw_splits else (lambda: iter(()))
    tokenizer, tok_info = hmodels.load_tokenizer(cfg.model, texts, cache_root() / "tokenizers")
    pad_id = tokenizer.pad_token_id
    sft_info: dict = {}
    init_path = None
    if task is not None or cfg.sft.enabled:
        if task is None:
            sft_corpus = hdata.sft_texts(cfg.data, cfg.sft.field, tokenizer)
        init_path, sft_info, reused = sft_checkpoint(cfg, tokenizer, sft_corpus, device)
        sft_info = {**sft_info, "sft/checkpoint": str(init_path), "sft/reused": reused}
        say(f"sft: {'reused' if reused else 'trained'} checkpoint {init_path}")
    true_rewards: dict[str, list[tuple[float, float]]] = {}
    eval_prompts: list[str] = []
    if task is not None:
        raw_splits, true_rewards, eval_prompts, pairs_info = task_pairs(cfg, task, init_path, tokenizer,
                                                                        device, say)
        sft_info.update(pairs_info)
    elif raw_splits is None:
        raw_splits = hdata.load_pairs(cfg.data, tokenizer)
    splits, counts = {}, {}
    for name, pairs in raw_splits.items():
        splits[name], c = hdata.tokenize_pairs(
            pairs, tokenizer, cfg.data.max_length, cfg.data.too_long, cfg.data.add_eos,
            prompt_special_tokens=cfg.data.format != "messages" and task is None,
        )
        counts.update({f"data/{name}/{k.split('/')[-1]}": v for k, v in c.items()})
    if not splits["train"]:
        raise ValueError(f"data.source {cfg.data.source}: no training pairs left after filtering: {counts}")

    # ---------------------------------------------------------------- models
    seed_everything(t.seed)
    if init_path is not None:
        policy = load_checkpoint(init_path)
        model_info = {"model_source": f"{cfg.model.name} after SFT ({init_path})",
                      "n_params": hmodels.count_params(policy)}
    else:
        policy, model_info = hmodels.load_model(cfg.model, tokenizer, cfg.data.max_length)
    disable_dropout(policy)
    policy.to(device).train()
    reference, ref_cache, ref_info = None, {}, {}
    if d.reference == "model" or gen_enabled(cfg):  # generation metrics need the model itself
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if d.reference == "cache":
        ref_cache, ref_path, reused = reference_cache(policy, splits, cfg, pad_id, device)
        ref_info = {"reference_cache": str(ref_path), "reference_cache_reused": reused}
    dpo_reference = reference if d.reference == "model" else None
    if t.gradient_checkpointing:
        enable_checkpointing(policy)
    gen_state: dict = {"ref_samples": None, "rows": []}
    if gen_enabled(cfg) and task is None:
        eval_prompts = [p.prompt for p in raw_splits["validation"][: cfg.gen_eval.n_prompts]]
        say("gen eval: no ground-truth reward exists for this data; reporting KL and samples only")

    # ---------------------------------------------------------------- optimizer and schedule
    n_train = len(splits["train"])
    micro_per_epoch = n_train // t.batch_size if t.drop_last else math.ceil(n_train / t.batch_size)
    if micro_per_epoch == 0:
        raise ValueError(f"train.batch_size {t.batch_size} is larger than the {n_train} train pairs")
    total_steps = t.max_steps or max(1, int(t.epochs * micro_per_epoch) // t.grad_accum)
    optimizer = make_optimizer(policy, t, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.schedule, t.warmup_steps, total_steps)
    )
    pairs_per_step = t.batch_size * t.grad_accum
    say(
        f"model: {model_info['model_source']} ({model_info['n_params'] / 1e6:.2f}M params) | "
        f"tokenizer: {tok_info['tokenizer_source']} | device: {device} | wandb: {tracker.wandb_mode}\n"
        f"pairs train/validation/test: {len(splits['train'])}/{len(splits['validation'])}/"
        f"{len(splits['test'])} | {pairs_per_step} pairs per step "
        f"({t.batch_size} x {t.grad_accum} accum) | {total_steps} steps | run dir: {run_dir}"
    )

    # ---------------------------------------------------------------- training loop
    def eval_now(step: int, seen: int) -> dict:
        m = evaluate(policy, dpo_reference, ref_cache.get("validation"), splits["validation"], cfg,
                     pad_id, device, t.eval_batches)
        m = {f"eval/{k}": v for k, v in m.items()}
        if true_rewards.get("validation"):
            acc = pref_accuracy(policy, dpo_reference, ref_cache.get("validation"), splits["validation"],
                                true_rewards["validation"], cfg, pad_id, device)
            if acc is not None:  # None: every validation pair has equal true rewards
                m["eval/pref_accuracy"] = acc
        if gen_enabled(cfg) and eval_prompts:
            g, rows, gen_state["ref_samples"] = gen_eval(
                policy, reference, tokenizer, eval_prompts, task.reward if task else None,
                cfg.gen_eval.max_new_tokens, cfg.gen_eval.seed, device, gen_state["ref_samples"])
            m.update(g)
            gen_state["rows"] = rows
        tracker.log(m, step, seen)
        if on_eval is not None:
            on_eval(step, m)
        return m

    def epoch_orders() -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(t.seed)
        while True:
            order = torch.randperm(n_train, generator=gen).tolist() if t.shuffle else list(range(n_train))
            if t.group_by_length:
                order = length_grouped(order, splits["train"], t.batch_size, gen)
            yield order

    def micro_batches() -> Iterator[tuple[torch.Tensor, Batch]]:
        for order in epoch_orders():
            yield from batches(splits["train"], order, t.batch_size, pad_id, d.mask_prompt, t.drop_last)

    last_eval = eval_now(0, 0) if splits["validation"] and t.eval_every else {}
    stream = micro_batches()
    seen = 0
    window: dict[str, float] = defaultdict(float)
    window_pairs = 0
    train_metrics: dict[str, float] = {}
    tokens_total = 0
    bar = tqdm(total=total_steps, desc="dpo", unit="step", disable=not cfg.tracking.progress)
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(t.grad_accum):
            idx, batch = next(stream)
            losses, metrics = dpo_batch(policy, dpo_reference, ref_cache.get("train"), idx, batch, cfg,
                                        device)
            (losses.mean() / t.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            for k, v in metrics.items():
                window[k] += v.sum().item()
            window_pairs += len(idx)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            policy.parameters(), t.max_grad_norm if t.max_grad_norm else float("inf")
        )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
        seen += pairs_per_step
        tokens_total += tokens

        if step % t.log_every == 0 or step == total_steps:
            train_metrics = {f"train/{k}": v / window_pairs for k, v in window.items()}
            train_metrics.update({
                "train/grad_norm": float(grad_norm), "train/lr": lr,
                "perf/tokens_per_s": tokens / step_s, "perf/step_s": step_s,
            })
            tracker.log(train_metrics, step, seen)
            window.clear()
            window_pairs = 0
            bar.set_postfix(loss=f"{train_metrics['train/loss']:.4f}",
                            margin=f"{train_metrics['train/rewards/margins']:.3f}")
        if t.eval_every and splits["validation"] and seen // t.eval_every > (seen - pairs_per_step) // t.eval_every:
            last_eval = eval_now(step, seen)
        bar.update(1)
    bar.close()

    # ---------------------------------------------------------------- final evaluation and save
    if splits["validation"] and (not t.eval_every or seen % t.eval_every):
        last_eval = eval_now(total_steps, seen)
    test_metrics = {}
    if t.test_at_end and splits["test"]:
        test_metrics = evaluate(policy, dpo_reference, ref_cache.get("test"), splits["test"], cfg,
                                pad_id, device, None)
        test_metrics = {f"test/{k}": v for k, v in test_metrics.items()}
        tracker.log(test_metrics, total_steps, seen)
    if gen_state["rows"]:
        tracker.log_table("gen/samples", ["prompt", "reference", "policy", "reference reward",
                                          "policy reward"], gen_state["rows"][: cfg.gen_eval.table_rows])
    if t.sample_validation or t.sample_test:
        write_samples(cfg, policy, reference, tokenizer, raw_splits, tracker, device)
    if t.save_model:
        hmodels.save_policy(policy, run_dir / "model")
    tokenizer.save_pretrained(run_dir / "tokenizer")
    write_json_atomic(run_dir / "data_counts.json", counts)
    return {
        "status": "finished",
        "steps": total_steps,
        "examples_seen": seen,
        "tokens_seen": tokens_total,
        **train_metrics, **last_eval, **test_metrics, **counts,
        **sft_info,
        "gen/reward_available": task is not None,
        "n_params": model_info["n_params"],
        "model_source": model_info["model_source"],
        "tokenizer_source": tok_info["tokenizer_source"],
        "device": str(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        **ref_info,
    }
