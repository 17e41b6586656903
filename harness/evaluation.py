"""What a run measures besides its training loss: the validation pass (`Evaluator`: pair
metrics, preference accuracy against true rewards, generation metrics and their samples table),
whether the final policy is degenerate, and the greedy samples written at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from harness import frontier, metrics, phases
from harness.generate import gen_eval, reference_samples
from harness.rundir import read_metrics
from harness.step import evaluate, pref_accuracy

if TYPE_CHECKING:  # the run builds its Evaluator: a type only, no import cycle
    from harness.train import Run

EvalHook = Callable[[int, dict[str, float]], None]
SAMPLE_COLUMNS = ["prompt", "reference", "policy", "reference reward", "policy reward"]  # gen/samples


class Evaluator:
    """A validation pass: pair metrics on `eval_batches`, preference accuracy when true rewards
    exist, generation metrics and their samples table (`gen/samples`) when on; logged, then
    handed to the eval hook (which may raise RunPruned)."""

    def __init__(self, run: Run, on_eval: EvalHook | None):
        self.run, self.on_eval = run, on_eval
        self.ref_samples = None  # the reference's samples: drawn once per reference, shared on disk
        self.rows: list = []  # the last pass's generation table
        # The (gen/kl, gen/reward) path of the passes so far; a resumed run starts from the rows its
        # metrics file kept (those before its checkpoint).
        self.path = frontier.path_of(read_metrics(run.run_dir)) if run.world.main else []

    def __call__(self, step: int, seen: int) -> dict[str, float]:
        """The pass on rank 0 while any other ranks wait (they return {}); under FSDP the others
        run its forward passes too (each holds a shard of the weights), and rank 0 alone logs."""
        world = self.run.world
        out = self._evaluate(step, seen) if world.main else {}
        if world.fsdp and not world.main:
            self._pairs()
        world.barrier()
        return out

    def _pairs(self) -> dict[str, float]:
        run = self.run
        prep, m, s, device, policy = run.prep, run.models, run.settings, run.device, scoring(run)
        pad, val, ref_val = prep.tokenizer.pad_token_id, prep.splits["validation"], m.ref_logps.get("validation")
        out = evaluate(policy, m.step_reference, ref_val, val, s, pad, device, run.cfg.train.eval_batches)
        out = {f"eval/{k}": v for k, v in out.items()}
        if prep.true_rewards.get("validation"):
            acc = pref_accuracy(policy, m.step_reference, ref_val, val,
                                prep.true_rewards["validation"], s, pad, device)
            if acc is not None:  # None: every validation pair has equal true rewards
                out["eval/pref_accuracy"] = acc
        return out

    def _generation(self) -> dict[str, float]:
        run = self.run
        cfg, prep, m, g = run.cfg, run.prep, run.models, run.cfg.gen_eval
        if self.ref_samples is None:
            self.ref_samples, reused = reference_samples(
                m.reference, prep.tokenizer, prep.eval_prompts, g.max_new_tokens, g.seed, run.device,
                cfg.dpo.reference_cache_dir, m.reference_digest)
            m.info["reference_samples_reused"] = reused
        out, self.rows, _ = gen_eval(m.policy, m.reference, prep.tokenizer, prep.eval_prompts,
                                     prep.reward_fn, g.max_new_tokens, g.seed, run.device,
                                     self.ref_samples, prep.parse_fn)
        if not self.path and out.get("gen/ref_reward") is not None:
            self.path.append((0.0, out["gen/ref_reward"]))  # the policy starts as the reference
        self.path += frontier.path_of([out])
        return {**out, **frontier.scores(self.path)}

    def _evaluate(self, step: int, seen: int) -> dict[str, float]:
        run = self.run
        with phases.phase("eval"):
            out = self._pairs()
        if metrics.gen_enabled(run.cfg) and run.prep.eval_prompts:
            with phases.phase("gen"):
                out.update(self._generation())
        run.tracker.log(out, step, seen)
        if self.rows:  # at every eval: wandb's step slider shows how the samples changed
            run.tracker.table("gen/samples", SAMPLE_COLUMNS, self.rows[: run.cfg.gen_eval.table_rows],
                              step, seen)
        if self.on_eval is not None:
            self.on_eval(step, out)
        return out


def scoring(run: Run) -> torch.nn.Module:
    """What evaluation passes score the policy with: the policy, or under FSDP its sharded root
    (harness.distributed.Logps), whose forward gathers the weights."""
    return run.models.train_policy if run.world.fsdp else run.models.policy


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


def write_samples(run: Run, reference: torch.nn.Module) -> None:
    """Greedy answers of `reference` (the frozen start) and the policy to the first validation
    and test prompts, as the run's `samples` table."""
    from harness.samples import side_by_side

    t, prep = run.cfg.train, run.prep
    prompts = [("validation", p.prompt) for p in prep.raw_splits["validation"][: t.sample_validation]]
    prompts += [("test", p.prompt) for p in prep.raw_splits["test"][: t.sample_test]]
    rows = side_by_side(run.models.policy, reference, prep.tokenizer, prompts, t.sample_max_new_tokens,
                        run.device, special_tokens=prep.special_tokens)
    run.tracker.table("samples", ["split", "prompt", "reference", "policy"], rows)
