"""The optimizer and the learning-rate schedule: schedule values worked out by hand, the LambdaLR
built from them, the fused AdamW, and gradient accumulation that scales the loss so that
`batch_size` x `grad_accum` pairs give the gradient of one batch of that many pairs."""

import math

import pytest
import torch

from harness import optim
from harness.train import train
from tests.precision import PRECISIONS, assert_close
from tests.runs import quick_config, read_metrics


def factors(schedule, warmup, total, steps, decay_in_warmup=False):
    f = optim.lr_factor(schedule, warmup, total, decay_in_warmup)
    return [f(s) for s in steps]


# ----------------------------------------------------------------------------- lr_factor


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_one_quarter_to_the_peak(schedule):
    """warmup 4: steps 0..3 give 1/4, 2/4, 3/4, 1 of the peak, whatever the decay after it."""
    assert factors(schedule, 4, 10, range(4)) == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-12)


def test_constant_schedule_stays_at_the_peak():
    """constant: 1 after the warmup, up to and past the last step; 1 from step 0 without warmup."""
    assert factors("constant", 4, 10, [4, 7, 10, 25]) == [1.0, 1.0, 1.0, 1.0]
    assert factors("constant", 0, 10, [0, 5, 10]) == [1.0, 1.0, 1.0]


def test_linear_decay_spans_the_steps_after_warmup():
    """linear, warmup 4, total 10: 1 − (s − 4)/6 → 1 at step 4, 0.5 at step 7, 0 at step 10 and
    after; without warmup 1 − s/10."""
    assert factors("linear", 4, 10, [4, 5, 7, 10, 12]) == pytest.approx(
        [1.0, 5 / 6, 0.5, 0.0, 0.0], abs=1e-12)
    assert factors("linear", 0, 10, [0, 1, 5, 10]) == pytest.approx([1.0, 0.9, 0.5, 0.0], abs=1e-12)


def test_cosine_decay_spans_the_steps_after_warmup():
    """cosine, warmup 4, total 10: ½(1 + cos(π(s − 4)/6)) → 1 at step 4, 0.5 at the midpoint
    (step 7), 0 at total, and stays 0 after it; without warmup the midpoint is step 5."""
    half_cos_30 = 0.5 * (1 + math.sqrt(3) / 2)  # s = 5: progress 1/6, cos(π/6) = √3/2
    assert factors("cosine", 4, 10, [4, 5, 7, 10, 13]) == pytest.approx(
        [1.0, half_cos_30, 0.5, 0.0, 0.0], abs=1e-12)
    assert factors("cosine", 0, 10, [0, 5, 10]) == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_decay_in_warmup_is_the_sft_schedule():
    """decay_in_warmup (the SFT stage): min(1, (s+1)/w) · ½(1 + cos(π·min(1, s/total))), so the
    cosine already runs during the warmup and reaches 0 at `total` itself (not `total` after
    the warmup) and stays there."""
    w, total = 4, 10
    expected = [min(1.0, (s + 1) / w) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
                for s in range(12)]
    got = factors("cosine", w, total, range(12), decay_in_warmup=True)
    assert got == pytest.approx(expected, abs=1e-12)
    # By hand: step 0 = 1/4 · 1; step 1 = 1/2 · ½(1 + cos 18°); step 5 = 1 · ½(1 + cos 90°) = 0.5.
    assert got[0] == pytest.approx(0.25) and got[5] == pytest.approx(0.5)
    assert got[10] == got[11] == 0.0
    assert got[1] == pytest.approx(0.5 * 0.5 * (1 + 0.9510565163), abs=1e-9)
    # Different from the DPO variant, whose step 5 is just past the warmup (≈ 0.933).
    assert factors("cosine", w, total, [5])[0] == pytest.approx(0.5 * (1 + math.sqrt(3) / 2))


def test_unknown_schedule_names_the_valid_ones():
    """A misspelt schedule is a ValueError that names it and lists constant, linear, cosine."""
    with pytest.raises(ValueError, match=r"'cosin'.*constant, linear, cosine"):
        optim.lr_factor("cosin", 0, 10)


