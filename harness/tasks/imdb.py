"""The DPO paper's IMDb sentiment task (Rafailov et al. 2023, §6.1 and Appendix C.1, Figure 2 left)
on a real model: SFT on IMDb reviews, prompts that are review prefixes, and a sentiment classifier
as the ground-truth reward.

Texts. `task.texts` (a hub dataset id such as stanfordnlp/imdb, a `datasets` directory, or a
.jsonl / .json / .parquet file) gives records with a `text` field; HTML line breaks (`<br />`,
common in IMDb) become spaces and runs of whitespace one space. The texts are shuffled once with
`task.seed` (the hub's train split is sorted by label). Prompts come from the front of the
shuffled list (eval, then validation, then train prompts, so a split's prompts do not depend on
the later splits' sizes and training sets are nested), SFT texts from its back: the two never
share a review.

Prompts. A prompt is a review's first k tokens under the run's tokenizer, k drawn uniformly from
`task.prompt_tokens` (the paper: 2 to 8 tokens), decoded back to text.

Reward. r(x, y) = z_pos − z_neg, the classifier's logit of its positive label minus that of its
negative label, on the text x + y (truncated to the classifier's length): the log-odds of
`positive`, log p(pos | x + y) − log p(neg | x + y), unbounded, ~±5 for confident reviews. The
paper ranks samples by p(positive); the log-odds rank them the same way and, unlike the
probability, do not saturate near 0 and 1. `task.reward_model` defaults to lvwerra/distilbert-imdb
(the classifier TRL's sentiment examples use); the paper used siebert/sentiment-roberta-large-english,
which the field also takes. The positive label is read from the classifier's id2label (POSITIVE,
pos, or LABEL_1 of LABEL_0 / LABEL_1), else from `task.reward_label`.

Preferences: all pairs of a prompt's samples, y_i preferred with probability σ((r_i − r_j) / τ)
(Bradley–Terry, τ = `task.bt_temperature`); the paper takes the higher-reward sample (τ → 0).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch

from harness import data as hdata
from harness.config import ConfigError, DataConfig
from harness.errors import DataError, ModelNotFound

BATCH = 64  # texts per classifier forward pass
POSITIVE_NAMES = ("positive", "pos")  # id2label names of a positive label (lower case)
BatchReward = Callable[[list[str], list[str]], list[float]]


# ----------------------------------------------------------------------------- texts and prompts


def clean(text: str) -> str:
    """A review without HTML line breaks and with single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"<br\s*/?>", " ", text)).strip()


def load_texts(source: str, split: str, data: DataConfig) -> list[str]:
    """The cleaned, non-empty `text` field of every record of `source` (task.texts)."""
    try:
        records = hdata.load_records(source, data.model_copy(update={"hub_split": split}), field="task.texts")
    except OSError as err:  # a hub dataset that cannot be reached (offline, unknown id)
        raise DataError(f"task.texts: could not load {source!r} (split {split!r}, task.texts_split): "
                        f"{type(err).__name__}: {err}. Give a local .jsonl / .json / .parquet file or "
                        "a `datasets` directory with a `text` field, or a hub dataset id with the hub "
                        "reachable") from None
    if not records:
        raise DataError(f"task.texts: {source} holds no records")
    first = records[0]
    if not isinstance(first, dict) or "text" not in first:
        found = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise DataError(f"task.texts: {source}: the records have no `text` field (fields found: "
                        f"{found}). Each record needs its review under `text`")
    texts = []
    for i, r in enumerate(records):
        value = r.get("text") if isinstance(r, dict) else None
        if not isinstance(value, str):
            raise DataError(f"task.texts: {source}: row {i} (0-based): field 'text' must be text, "
                            f"got {type(value).__name__}")
        if clean(value):
            texts.append(clean(value))
    return texts


