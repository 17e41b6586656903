"""The IMDb task (harness/tasks/imdb.py) offline: tiny stand-ins built from configs for gpt2-large
(a 2-layer GPT-2 with a BPE trained on the texts), lvwerra/distilbert-imdb (a 1-layer DistilBERT
with labels NEGATIVE / POSITIVE) and stanfordnlp/imdb (a .jsonl of synthetic reviews), each saved
where the experiment's fields can name it: the reward by hand, prompts and splits, a full run,
clear errors, and experiments/imdb.yaml as its header describes it."""

import json
import random
from pathlib import Path

import pytest
import torch

from harness import metrics
from harness.config import ConfigError, load_config, load_experiment
from harness.errors import DataError, InputError
from harness.models import train_tokenizer
from harness.tasks import imdb
from harness.train import train

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT / "experiments" / "imdb.yaml"

GOOD = ["great", "superb", "moving", "brilliant", "charming"]
BAD = ["awful", "boring", "dull", "clumsy", "tedious"]
NOUNS = ["film", "plot", "acting", "music", "ending", "cast"]


def reviews(n: int, seed: int = 0) -> list[str]:
    """Short synthetic reviews; a few carry the HTML line breaks IMDb texts have."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choice([GOOD, BAD])
        clauses = [f"the {rng.choice(NOUNS)} was {rng.choice(words)}" for _ in range(rng.randint(2, 4))]
        out.append((" <br /><br />" if i % 7 == 0 else " and ").join(clauses) + ".")
    return out


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    """Local directories and a file that task.reward_model, model.name and task.texts can name."""
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    root = tmp_path_factory.mktemp("imdb-standins")
    texts = reviews(200)
    (root / "imdb.jsonl").write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in texts))
    tok = train_tokenizer([imdb.clean(t) for t in texts], vocab_size=320)
    tok.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT takes no token_type_ids
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id))
    lm.save_pretrained(root / "gpt")
    tok.save_pretrained(root / "gpt")
    clf = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=1, n_heads=2, max_position_embeddings=64,
        initializer_range=0.2,  # rewards of a few units apart (0.02 leaves them ~1e-5 apart)
        pad_token_id=tok.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    clf.save_pretrained(root / "clf")
    tok.save_pretrained(root / "clf")
    return {"texts": root / "imdb.jsonl", "model": root / "gpt", "reward": root / "clf"}


def imdb_config(tmp_path, standins, **overrides):
    """experiments/imdb.yaml with the stand-ins and tiny sizes: a run of a few seconds on a CPU."""
    small = {
        "model.name": str(standins["model"]), "task.texts": str(standins["texts"]),
        "task.reward_model": str(standins["reward"]),
        "task.n_sft_texts": 120, "task.n_train_prompts": 12, "task.n_val_prompts": 6,
        "task.n_eval_prompts": 8, "task.max_new_tokens": 8, "gen_eval.max_new_tokens": 8,
        "sft.steps": 6, "sft.batch_size": 8, "sft.warmup_steps": 1, "sft.max_length": 48,
        "sft.lr": 1e-3, "data.max_length": 48, "train.batch_size": 8, "train.grad_accum": 1,
        "train.max_steps": 2, "train.eval_every": 16, "train.warmup_steps": 0, "train.lr": 1e-3,
        "train.device": "cpu", "train.precision": "fp32", "tracking.wandb": "disabled",
        "tracking.progress": False, "tracking.results_dir": str(tmp_path / "results"),
    }
    return load_config(IMDB, {**small, **overrides})


# ----------------------------------------------------------------------------- the reward


def test_reward_is_the_positive_minus_negative_logit(standins):
    """r(x, y) is the classifier's POSITIVE logit minus its NEGATIVE logit on x + y, computed here
    by hand from its own forward pass; the batched call gives the per-sample values."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = imdb.SentimentReward(str(standins["reward"]), "cpu")
    assert (r.pos, r.neg) == (1, 0) and "POSITIVE" in r.describe()
    clf = AutoModelForSequenceClassification.from_pretrained(standins["reward"]).eval()
    tok = AutoTokenizer.from_pretrained(standins["reward"])
    x, y = "the plot", " was superb and the cast was great."
    with torch.no_grad():
        logits = clf(**tok(x + y, return_tensors="pt")).logits[0]
    assert r(x, y) == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)
    prompts = ["the plot", "the music", "the cast was"]
    conts = [" was superb and the cast was great.", " was dull.", " awful and the ending was boring."]
    batched = r.batch(prompts, conts)
    assert batched == pytest.approx([r(p, c) for p, c in zip(prompts, conts, strict=True)], abs=1e-5)
    assert min(abs(a - b) for a, b in [batched[:2], batched[1:], batched[::2]]) > 0.05


