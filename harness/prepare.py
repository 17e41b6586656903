"""Everything a run needs before its first step, behind one small task interface.

    prepared = prepare(cfg, device, say)

A task turns the config into a tokenizer, pairs per split, and what else it knows: the SFT
checkpoint the run starts from (also its reference), true rewards of the pairs, a reward function
and prompts for generation metrics. Two tasks exist:

- `FileData` (task.name: none): pairs from data.source; the tokenizer is trained on them for a
  tiny model; optional SFT on a record field; chat `messages` rendered with the tokenizer.
- `Controlled` (task.name: controlled): the synthetic review language (harness/tasks); SFT on
  unlabelled reviews; pairs sampled from the SFT model and labelled by the true reward.
- `Imdb` (task.name: imdb): the DPO paper's own sentiment task (harness/tasks/imdb.py): SFT on
  IMDb reviews; prompts are review prefixes; pairs sampled from the SFT model and labelled by a
  sentiment classifier's log-odds of `positive`.

The order "tokenizer needs texts → messages need the tokenizer → the controlled task needs SFT
before it has pairs" lives inside each task; the loop sees only `Prepared`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness import atomic, cache, metrics
from harness import data as hdata
from harness import models as hmodels
from harness.chaos import crash_point
from harness.config import ConfigError, RunConfig
from harness.errors import DataError
from harness.phases import phase
from harness.sft import load_checkpoint, sft_checkpoint
from harness.tasks import controlled, imdb

Say = Callable[..., None]


@dataclass
class Prepared:
    tokenizer: object
    raw_splits: dict[str, list[hdata.Pair]]  # train / validation / test
    special_tokens: bool  # prompts take the tokenizer's special tokens (file data, not chat)
    init_path: Path | None = None  # SFT checkpoint: the starting policy and the reference
    true_rewards: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    reward_fn: Callable[[str, str], float] | None = None  # r(prompt, continuation), if known
    parse_fn: Callable[[str, str], bool] | None = None  # does a continuation parse (task language)
    eval_prompts: list[str] = field(default_factory=list)  # prompts for generation metrics
    info: dict = field(default_factory=dict)  # tokenizer, SFT and pair-set sources for summary.json
    splits: dict[str, list[hdata.TokenizedPair]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # data/<split>/<what> pair counts


class Task(Protocol):
    def prepare(self, cfg: RunConfig, device, say: Say) -> Prepared: ...


def _tokenizer(cfg: RunConfig, texts: Callable[[], Iterable[str]]) -> tuple[object, dict]:
    tokenizer, info = hmodels.load_tokenizer(cfg.model, texts)
    return tokenizer, {"tokenizer_source": info["tokenizer_source"]}


def _sft(cfg: RunConfig, tokenizer, corpus: list[str], device, say: Say) -> tuple[Path, dict]:
    with phase("sft"):
        path, stats, reused = sft_checkpoint(cfg, tokenizer, corpus, device)
    say(f"sft: {'reused' if reused else 'trained'} checkpoint {path}")
    return path, {**stats, "sft/checkpoint": str(path), "sft/reused": reused}


class FileData:
    """Pairs from data.source (file, URL, `datasets` directory or hub)."""

    def pairs(self, cfg: RunConfig) -> Prepared:
        """The tokenizer and the pairs per split: everything but an SFT stage."""
        messages = cfg.data.format == "messages"  # rendering needs the tokenizer first
        if messages and hmodels.is_tiny(cfg.model.name) and not cfg.model.tokenizer:
            raise ConfigError(f"data.format messages with model.name {cfg.model.name}: a tiny "
                              "model's tokenizer is trained on the pairs' texts, which need a chat "
                              "template first. Set model.tokenizer to a chat tokenizer")
        raw = None if messages else hdata.load_pairs(cfg.data)
        tokenizer, info = _tokenizer(cfg, lambda: hdata.iter_texts(raw["train"]) if raw else iter(()))
        return Prepared(tokenizer, raw or hdata.load_pairs(cfg.data, tokenizer),
                        special_tokens=not messages, info=info)

    def prepare(self, cfg: RunConfig, device, say: Say) -> Prepared:
        out = self.pairs(cfg)
        if cfg.sft.enabled:
            corpus = hdata.sft_texts(cfg.data, cfg.sft.field, out.tokenizer)
            out.init_path, sft_info = _sft(cfg, out.tokenizer, corpus, device, say)
            out.info.update(sft_info)
        if metrics.gen_enabled(cfg):
            out.eval_prompts = [p.prompt for p in out.raw_splits["validation"][: cfg.gen_eval.n_prompts]]
            say("gen eval: no ground-truth reward exists for this data; reporting KL and samples only")
        return out


class Controlled:
    """The controlled task: reviews with an exact reward (harness/tasks/controlled.py)."""

    def prepare(self, cfg: RunConfig, device, say: Say) -> Prepared:
        tc = cfg.task
        corpus = [r.prompt + r.continuation for r in controlled.generate_reviews(tc.n_sft_texts, tc.seed)]
        tokenizer, info = _tokenizer(cfg, lambda: iter(corpus))
        init_path, sft_info = _sft(cfg, tokenizer, corpus, device, say)
        splits = controlled.prompt_splits(tc.seed, tc.n_train_prompts, tc.n_val_prompts, tc.n_eval_prompts)
        pairs, path, reused = self.pair_set(cfg, init_path, tokenizer,
                                            splits["train"] + splits["validation"], device, say)
        raw = {name: [hdata.Pair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs[name]]
               for name in ("train", "validation")}
        rewards = {name: [(p["r_chosen"], p["r_rejected"]) for p in pairs[name]]
                   for name in ("train", "validation")}
        return Prepared(tokenizer, {**raw, "test": []}, special_tokens=False, init_path=init_path,
                        true_rewards=rewards, reward_fn=controlled.reward, parse_fn=controlled.parses,
                        eval_prompts=splits["eval"],
                        info={**info, **sft_info, "pairs/cache": str(path), "pairs/reused": reused})

    @staticmethod
    def pair_set(cfg: RunConfig, init_path: Path, tokenizer, prompts: list[str], device,
                 say: Say) -> tuple[dict, Path, bool]:
        """Train/validation pairs from the SFT model's own samples, cached by a hash of the SFT
        checkpoint and the task settings; made once under a lock when workers race."""
        tc = cfg.task
        path = cache.entry("pairs", cache.Key(str(init_path), tc.model_dump(mode="json")).texts(prompts), ".json")

        def sample() -> dict:
            t0 = time.time()
            model = load_checkpoint(init_path).to(device)
            pairs = {}
            for split, ps, seed in (("train", prompts[: tc.n_train_prompts], tc.seed),
                                    ("validation", prompts[tc.n_train_prompts:], tc.seed + 10_000)):
                pairs[split] = controlled.build_pairs(model, tokenizer, ps, tc.samples_per_prompt,
                                                      tc.bt_temperature, tc.max_new_tokens, seed, device)
            crash_point("pairs")
            atomic.atomic_write(path, json.dumps(pairs))
            say(f"pairs: sampled {sum(len(v) for v in pairs.values())} in {time.time() - t0:.0f}s -> {path}")
            return pairs

        with phase("pairs"), atomic.file_lock(path.with_suffix(".lock")):
            pairs, reused = cache.read_or_rebuild(path, lambda p: json.loads(p.read_text()), sample)
        if reused:
            say(f"pairs: reused {path}")
        return pairs, path, reused


class Imdb:
    """The DPO paper's IMDb task: a real model, IMDb reviews, a sentiment classifier as the reward
    (harness/tasks/imdb.py)."""

    def prepare(self, cfg: RunConfig, device, say: Say) -> Prepared:
        tc = cfg.task
        # The classifier first: a reward model that cannot be loaded fails before any SFT.
        reward = imdb.SentimentReward(tc.reward_model, device, tc.reward_label)
        say(f"reward: {reward.describe()}")
        texts = imdb.split_texts(imdb.load_texts(tc.texts, tc.texts_split, cfg.data), tc.seed,
                                 tc.n_sft_texts, {"eval": tc.n_eval_prompts,
                                                  "validation": tc.n_val_prompts,
                                                  "train": tc.n_train_prompts})
        tokenizer, info = _tokenizer(cfg, lambda: iter(texts["sft"]))
        init_path, sft_info = _sft(cfg, tokenizer, texts["sft"], device, say)
        prompts = {name: imdb.prefixes(texts[name], tokenizer, tc.prompt_tokens, f"{tc.seed}/{name}-prompts")
                   for name in ("train", "validation", "eval")}
        pairs, path, reused = self.pair_set(cfg, init_path, tokenizer, reward,
                                            prompts["train"] + prompts["validation"], device, say)
        raw = {name: [hdata.Pair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs[name]]
               for name in ("train", "validation")}
        rewards = {name: [(p["r_chosen"], p["r_rejected"]) for p in pairs[name]]
                   for name in ("train", "validation")}
        return Prepared(tokenizer, {**raw, "test": []}, special_tokens=False, init_path=init_path,
                        true_rewards=rewards, reward_fn=reward, eval_prompts=prompts["eval"],
                        info={**info, **sft_info, "reward/model": reward.describe(),
                              "pairs/cache": str(path), "pairs/reused": reused})

    @staticmethod
    def pair_set(cfg: RunConfig, init_path: Path, tokenizer, reward: imdb.SentimentReward,
                 prompts: list[str], device, say: Say) -> tuple[dict, Path, bool]:
        """Train/validation pairs from the SFT model's samples, scored by the classifier; cached by a
        hash of the SFT checkpoint, the task settings, the classifier's weights and the prompts."""
        tc = cfg.task
        key = cache.Key(str(init_path), tc.model_dump(mode="json"), reward.digest).texts(prompts)
        path = cache.entry("pairs", key, ".json")

        def sample() -> dict:
            t0 = time.time()
            model = load_checkpoint(init_path).to(device)
            pairs = {}
            for split, ps, seed in (("train", prompts[: tc.n_train_prompts], tc.seed),
                                    ("validation", prompts[tc.n_train_prompts:], tc.seed + 10_000)):
                pairs[split] = imdb.build_pairs(model, tokenizer, ps, tc.samples_per_prompt,
                                                tc.bt_temperature, tc.max_new_tokens, seed, device,
                                                reward.batch)
            atomic.atomic_write(path, json.dumps(pairs))
            say(f"pairs: sampled {sum(len(v) for v in pairs.values())} in {time.time() - t0:.0f}s -> {path}")
            return pairs

        with phase("pairs"), atomic.file_lock(path.with_suffix(".lock")):
            pairs, reused = cache.read_or_rebuild(path, lambda p: json.loads(p.read_text()), sample)
        if reused:
            say(f"pairs: reused {path}")
        return pairs, path, reused