def split_texts(texts: list[str], seed: int, n_sft: int, n_prompts: dict[str, int]) -> dict[str, list[str]]:
    """`sft` texts and the reviews behind each prompt split (`eval`, `validation`, `train`), disjoint:
    prompts from the front of the shuffled texts, SFT texts from the back (module docstring)."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    need = n_sft + sum(n_prompts.values())
    if need > len(order):
        raise DataError(f"task.texts: {len(order)} non-empty reviews, but task.n_sft_texts + the "
                        f"prompts ({n_prompts}) need {need}, each review used once. Lower "
                        "task.n_sft_texts or the prompt counts, or give more texts")
    out, start = {}, 0
    for name in ("eval", "validation", "train"):
        out[name] = order[start:start + n_prompts[name]]
        start += n_prompts[name]
    out["sft"] = order[len(order) - n_sft:]
    return out


def prefixes(reviews: list[str], tokenizer, k_range: tuple[int, int], seed: int | str) -> list[str]:
    """Each review's first k tokens as text, k uniform in k_range, drawn in list order (so the first
    n prompts do not depend on how many follow). A k that would cut a character in two (byte-level
    tokens) is shortened until the decoded prefix is a prefix of the review."""
    rng = random.Random(seed)
    out = []
    for review in reviews:
        k = rng.randint(*k_range)
        ids = tokenizer(review[: 40 * k_range[1]], add_special_tokens=False)["input_ids"]
        k = min(k, len(ids))
        while k > 1 and not review.startswith(_decode(tokenizer, ids[:k])):
            k -= 1
        out.append(_decode(tokenizer, ids[:k]))
    return out


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- the reward


def load_classifier(name: str, device, trust_remote_code: bool = False):
    """(model in eval mode on `device`, tokenizer) of a sequence classifier: a local directory or a
    hub id. Anything that cannot be loaded is a ModelNotFound naming task.reward_model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = Path(name).expanduser()
    if not local.exists() and name.startswith((".", "/", "~")):
        raise ModelNotFound(f"task.reward_model: no such directory {name!r} ({local.absolute()}). "
                            f"{_WHAT}")
    where = str(local) if local.exists() else name
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            where, dtype=torch.float32, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        place = f"the directory {local.absolute()}" if local.exists() else f"{name!r} from the hub"
        raise ModelNotFound(f"task.reward_model: could not load {place} as a sequence classifier "
                            f"with its tokenizer ({type(err).__name__}: {_first_line(err)}). {_WHAT}"
                            ) from err
    return model.to(device).eval(), tok


_WHAT = ("Give a local directory written by save_pretrained (config.json, weights and tokenizer "
         "files of a two-label sentiment classifier), or a hub id such as lvwerra/distilbert-imdb "
         "with the hub reachable (HF_HUB_OFFLINE unset)")


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def label_indices(id2label: dict, override: str | None, name: str) -> tuple[int, int]:
    """(positive, negative) label indices of a two-label classifier: `override` (task.reward_label,
    a label name or index) when given, else the label named POSITIVE / pos, else LABEL_1 of
    LABEL_0 / LABEL_1."""
    labels = {int(i): str(v) for i, v in id2label.items()}
    shown = ", ".join(f"{i}: {v}" for i, v in sorted(labels.items()))
    if len(labels) != 2:
        raise ConfigError(f"task.reward_model: {name} has {len(labels)} labels ({shown}); the reward "
                          "needs a two-label (negative / positive) sentiment classifier")
    if override is not None:
        hits = [i for i, v in labels.items() if override.lower() in (v.lower(), str(i))]
        if not hits:
            raise ConfigError(f"task.reward_label: {override!r} is not a label of {name} ({shown}); "
                              "give one of those names or indices")
    else:
        hits = [i for i, v in labels.items() if v.lower() in POSITIVE_NAMES]
        if not hits and {v.lower() for v in labels.values()} == {"label_0", "label_1"}:
            hits = [i for i, v in labels.items() if v.lower() == "label_1"]
        if not hits:
            raise ConfigError(f"task.reward_label: {name}'s labels ({shown}) name no positive label "
                              "(POSITIVE, pos, LABEL_1); set task.reward_label to the positive one")
    pos = hits[0]
    return pos, next(i for i in labels if i != pos)


