"""The metric registry (harness/metrics.py) is the one list of metric names: every producer logs
only registered names, a run logs exactly the names the registry says its config enables, and an
unregistered name is refused at the first log."""

import json

import pytest
import torch

from harness import frontier, metrics
from harness.config import DPOConfig
from harness.dpo import dpo_loss, pair_metrics
from harness.rundir import METRICS
from harness.tracking import RunFiles, Tracker
from tests.runs import quick_config


def test_pair_metrics_are_the_registry_pair_metrics():
    """dpo.pair_metrics produces exactly the registry's per-pair names, and each is registered
    under every split the loop logs it in."""
    pc, pr, rc, rr = (torch.randn(5) for _ in range(4))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=0.1))
    produced = set(pair_metrics(losses, cr, rj, pc, pr, 0.1))
    assert produced == set(metrics.PAIR_METRICS)
    for split in metrics.PAIR_SPLITS:
        assert {f"{split}/{k}" for k in produced} <= set(metrics.METRICS)


def test_directions_say_which_way_is_better():
    """A pair metric has its registry direction under every split: losses are minimised, reward
    margins and accuracies maximised, log-probs and implicit rewards of one side have none; of
    the others, rewards, win rate and accuracies are maximised and gen/kl (held to a budget) has
    none."""
    directions = {name: m.direction for name, m in metrics.METRICS.items()}
    assert set(directions.values()) == {"max", "min", None}
    for split in metrics.PAIR_SPLITS:
        assert directions[f"{split}/loss"] == "min"
        assert directions[f"{split}/rewards/margins"] == directions[f"{split}/rewards/accuracies"] == "max"
        assert directions[f"{split}/logps/chosen"] is directions[f"{split}/rewards/rejected"] is None
    assert directions["gen/reward"] == directions["gen/win_rate"] == "max"
    assert directions["eval/pref_accuracy"] == "max"
    assert directions["gen/kl"] is directions["train/grad_norm"] is directions["perf/step_s"] is None


def test_gen_eval_produces_registered_names():
    """Generation metrics with and without a true reward are registered as needing `reward` and
    `gen` respectively."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from harness.generate import gen_eval

    class Tok:
        eos_token_id, pad_token_id = 0, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + (ord(c) % 20) for c in text]}

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    cpu = torch.device("cpu")
    without, _, _ = gen_eval(model, model, Tok(), ["ab", "cde"], None, 4, 0, cpu)
    with_reward, _, _ = gen_eval(model, model, Tok(), ["ab", "cde"], lambda x, y: len(y), 4, 0, cpu,
                                 parse_fn=lambda x, y: len(y) > 1)
    needs = {name: m.needs for name, m in metrics.METRICS.items()}
    assert {needs[k] for k in without} == {"gen"}
    assert {needs[k] for k in with_reward} == {"gen", "reward"}
    # with the frontier scores the evaluation adds to every pass (harness.frontier)
    assert set(with_reward) | set(frontier.scores([(0.0, 0.1)])) == {
        n for n, m in metrics.METRICS.items() if m.needs in ("gen", "reward")}


def test_the_first_eval_reuses_the_reference_samples_exactly():
    """While the policy equals the reference, gen_eval takes the reference's samples and a KL of 0:
    what sampling the policy with the same seed and estimating the KL give, bit for bit. Once the
    weights differ it samples the policy."""
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    from harness.generate import gen_eval, kl_estimate, same_weights, sample

    class Tok:
        eos_token_id, pad_token_id = 0, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + (ord(c) % 20) for c in text]}

        def decode(self, ids):
            return " ".join(map(str, ids))

    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    policy, cpu, texts = copy.deepcopy(reference), torch.device("cpu"), ["ab", "cde", "fgh"]
    prompts = [Tok()(t)["input_ids"] for t in texts]
    out, _, ref_samples = gen_eval(policy, reference, Tok(), texts, None, 8, 3, cpu)
    drawn = sample(policy, prompts, 8, 0, 0, 3, cpu)
    assert ref_samples == drawn and (out["gen/kl"], out["gen/kl_se"]) == kl_estimate(
        policy, reference, prompts, drawn, 0, cpu) == (0.0, 0.0)
    with torch.no_grad():
        policy.lm_head.weight.mul_(3.0)  # tied to the embeddings: a different model
    assert not same_weights(policy, reference)
    moved, rows, _ = gen_eval(policy, reference, Tok(), texts, None, 8, 3, cpu, ref_samples)
    assert moved["gen/kl"] != 0.0 and [r[2] for r in rows] != [r[1] for r in rows]


def test_tracker_refuses_an_unregistered_name(tmp_path):
    """Logging a name the registry lacks raises before anything is written."""
    tracker = Tracker([RunFiles(tmp_path, {"name": "x"})])
    with pytest.raises(metrics.UnknownMetric, match="eval/bleu"):
        tracker.log({"eval/loss": 0.5, "eval/bleu": 1.0}, step=0, examples_seen=0)
    tracker.log({"eval/loss": 0.5}, step=1, examples_seen=8)
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert rows == [{"step": 1, "examples_seen": 8, "eval/loss": 0.5}]


@pytest.mark.slow
def test_a_run_logs_exactly_the_enabled_names(seed_data, tmp_path):
    """A file-data run (no generation metrics) logs every name metrics.enabled() lists and no
    other, so a sweep objective checked against enabled() is one the run really logs."""
    cfg = quick_config(seed_data, tmp_path)
    train_dir = tmp_path / "r"
    from harness.train import train

    train(cfg, run_dir=train_dir)
    logged = set()
    for line in (train_dir / METRICS).read_text().splitlines():
        logged |= set(json.loads(line)) - {"step", "examples_seen"}
    assert logged == metrics.enabled(cfg)


def test_headline_and_labels_read_the_registry():
    """The CLI's final print and figure labels come from the registry."""
    summary = {"train/loss": 0.6, "eval/loss": 0.5, "train/lr": 1e-3, "status": "finished"}
    assert metrics.headline(summary) == {"train/loss": 0.6, "eval/loss": 0.5}
    assert metrics.label("eval/rewards/margins").startswith("reward margin")
    assert metrics.label("not/a/metric") == "not/a/metric"


def test_enabled_follows_the_splits_a_config_has():
    """test/* needs a test split and test_at_end; eval/ and gen/ need a validation split; a task
    has no test split."""
    from harness.config import build_config

    plain = metrics.enabled(build_config({}))
    assert "test/loss" in plain and "eval/loss" in plain and "gen/kl" not in plain
    assert "test/loss" not in metrics.enabled(build_config({"train": {"test_at_end": False}}))
    no_val = metrics.enabled(build_config({"data": {"split": [0.9, 0.0, 0.1]}}))
    assert "eval/loss" not in no_val and "test/loss" in no_val
    given = metrics.enabled(build_config({"data": {"validation_source": "v.json"}}))
    assert "eval/loss" in given and "test/loss" not in given
    task = metrics.enabled(build_config({"task": {"name": "controlled"}}))
    assert {"gen/reward", "eval/pref_accuracy", "eval/loss"} <= task and "test/loss" not in task
