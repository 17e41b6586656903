"""The controlled task: generator and reward, Bradley–Terry labels, the KL estimate against an exact
KL, SFT and pair caches, and a DPO run that raises the true reward over its SFT reference."""

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from harness import frontier, metrics
from harness.config import load_config
from harness.generate import continuation_logps, kl_estimate, sample
from harness.tasks import controlled
from harness.train import train

ROOT = Path(__file__).resolve().parents[1]
CONTROLLED = ROOT / "experiments" / "controlled.yaml"


# ----------------------------------------------------------------------------- generator and reward


def test_generator_is_deterministic_for_a_seed():
    a = controlled.generate_reviews(200, seed=7)
    assert a == controlled.generate_reviews(200, seed=7)
    assert a != controlled.generate_reviews(200, seed=8)
    for r in a:
        assert r.prompt.startswith("review : the ") and r.prompt.endswith(" .")
        assert r.continuation.startswith(" the ") and r.continuation.endswith(" .")
        assert controlled.prompt_noun(r.prompt) == r.noun
    rewards = [controlled.reward(r.prompt, r.continuation) for r in a]
    assert rewards == [controlled.reward(r.prompt, r.continuation) for r in a]
    assert all(-2.0 <= x <= 2.0 for x in rewards)
    # Generated text always parses (its reward comes from clauses), and both signs occur.
    assert min(rewards) < -0.5 and max(rewards) > 0.5


@pytest.mark.parametrize(
    ("prompt", "continuation", "expected"),
    [
        # "not very clever" about the prompt's noun: -1 x 2 (very), weight 2; "superb" elsewhere: +1.
        (
            "review : the plot was dull .",
            " the plot was not very clever but the music was superb .",
            (2 * -2 + 1 * 1) / 3,
        ),
        # "not dull" is a positive view; "long" is neutral.
        (
            "review : the film was long .",
            " the cast was not dull and the film was long .",
            (1 + 0) / 3,
        ),
        ("review : the film was long .", " the film was very great .", 2.0),
        # Text that does not parse counts as a clause of sentiment 0.
        ("review : the film was long .", " the film was great and banana .", 2 / 3),
        ("review : the film was long .", " .", 0.0),
        ("review : the film was long .", "", 0.0),
    ],
)
def test_reward_by_hand(prompt, continuation, expected):
    assert controlled.reward(prompt, continuation) == pytest.approx(expected)


def test_prompt_splits_are_nested_and_independent_of_each_other():
    """More training prompts extend the training set and leave validation and eval prompts alone
    (a data-scaling axis compares nested training sets on the same held-out prompts)."""
    small, large = controlled.prompt_splits(0, 16, 4, 8), controlled.prompt_splits(0, 64, 6, 8)
    assert large["train"][:16] == small["train"] and large["eval"] == small["eval"]
    assert large["validation"][:4] == small["validation"]
    assert controlled.prompt_splits(1, 16, 4, 8)["eval"] != small["eval"]
    assert [len(small[k]) for k in ("train", "validation", "eval")] == [16, 4, 8]


def test_gen_eval_reports_the_reward_of_parsed_samples():
    """gen/reward_parsed averages the reward over the samples that parse, by hand."""
    from harness.generate import gen_eval

    class Tok:
        eos_token_id, pad_token_id = 0, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

        def decode(self, ids):
            return TEXTS[ids[0] - 2]

    TEXTS = [" the plot was great .", " the plot was great and great .", " the plot was dull ."]
    prompts = ["review : the plot was fine ."] * 3
    policy = torch.nn.Linear(1, 1)
    samples = [[2, 0], [3, 0], [4, 0]]
    m, _, _ = gen_eval(policy, policy, Tok(), prompts, controlled.reward, 4, 0, "cpu",
                       ref_samples=samples, parse_fn=controlled.parses)
    assert m["gen/parsed"] == pytest.approx(2 / 3)
    # "great" alone is not a clause: sentiment 0 at weight 1 beside the on-topic clause's 2.
    assert m["gen/reward"] == pytest.approx((1.0 + 2 / 3 - 1.0) / 3)
    assert m["gen/reward_parsed"] == pytest.approx(0.0)  # (+1 − 1) / 2: the unparsed one left out