@pytest.mark.parametrize(("id2label", "override", "expected"), [
    ({0: "NEGATIVE", 1: "POSITIVE"}, None, (1, 0)),
    ({0: "pos", 1: "neg"}, None, (0, 1)),
    ({0: "LABEL_0", 1: "LABEL_1"}, None, (1, 0)),
    ({0: "LABEL_0", 1: "LABEL_1"}, "LABEL_0", (0, 1)),
    ({0: "bad", 1: "good"}, "1", (1, 0)),
])
def test_positive_label_from_id2label_or_the_setting(id2label, override, expected):
    assert imdb.label_indices(id2label, override, "clf") == expected


@pytest.mark.parametrize(("id2label", "override", "needle"), [
    ({0: "bad", 1: "good"}, None, "task.reward_label"),
    ({0: "bad", 1: "good"}, "nice", "task.reward_label: 'nice' is not a label"),
    ({0: "a", 1: "b", 2: "c"}, None, "task.reward_model: clf has 3 labels"),
])
def test_unknown_labels_name_the_field(id2label, override, needle):
    with pytest.raises(ConfigError, match=needle):
        imdb.label_indices(id2label, override, "clf")


def test_bradley_terry_labels_follow_the_reward_gap():
    """4 samples give 6 pairs; over many draws the first of two samples 1 unit of reward apart is
    chosen at σ(1/τ) (within 4 standard errors), equal rewards at 1/2."""
    conts, rewards = ["a", "b", "c", "d"], [1.0, 0.0, 0.0, -3.0]
    rng, n, tau = random.Random(0), 4000, 2.0
    first_ab = first_bc = 0
    for _ in range(n):
        pairs = imdb.bradley_terry_pairs(conts, rewards, tau, rng)
        assert len(pairs) == 6
        first_ab += pairs[0][0] == "a"
        first_bc += pairs[3][0] == "b"
        assert all(rewards[conts.index(c)] == rc and rewards[conts.index(j)] == rj for c, j, rc, rj in pairs)
    p = 1 / (1 + torch.exp(torch.tensor(-1 / tau)).item())
    assert abs(first_ab / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert abs(first_bc / n - 0.5) < 4 * (0.25 / n) ** 0.5


# ----------------------------------------------------------------------------- texts and prompts


def test_texts_splits_and_prefixes(standins):
    """Texts are cleaned of <br />; SFT texts and prompt reviews never overlap; prompt splits are
    nested; a prompt is a review's first 2..8 tokens."""
    from transformers import AutoTokenizer

    cfg = load_config(IMDB)
    texts = imdb.load_texts(str(standins["texts"]), "train", cfg.data)
    assert len(texts) == 200 and not any("<br" in t or "  " in t for t in texts)
    small = imdb.split_texts(texts, 0, 100, {"eval": 8, "validation": 4, "train": 10})
    large = imdb.split_texts(texts, 0, 100, {"eval": 8, "validation": 4, "train": 20})
    assert small["eval"] == large["eval"] and large["train"][:10] == small["train"]
    assert small["sft"] == large["sft"] and len(small["sft"]) == 100
    assert not set(large["sft"]) & set(large["train"] + large["validation"] + large["eval"])
    with pytest.raises(DataError, match="task.n_sft_texts"):
        imdb.split_texts(texts, 0, 190, {"eval": 8, "validation": 4, "train": 10})
    tok = AutoTokenizer.from_pretrained(standins["model"])
    ps = imdb.prefixes(large["train"], tok, (2, 8), "0/train")
    assert ps[:10] == imdb.prefixes(small["train"], tok, (2, 8), "0/train")
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in ps]
    assert all(r.startswith(p) for r, p in zip(large["train"], ps, strict=True))
    assert min(lengths) >= 2 and max(lengths) <= 8 and len(set(lengths)) > 2