def test_scheduler_drives_the_optimizer_lr():
    """scheduler(): the LambdaLR sets peak × factor(k) before optimizer step k, and SGD moves a
    parameter by exactly that lr (grad 1): linear, warmup 2, total 6, peak 0.1."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = optim.scheduler(opt, "linear", 2, 6)
    expected = [0.05, 0.1, 0.1, 0.075, 0.05, 0.025, 0.0, 0.0]
    lrs, moves = [], []
    for _ in expected:
        lrs.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr()[0] == lrs[-1]
        before = p.item()
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
        moves.append(before - p.item())
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert moves == pytest.approx(expected, abs=1e-7)


def test_scheduler_decay_in_warmup_passes_through():
    """scheduler(..., decay_in_warmup=True) uses the SFT factor, not the DPO one."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = optim.scheduler(opt, "cosine", 4, 10, decay_in_warmup=True)
    f = optim.lr_factor("cosine", 4, 10, decay_in_warmup=True)
    for s in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(f(s), abs=1e-12)
        opt.step()
        sched.step()
    assert f(3) != optim.lr_factor("cosine", 4, 10)(3)


def test_adamw_is_fused_on_cpu_with_the_given_settings():
    """adamw(): torch's AdamW with the given lr, betas and weight decay, fused on cpu."""
    opt = optim.adamw(torch.nn.Linear(4, 4), torch.device("cpu"), 1e-3, 0.05, (0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.defaults["weight_decay"] == 0.05


# ----------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("precision", PRECISIONS)
def test_grad_accum_matches_one_big_batch(seed_data, tmp_path, precision):
    """8 pairs x 1 micro-batch and 4 pairs x 2 micro-batches (same pairs: shuffle off) give the
    same run: the first step's gradient norm, every step's train loss (the later steps start from
    the weights the earlier updates made), and the final validation and test metrics. In fp32 to
    1e-4 relative (gradient norm) and 1e-5 (losses, margins); in bf16 to the bounds of
    tests/precision.py (relative 2**-8 for the gradient norm).

    The gradient norm is what a wrong accumulation changes: without dividing each micro-batch's
    loss by grad_accum the accumulated gradient is the sum of two half-batch means, twice the
    batch mean, so its norm would be twice the single-batch norm."""
    # Eval passes over whole splits: the same pairs for both batch sizes.
    common = {"train.shuffle": False, "train.max_steps": 4, "train.eval_every": 16,
              "train.eval_batches": None, "train.save_model": False, "train.precision": precision}
    one = train(quick_config(seed_data, tmp_path, **common, **{"train.batch_size": 8}),
                run_dir=tmp_path / "one")
    two = train(quick_config(seed_data, tmp_path, **common,
                             **{"train.batch_size": 4, "train.grad_accum": 2}),
                run_dir=tmp_path / "two")
    assert one["precision"] == two["precision"] == precision
    rows_one, rows_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    beta = 0.1
    train_one = {r["step"]: r for r in rows_one if "train/loss" in r}
    train_two = {r["step"]: r for r in rows_two if "train/loss" in r}
    assert sorted(train_one) == sorted(train_two) == [1, 2, 3, 4]
    # Large enough that a doubled norm (the undivided loss) is far outside the tolerance.
    assert train_one[1]["train/grad_norm"] > 1e-3
    for step, a in train_one.items():
        assert_close(a, train_two[step], ["train/grad_norm"], precision, beta, 8, rel=1e-4)
        assert_close(a, train_two[step], ["train/loss"], precision, beta, 8, rel=0, abs_=1e-5)
    assert train_two[1]["train/grad_norm"] != pytest.approx(2 * train_one[1]["train/grad_norm"], rel=0.1)

    # Step 1 starts from the reference itself (loss ln 2, in either precision: policy and
    # reference round alike); later steps do not: the updates count.
    assert train_one[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(train_one[4]["train/loss"] - math.log(2)) > 1e-4
    assert one["examples_seen"] == two["examples_seen"] == 32
    keys = ("eval/loss", "eval/rewards/margins", "test/loss", "test/rewards/margins")
    assert_close(one, two, keys, precision, beta, 8, rel=0, abs_=1e-5)