def test_bradley_terry_labels_follow_the_reward():
    """Over many draws, the higher-reward continuation is chosen at σ(Δr/τ), within 4 standard
    errors of a binomial proportion (tolerance stated per reward gap)."""
    prompt = "review : the plot was dull ."
    conts = [
        " the plot was great .",
        " the music was dull .",
        " the plot was long .",
        " the music was great and the plot was very dull .",
    ]
    r = [controlled.reward(prompt, c) for c in conts]
    tau, n = 0.5, 4000
    rng = random.Random(0)
    chosen_count = {pair: 0 for pair in itertools.combinations(range(4), 2)}
    for _ in range(n):
        out = controlled.bradley_terry_pairs(prompt, conts, tau, rng)
        assert len(out) == 6  # 4 samples -> 6 pairs, as the paper
        for (i, j), (c, rej, rc, rr) in zip(chosen_count, out, strict=True):
            assert {c, rej} == {conts[i], conts[j]}
            assert (rc, rr) == (controlled.reward(prompt, c), controlled.reward(prompt, rej))
            chosen_count[(i, j)] += c == conts[i]
    for (i, j), k in chosen_count.items():
        p = 1 / (1 + math.exp(-(r[i] - r[j]) / tau))
        tol = 4 * math.sqrt(p * (1 - p) / n) + 1e-9
        assert abs(k / n - p) <= tol, ((i, j), k / n, p, tol)


# ----------------------------------------------------------------------------- the KL estimate


def _tiny_lm(vocab: int, seed: int, scale: float):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)  # sharper distributions than the default init
    return model


def test_kl_estimate_matches_exact_kl_by_enumeration():
    """V = 4 tokens (eos = 3), at most L = 3 new tokens: every possible continuation is enumerated
    (eos at step 1, 2 or 3, or three tokens without eos), their probabilities sum to 1, and the
    Monte Carlo estimate from the policy's own samples lies within 4 standard errors of the exact
    KL(π‖π_ref) = Σ_y π(y) (log π(y) − log π_ref(y))."""
    V, L, eos = 4, 3, 3
    policy, ref = _tiny_lm(V, 0, 8.0), _tiny_lm(V, 1, 8.0)
    prompt = [0, 1]
    seqs = (
        [[eos]]
        + [[a, eos] for a in range(3)]
        + [list(s) for s in itertools.product(range(3), range(3), range(4))]
    )
    assert len(seqs) == 1 + 3 + 36
    lp = continuation_logps(policy, [prompt] * len(seqs), seqs, pad_id=0, device="cpu")
    lr = continuation_logps(ref, [prompt] * len(seqs), seqs, pad_id=0, device="cpu")
    assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    exact = float((lp.exp() * (lp - lr)).sum())
    assert exact > 0.05  # the two models differ: the test can fail

    n = 3000
    samples = sample(policy, [prompt] * n, L, eos, 0, seed=5, device="cpu")
    assert all(s in seqs for s in samples)
    est, se = kl_estimate(policy, ref, [prompt] * n, samples, pad_id=0, device="cpu")
    assert 0 < se < 0.25 * exact
    assert abs(est - exact) < 4 * se, (est, exact, se)