def test_texts_without_a_text_field_name_the_file_and_fields(tmp_path):
    bad = tmp_path / "reviews.jsonl"
    bad.write_text(json.dumps({"review": "fine", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r"task.texts: .*reviews.jsonl.*no `text` field.*\['label', 'review'\]"):
        imdb.load_texts(str(bad), "train", load_config(IMDB).data)


# ----------------------------------------------------------------------------- a run


def test_a_tiny_imdb_run_end_to_end(tmp_path, standins, monkeypatch):
    """experiments/imdb.yaml with the stand-ins: SFT, pairs sampled and scored by the classifier
    (their stored rewards are the classifier's), DPO, and exactly the metrics that
    metrics.enabled() lists, gen/reward and gen/kl among them and no parse metrics; before any
    update the policy is the reference (KL 0, win rate 1/2). A second run reuses SFT and pairs."""
    monkeypatch.setenv("DPO_HARNESS_CACHE", str(tmp_path / "cache"))
    cfg = imdb_config(tmp_path, standins)
    s = train(cfg, run_dir=tmp_path / "run")
    assert s["status"] == "finished" and s["gen/reward_available"] is True
    assert s["data/train/kept"] > 0 and s["data/validation/kept"] > 0
    assert s["pairs/reused"] is False and s["sft/texts"] == 120
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows) - {"step", "examples_seen"}
    assert logged == metrics.enabled(cfg)
    assert {"gen/reward", "gen/kl", "gen/win_rate", "eval/pref_accuracy"} <= logged
    assert not logged & metrics.PARSE_METRICS
    first = rows[0]
    assert first["step"] == 0 and first["gen/kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["gen/win_rate"] == 0.5 and first["gen/reward"] == first["gen/ref_reward"]

    pairs = json.loads(Path(s["pairs/cache"]).read_text())
    assert len(pairs["train"]) == s["data/train/total"] > 0
    reward = imdb.SentimentReward(cfg.task.reward_model, "cpu")
    for p in pairs["train"][:5]:
        assert p["r_chosen"] == pytest.approx(reward(p["prompt"], p["chosen"]), abs=1e-4)
        assert p["r_rejected"] == pytest.approx(reward(p["prompt"], p["rejected"]), abs=1e-4)

    s2 = train(imdb_config(tmp_path, standins, **{"dpo.beta": 0.5, "train.max_steps": 1}),
               run_dir=tmp_path / "run2")
    assert s2["sft/reused"] is True and s2["pairs/reused"] is True
    assert s2["pairs/cache"] == s["pairs/cache"] and s2["gen/ref_reward"] == first["gen/ref_reward"]


def test_a_missing_reward_model_fails_before_sft(tmp_path, standins, monkeypatch):
    """A reward model directory that is not there is bad input naming task.reward_model, raised
    before the SFT stage spends anything."""
    monkeypatch.setenv("DPO_HARNESS_CACHE", str(tmp_path / "cache"))
    cfg = imdb_config(tmp_path, standins, **{"task.reward_model": str(tmp_path / "no-classifier")})
    with pytest.raises(InputError, match=r"task\.reward_model: no such directory") as err:
        train(cfg, run_dir=tmp_path / "run")
    assert "no-classifier" in str(err.value) and "hub" in str(err.value)
    assert not (tmp_path / "cache" / "sft").exists()
    # a directory that holds no classifier: the same field named
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"task\.reward_model: could not load the directory"):
        imdb.SentimentReward(str(empty), "cpu")


# ----------------------------------------------------------------------------- the experiment


def test_the_experiment_file_is_what_its_header_says():
    """experiments/imdb.yaml validates without the hub: gpt2-large, stanfordnlp/imdb,
    lvwerra/distilbert-imdb, prefixes of 2-8 tokens, 4 samples, masked-sum DPO on cached
    reference log-probs, and 4 cells over beta (0.05, 0.1, 0.5, 1.0), one run each."""
    cfg = load_config(IMDB)
    t = cfg.task
    assert (t.name, t.texts, t.reward_model, t.prompt_tokens) == (
        "imdb", "stanfordnlp/imdb", "lvwerra/distilbert-imdb", (2, 8))
    assert (t.n_sft_texts, t.n_train_prompts, t.n_eval_prompts, t.samples_per_prompt) == (20000, 1024, 256, 4)
    assert cfg.model.name == "gpt2-large" and cfg.sft.steps * cfg.sft.batch_size == 16000
    assert (cfg.dpo.masking, cfg.dpo.reference, cfg.dpo.beta) == ("masked-sum", "cache", 0.1)
    assert cfg.train.batch_size * cfg.train.grad_accum == 64 and cfg.train.device == "auto"
    assert 1e-5 <= cfg.sft.lr <= 5e-5
    exp = load_experiment(IMDB)
    assert [c.id for c in exp.cells] == ["beta=0.05", "beta=0.1", "beta=0.5", "beta=1.0"]
    assert exp.spec.trials == 1 and exp.spec.seeds == 1
    assert {"gen/reward", "gen/kl"} <= metrics.enabled(cfg) and not metrics.enabled(cfg) & metrics.PARSE_METRICS