TASKS: dict[str, Task] = {"none": FileData(), "controlled": Controlled(), "imdb": Imdb()}


def tokenized(cfg: RunConfig, out: Prepared) -> Prepared:
    """Token ids per split with their counts (data/<split>/<what>); data.min_score_gap filters
    the train split only, so every cell of a sweep over it is evaluated on the same pairs."""
    for name, pairs in out.raw_splits.items():
        out.splits[name], c = hdata.tokenize_pairs(
            pairs, out.tokenizer, cfg.data.max_length, cfg.data.too_long, cfg.data.add_eos,
            prompt_special_tokens=out.special_tokens,
            min_score_gap=cfg.data.min_score_gap if name == "train" else None,
        )
        out.counts.update({f"data/{name}/{k.split('/')[-1]}": v for k, v in c.items()})
    if not out.splits["train"]:
        raise DataError(f"data.source {cfg.data.source}: no training pairs left after filtering: "
                        f"{out.counts}")
    return out


def prepare(cfg: RunConfig, device, say: Say) -> Prepared:
    """The task's tokenizer, pairs and extras, then token ids per split with their counts."""
    return tokenized(cfg, TASKS[cfg.task.name].prepare(cfg, device, say))


def preview(cfg: RunConfig) -> Prepared:
    """A file-data run's tokenizer, pairs and token ids as training would have them, without the
    SFT stage or a model: what `harness data` shows."""
    if cfg.task.name != "none":
        raise ConfigError(f"task.name: {cfg.task.name}: this task samples its pairs from an SFT "
                          "model, so there is no data file to check; `harness data` reads "
                          "data.source (task.name: none)")
    return tokenized(cfg, FileData().pairs(cfg))
