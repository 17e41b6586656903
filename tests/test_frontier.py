"""The reward-at-matched-KL score (harness.frontier) worked by hand."""

import math

import pytest

from harness import frontier


def test_frontier_by_hand():
    """Path (0, .1) → (1.5, .4) → (3, .7) → (6, .5): F(1) is read on the first segment at KL 1:
    .1 + .3·(1/1.5) = .3; F(2) on the second: .4 + .3·(.5/1.5) = .5; F(4) on the third, but the
    best at KL ≤ 4 is the pass at KL 3: .7 (the reward falls after it, .7 − .2/3 = .633 at 4)."""
    path = [(0.0, 0.1), (1.5, 0.4), (3.0, 0.7), (6.0, 0.5)]
    assert frontier.frontier(path, 1.0) == pytest.approx(0.3)
    assert frontier.frontier(path, 2.0) == pytest.approx(0.5)
    assert frontier.frontier(path, 4.0) == pytest.approx(0.7)
    s = frontier.scores(path)
    assert s["gen/reward_at_kl"] == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert (s["gen/reward_at_kl_1"], s["gen/reward_at_kl_4"]) == (pytest.approx(0.3), pytest.approx(0.7))


def test_a_run_below_the_point_keeps_its_best_and_an_overshoot_keeps_its_way_there():
    """A run that never reaches 4 nats scores its best reward there; one that jumps from KL 0 to
    20 nats in one pass is read on that segment (reward .1 → .9: at 4 nats .1 + .8·4/20 = .26),
    never at its end: the overshoot is bounded by what the run passed through."""
    assert frontier.frontier([(0.0, 0.2), (0.5, 0.35), (0.8, 0.3)], 4.0) == pytest.approx(0.35)
    assert frontier.frontier([(0.0, 0.1), (20.0, 0.9)], 4.0) == pytest.approx(0.26)


def test_non_finite_passes_break_the_path_and_no_pass_no_score():
    path = [(0.0, 0.1), (math.nan, 0.5), (1.0, 0.4)]  # no segment through the nan pass
    assert frontier.frontier(path, 0.5) == pytest.approx(0.1)
    assert frontier.frontier(path, 1.0) == pytest.approx(0.4)
    assert frontier.frontier([(2.0, 0.5)], 1.0) is None
    assert frontier.scores([(2.0, 0.5)]) == {}
    assert frontier.scores([]) == {}


def test_path_of_reads_generation_passes_only():
    rows = [{"step": 0, "gen/kl": 0.0, "gen/reward": 0.2}, {"step": 1, "train/loss": 0.6},
            {"step": 2, "gen/kl": 1.0, "gen/reward": 0.4, "eval/loss": 0.5}]
    assert frontier.path_of(rows) == [(0.0, 0.2), (1.0, 0.4)]