class SentimentReward:
    """r(x, y) = z_pos − z_neg of a sentiment classifier on x + y (module docstring): called per
    sample, r(prompt, continuation), or batched, r.batch(prompts, continuations). No gradients,
    float32, eval mode, on the run's device."""

    def __init__(self, name: str, device, reward_label: str | None = None,
                 trust_remote_code: bool = False):
        self.name, self.device = name, torch.device(device)
        self.model, self.tokenizer = load_classifier(name, self.device, trust_remote_code)
        self.pos, self.neg = label_indices(self.model.config.id2label, reward_label, name)
        limits = [self.tokenizer.model_max_length,
                  getattr(self.model.config, "max_position_embeddings", None) or 512]
        self.max_length = min(x for x in limits if x)
        self._digest: str | None = None

    def __call__(self, prompt: str, continuation: str) -> float:
        return self.batch([prompt], [continuation])[0]

    @torch.no_grad()
    def batch(self, prompts: list[str], continuations: list[str]) -> list[float]:
        texts = [x + y for x, y in zip(prompts, continuations, strict=True)]
        out: list[float] = []
        with torch.autocast(self.device.type, enabled=False):  # float32 whatever encloses it
            for s in range(0, len(texts), BATCH):
                enc = self.tokenizer(texts[s:s + BATCH], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()
                out += (logits[:, self.pos] - logits[:, self.neg]).cpu().tolist()
        return out

    @property
    def digest(self) -> str:
        """sha256 of the classifier's weights and its label choice: a pair-set cache key part."""
        if self._digest is None:
            from harness.reference import weights_digest

            self._digest = f"{weights_digest(self.model)}|{self.pos}|{self.neg}"
        return self._digest

    def describe(self) -> str:
        labels = self.model.config.id2label
        return f"{self.name}: logit {labels[self.pos]} − logit {labels[self.neg]}"


# ----------------------------------------------------------------------------- pairs


def bradley_terry_pairs(continuations: list[str], rewards: list[float], temperature: float,
                        rng: random.Random) -> list[tuple[str, str, float, float]]:
    """All pairs of distinct continuations of one prompt (4 samples → 6 pairs, as the paper), each
    labelled by a draw: y_i preferred with probability σ((r_i − r_j)/τ).
    Returns (chosen, rejected, r_chosen, r_rejected)."""
    out = []
    for i, j in itertools.combinations(range(len(continuations)), 2):
        if continuations[i] == continuations[j]:
            continue
        gap = max(-700.0, min(700.0, (rewards[i] - rewards[j]) / temperature))  # exp stays finite
        if rng.random() < 1.0 / (1.0 + math.exp(-gap)):
            out.append((continuations[i], continuations[j], rewards[i], rewards[j]))
        else:
            out.append((continuations[j], continuations[i], rewards[j], rewards[i]))
    return out


def build_pairs(model, tokenizer, prompts: list[str], samples_per_prompt: int, temperature: float,
                max_new_tokens: int, seed: int, device, reward: BatchReward) -> list[dict]:
    """Preference pairs from the model's own samples, scored by `reward` (batched: prompts,
    continuations → rewards) and labelled under Bradley–Terry: dicts with prompt, chosen,
    rejected, r_chosen, r_rejected."""
    from harness.generate import sample

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    repeated = [x for x in ids for _ in range(samples_per_prompt)]
    outs = []
    for s in range(0, len(repeated), 256):
        outs += sample(model, repeated[s:s + 256], max_new_tokens, eos, pad, seed + s, device)
    texts = [tokenizer.decode([t for t in o if t != eos]) for o in outs]
    scores = reward([p for p in prompts for _ in range(samples_per_prompt)], texts)
    rng = random.Random(seed)
    pairs = []
    for k, prompt in enumerate(prompts):
        part = slice(k * samples_per_prompt, (k + 1) * samples_per_prompt)
        for c, r, rc, rr in bradley_terry_pairs(texts[part], scores[part], temperature, rng):
            pairs.append({"prompt": prompt, "chosen": c, "rejected": r, "r_chosen": rc, "r_rejected": rr})
    return pairs
