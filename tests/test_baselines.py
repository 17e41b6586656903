"""Best-of-N from the SFT reference: the order-statistics estimator against brute force, the KL
bound by hand, and `harness baselines` end to end on a tiny model."""

import itertools
import math

import pandas as pd
import pytest
import yaml

from harness import baselines
from harness.cli import main

REWARDS = [0.5, -1.0, 2.0, 0.5, 0.0, 1.25, -0.25]  # M = 7, with a tie


@pytest.mark.parametrize("n", range(1, len(REWARDS) + 1))
def test_estimator_is_the_mean_max_over_all_subsets(n):
    """Σ r_(i)·C(i−1, N−1)/C(M, N) equals the mean, over all C(M, N) subsets of N samples, of the
    subset's best reward."""
    subsets = list(itertools.combinations(REWARDS, n))
    brute = sum(max(s) for s in subsets) / len(subsets)
    assert baselines.expected_best_of_n(REWARDS, n) == pytest.approx(brute, rel=1e-12)


def test_estimator_ends_are_the_mean_and_the_max():
    """N = 1 is the mean of the samples (3.0 / 7), N = M their maximum (2.0); N outside 1..M is
    refused."""
    assert baselines.expected_best_of_n(REWARDS, 1) == pytest.approx(3.0 / 7, rel=1e-12)
    assert baselines.expected_best_of_n(REWARDS, len(REWARDS)) == 2.0
    for n in (0, len(REWARDS) + 1):
        with pytest.raises(ValueError, match="1 <= N <= M"):
            baselines.expected_best_of_n(REWARDS, n)


def test_kl_bound_and_the_ns():
    """log N − (N−1)/N: 0 for N = 1, log 2 − 1/2 = 0.19315 for N = 2, log 64 − 63/64 = 3.17451 for
    N = 64; N runs over the powers of two up to n_max, n_max itself included."""
    assert baselines.kl_bound(1) == 0.0
    assert baselines.kl_bound(2) == pytest.approx(0.19315, abs=1e-5)
    assert baselines.kl_bound(64) == pytest.approx(3.17451, abs=1e-5)
    assert baselines.powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    assert baselines.powers_of_two(6) == [1, 2, 4, 6]


def test_kl_of_best_of_n_by_hand():
    """Σ_r q_r log(q_r / p_r) with q_r = F(r)^N − F(r⁻)^N. Rewards [0, 0, 1, 1], N = 2: p = (½, ½),
    q = (¼, ¾), KL = ¼ log ½ + ¾ log 3/2 = 0.130812. One reward level: best-of-N is the reference
    (KL 0). Many distinct rewards: the closed-form bound log N − (N−1)/N."""
    assert baselines.kl_best_of_n([0.0, 0.0, 1.0, 1.0], 2) == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert baselines.kl_best_of_n([0.3] * 7, 16) == 0.0
    assert baselines.kl_best_of_n([0.0, 1.0, 2.0], 1) == pytest.approx(0.0, abs=1e-15)
    distinct = [i / 5000 for i in range(5000)]
    for n in (2, 4, 16):
        assert baselines.kl_best_of_n(distinct, n) == pytest.approx(baselines.kl_bound(n), abs=1e-3)
    assert baselines.kl_best_of_n([0.0, 0.0, 1.0, 1.0], 4) < baselines.kl_bound(4)  # ties: below


def tiny_study(tmp_path, task: str = "controlled"):
    """A study of two cells (DPO and Preferred-FT) on the controlled task at its smallest."""
    raw = {
        "name": "bon", "model": {"name": "tiny-xs", "tokenizer_vocab_size": 512},
        "task": {"name": task, "n_sft_texts": 200, "n_train_prompts": 4, "n_val_prompts": 2,
                 "n_eval_prompts": 5, "max_new_tokens": 12},
        "sft": {"steps": 40, "batch_size": 8, "lr": 5.0e-3, "warmup_steps": 4},
        "data": {"max_length": 128},
        "gen_eval": {"max_new_tokens": 12},
        "tracking": {"results_dir": str(tmp_path / "results"), "progress": False},
        "sweep": {"grid": [{"dpo.beta": [0.1]}, {"dpo.loss": ["sft"]}]},
    }
    path = tmp_path / "bon.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_baselines_end_to_end(tmp_path, capsys):
    """`harness baselines` writes one row per N for the study's one model size, with exactly the
    agreed columns, a reward that never falls as N grows and the KL bound; run again it keeps the
    file; with --force it samples again, seeded, to the same numbers."""
    path = tiny_study(tmp_path)
    assert main(["baselines", str(path), "--n-max", "8"]) == 0
    csv = tmp_path / "results" / "bon" / "baselines" / "best_of_n.csv"
    df = pd.read_csv(csv)
    assert list(df.columns) == ["model.name", "n", "reward", "reward_se", "kl", "kl_se", "kl_bound",
                                "kl_kind"]
    assert df["model.name"].tolist() == ["tiny-xs"] * 4 and df["n"].tolist() == [1, 2, 4, 8]
    assert (df["reward"].diff().dropna() >= -1e-12).all()
    assert df["reward"].iloc[-1] > df["reward"].iloc[0]  # the samples' rewards differ
    bound = [0.0, *(math.log(n) - (n - 1) / n for n in (2, 4, 8))]
    assert df["kl_bound"].tolist() == pytest.approx(bound)
    # The estimate: 0 at N = 1, rising with N, never above the bound.
    assert df["kl"].iloc[0] == pytest.approx(0.0, abs=1e-12) and (df["kl"].diff().dropna() > 0).all()
    assert (df["kl"] <= df["kl_bound"] + 1e-12).all() and (df["kl_se"] >= 0).all()
    assert set(df["kl_kind"]) == {"estimate"} and (df["reward_se"] >= 0).all()
    assert "tiny-xs" in capsys.readouterr().out  # the printed table

    stamp = csv.stat().st_mtime_ns
    assert main(["baselines", str(path), "--n-max", "8"]) == 0
    assert csv.stat().st_mtime_ns == stamp and "up to date" in capsys.readouterr().err
    assert main(["baselines", str(path), "--n-max", "8", "--force"]) == 0
    assert csv.stat().st_mtime_ns != stamp
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)


def test_baselines_need_a_task_with_a_reward_and_a_sample(tmp_path, capsys):
    """A study without a ground-truth reward, or --n-max 0, is refused before anything is
    trained, naming task.name or --n-max, with exit code 2."""
    assert main(["baselines", str(tiny_study(tmp_path, task="none")), "--n-max", "4"]) == 2
    assert "task.name: best-of-N needs a task with a ground-truth reward" in capsys.readouterr().err
    assert main(["baselines", str(tiny_study(tmp_path)), "--n-max", "0"]) == 2
    assert "--n-max 0: at least 1 sample per prompt" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
