"""Divergence stays inside its run: a non-finite training loss or gradient norm ends the run as
`diverged` (RunDiverged raised after summary.json is written, earlier metrics kept) before the
optimizer steps on it, and an SFT stage that diverges caches no checkpoint."""

import json

import pytest
import torch

from harness import cache, optim
from harness import step as hstep
from harness.errors import RunDiverged
from harness.train import train
from tests.runs import quick_config, read_metrics


def watch_optimizer(monkeypatch) -> list[bool]:
    """One entry per optimizer step the run takes: whether every gradient was finite then."""
    steps: list[bool] = []
    real = optim.adamw

    def adamw(*args, **kwargs):
        opt = real(*args, **kwargs)

        def before_step(o, args, kwargs):
            grads = [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
            steps.append(all(bool(torch.isfinite(g).all()) for g in grads))

        opt.register_step_pre_hook(before_step)
        return opt

    monkeypatch.setattr(optim, "adamw", adamw)
    return steps


def assert_diverged(run_dir, err: RunDiverged, quantity: str) -> dict:
    """summary.json says diverged at err.step, naming the quantity; metrics before stay."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == err.step
    assert quantity in summary["error"] and "RunDiverged" in summary["error"]
    assert summary["resumed_from_step"] is None
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == 0 and "eval/loss" in rows[0]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, err.step))
    return summary


def test_huge_learning_rate_ends_the_run_as_diverged(seed_data, tmp_path, monkeypatch):
    """train.lr 1e6 blows the model up within a few steps: RunDiverged reaches the caller, the
    run ends as `diverged` at that step with the train rows of every earlier step, and the
    optimizer took one step per earlier step, each on finite gradients (none on the bad one)."""
    steps = watch_optimizer(monkeypatch)
    run_dir = tmp_path / "lr"
    cfg = quick_config(seed_data, tmp_path, **{"train.lr": 1e6})
    with pytest.raises(RunDiverged) as caught:
        train(cfg, run_dir=run_dir)
    err = caught.value
    assert 1 < err.step <= cfg.train.max_steps and err.quantity in ("the train loss", "the gradient norm")
    assert_diverged(run_dir, err, err.quantity)
    assert steps == [True] * (err.step - 1)


class NanGradient(torch.autograd.Function):
    """Identity forward (a finite loss), nan gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_at_step_3_ends_the_run(kind, seed_data, tmp_path, monkeypatch):
    """A nan micro-batch loss, or a finite loss with a nan gradient, at step 3 (of 6): the run
    raises RunDiverged naming that quantity and step, summary.json says `diverged` at step 3,
    the rows of steps 0-2 stay, and the optimizer stepped twice, never on a nan gradient."""
    steps = watch_optimizer(monkeypatch)
    real, calls = hstep.dpo_batch, []

    def dpo_batch(*args, **kwargs):
        losses, pair = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # an evaluation pass, not a training micro-batch
            return losses, pair
        calls.append(1)
        if len(calls) == 3:  # one micro-batch per step
            losses = losses * float("nan") if kind == "loss" else NanGradient.apply(losses)
        return losses, pair

    monkeypatch.setattr(hstep, "dpo_batch", dpo_batch)
    run_dir = tmp_path / kind
    with pytest.raises(RunDiverged, match="step 3") as caught:
        train(quick_config(seed_data, tmp_path), run_dir=run_dir)
    quantity = {"loss": "the train loss", "gradient": "the gradient norm"}[kind]
    assert caught.value.step == 3 and caught.value.quantity == quantity
    assert_diverged(run_dir, caught.value, quantity)
    assert steps == [True, True]


def sft_entries() -> set[str]:
    root = cache.cache_root() / "sft"
    return {p.name for p in root.iterdir() if not p.name.endswith(".lock")} if root.exists() else set()


def test_diverging_sft_stage_caches_nothing(seed_data, tmp_path):
    """An SFT stage at sft.lr 1e6 turns non-finite: the run fails with a ValueError naming sft.lr
    and the step, and no SFT checkpoint (nor a temporary one) is left in the cache."""
    before = sft_entries()
    cfg = quick_config(seed_data, tmp_path, **{"sft.enabled": True, "sft.lr": 1e6, "sft.steps": 4,
                                               "sft.batch_size": 4, "sft.warmup_steps": 0})
    with pytest.raises(ValueError, match=r"sft diverged at step \d+: .*lower sft\.lr"):
        train(cfg, run_dir=tmp_path / "sft")
    assert sft_entries() == before
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["status"] == "failed"