def test_sampling_is_reproducible_and_follows_the_model():
    """Same seed, same samples; the first token's frequencies match the model's distribution."""
    model = _tiny_lm(4, 0, 8.0)
    prompt, n = [0, 1], 4000
    a = sample(model, [prompt] * n, 1, 3, 0, seed=11, device="cpu")
    assert a == sample(model, [prompt] * n, 1, 3, 0, seed=11, device="cpu")
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    for tok in range(4):
        freq = sum(s[0] == tok for s in a) / n
        p = float(probs[tok])
        assert abs(freq - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (tok, freq, p)


def test_left_padded_batches_sample_like_single_prompts(monkeypatch):
    """Prompts of different lengths in one batch (left padding, position ids from the mask, KV
    cache) continue exactly as each prompt alone: with the draw made greedy, the tokens agree and
    match a plain full-sequence argmax."""
    monkeypatch.setattr(
        torch, "multinomial", lambda probs, n, generator=None: probs.argmax(-1, keepdim=True)
    )
    model = _tiny_lm(6, 2, 4.0)
    prompts = [[0, 1, 2, 1], [2], [1, 0]]
    batch = sample(model, prompts, 5, 99, 0, seed=3, device="cpu")  # eos 99: never stops early
    for i, p in enumerate(prompts):
        assert sample(model, [p], 5, 99, 0, seed=3, device="cpu") == [batch[i]]
        seq = list(p)
        with torch.no_grad():
            for _ in range(5):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert batch[i] == seq[len(p) :]


# ----------------------------------------------------------------------------- end to end


def controlled_config(tmp_path, **overrides):
    base = {"tracking.results_dir": str(tmp_path / "results"), "tracking.progress": False}
    base.update(overrides)
    return load_config(CONTROLLED, base)


@pytest.mark.slow
def test_controlled_run_raises_true_reward_and_reuses_caches(tmp_path):
    """experiments/controlled.yaml as shipped: DPO raises gen/reward over the SFT reference at a
    measured KL; a second run (another beta) reuses the SFT checkpoint and the pair set."""
    s = train(controlled_config(tmp_path), run_dir=tmp_path / "a")
    assert s["status"] == "finished"
    assert s["sft/loss_last"] < s["sft/loss_first"] - 0.5
    assert s["gen/reward_available"] is True
    gain = s["gen/reward"] - s["gen/ref_reward"]
    assert gain > 3 * s["gen/reward_se"], (s["gen/reward"], s["gen/ref_reward"], s["gen/reward_se"])
    assert s["gen/win_rate"] > 0.6
    assert 0 < s["gen/kl"] < 20 and s["gen/kl_se"] > 0
    assert s["eval/pref_accuracy"] > 0.6
    assert (tmp_path / "a" / "gen_samples.json").exists()
    # The score is the frontier of the run's own (gen/kl, gen/reward) path; pass by pass it is the
    # frontier of the passes so far, so it never falls.
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    path = frontier.path_of(rows)
    assert len(path) >= 3 and s["gen/reward_at_kl"] == pytest.approx(frontier.scores(path)[frontier.SCORE])
    scores = [r[frontier.SCORE] for r in rows if frontier.SCORE in r]
    assert len(scores) == len(path) and scores == sorted(scores)

    s2 = train(
        controlled_config(tmp_path, **{"dpo.beta": 0.5, "train.max_steps": 2}),
        run_dir=tmp_path / "b",
    )
    assert s2["sft/reused"] is True and s2["pairs/reused"] is True
    assert s2["sft/checkpoint"] == s["sft/checkpoint"] and s2["pairs/cache"] == s["pairs/cache"]
    assert s2["gen/ref_reward"] == s["gen/ref_reward"]  # the same reference, the same samples
    assert s["reference_samples_reused"] is False and s2["reference_samples_reused"] is True
    # DPO trades some well-formedness for reward (the SFT model parses ~0.94), not most of it.
    assert s["gen/parsed"] > 0.25 and s["degenerate"] is False


def test_step_zero_generation_metrics_are_exact(tmp_path):
    """Before any update the policy is the reference: KL 0, win rate 1/2, pref accuracy 1/2. The
    run logs exactly the names the metric registry enables for a task with a reward."""
    cfg = controlled_config(
        tmp_path,
        **{
            "model.name": "tiny-xs",
            "sft.steps": 150,
            "task.n_sft_texts": 1000,
            "task.n_train_prompts": 16,
            "task.n_val_prompts": 8,
            "task.n_eval_prompts": 8,
            "train.max_steps": 1,
            "train.eval_every": 1000,
        },
    )
    train(cfg, run_dir=tmp_path / "r")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert set().union(*rows) - {"step", "examples_seen"} == metrics.enabled(cfg)
    first = rows[0]
    assert first["step"] == 0
    assert first["gen/kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["gen/win_rate"] == 0.5
    assert first["gen/reward"] == first["gen/ref_reward"]
    assert first["eval/pref_accuracy"] == 0.5
    assert first["gen/kl_se"] == 0.0 and 0.0 <= first["gen/parsed"] <= 1.0
    # The reward over the samples that parse is the reward where every sample parses.
    if first["gen/parsed"] == 1.0:
        assert first["gen/reward_parsed"] == pytest.approx(first["gen/reward"])
    else:
        assert first["gen/reward_parsed"] is None or -2.0 <= first["gen/reward_parsed"] <= 2.0


def test_sft_on_another_field_and_gen_eval_without_a_reward(seed_data, tmp_path):
    """Any experiment can ask for SFT (here on the seed's `output` field) before DPO; without a
    ground-truth reward the generation metrics are KL and samples only, and the run says so."""
    from tests.test_train import quick_config

    cfg = quick_config(
        seed_data,
        tmp_path,
        **{
            "sft.enabled": True,
            "sft.field": "output",
            "sft.steps": 3,
            "sft.batch_size": 4,
            "gen_eval.enabled": True,
            "gen_eval.n_prompts": 4,
            "gen_eval.max_new_tokens": 8,
        },
    )
    s = train(cfg, run_dir=tmp_path / "r")
    assert s["sft/texts"] == 102  # 85% of the first 120 records
    assert Path(s["sft/checkpoint"]).is_dir()
    assert s["gen/reward_available"] is False
    assert "gen/kl" in s and "gen/reward" not in s and "eval/pref_accuracy" not in s


def test_sft_field_missing_names_the_row(seed_data, tmp_path):
    from harness.data import DataError, sft_texts
    from tests.test_train import quick_config

    cfg = quick_config(seed_data, tmp_path)
    with pytest.raises(DataError, match=r"row 0.*nonexistent|nonexistent.*row 0"):
        sft_texts(cfg.data, "nonexistent")
