"""The metric registry: every metric a run can log, its split and group, its label in figures, which
way is better, and the settings that enable it. Plain data, no torch: the per-pair metrics
(harness.dpo), the loop, generation metrics, the sweep's objective check, tracking (wandb step
metrics, best values), the CLI's final print and analysis/ all read it.

Names are `{split}/{group}/{name}` (or `{split}/{name}`): `train/loss`, `eval/rewards/margins`,
`gen/kl`, `perf/tokens_per_s`. A name not in `METRICS` cannot be logged (`check` raises), so a
renamed metric fails at the first log of a run, not when a figure or an objective looks for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

# `always`: every run; `task`: a task with a ground-truth reward (harness/tasks); `gen`: generation
# metrics on (gen_eval.enabled; default: on exactly for a task); `reward`: both.
Needs = Literal["always", "task", "gen", "reward"]
# Which way is better: tracking keeps each headline metric's best value by it (wandb `best/<name>`).
# None where neither is: gen/kl is held to a budget and its estimate can dip below zero;
# diagnostics (log-probs, gradient norm, timings) have no better side.
Direction = Literal["max", "min"] | None


@dataclass(frozen=True)
class Metric:
    name: str  # full name, e.g. eval/rewards/margins (a pair metric's key: without its split)
    label: str  # axis label in figures
    needs: Needs = "always"
    headline: bool = False  # printed by `harness train` at the end of a run
    direction: Direction = None  # "max" or "min": which way is better

    @property
    def split(self) -> str:
        return self.name.split("/", 1)[0]


# Per-pair metrics of one micro-batch, keyed without their split: harness.dpo.pair_metrics returns
# one value per pair under each key; the loop averages them over pairs and logs them under each
# split below.
LOSS = "loss"
REWARDS_CHOSEN, REWARDS_REJECTED = "rewards/chosen", "rewards/rejected"
REWARDS_MARGINS, REWARDS_ACCURACIES = "rewards/margins", "rewards/accuracies"
LOGRATIOS_MARGINS = "logratios/margins"
LOGPS_CHOSEN, LOGPS_REJECTED = "logps/chosen", "logps/rejected"
PAIR_METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric(LOSS, "DPO loss", direction="min"),
    Metric(REWARDS_CHOSEN, "implicit reward, chosen (β·log-ratio)"),
    Metric(REWARDS_REJECTED, "implicit reward, rejected (β·log-ratio)"),
    Metric(REWARDS_MARGINS, "reward margin β·h (nats)", direction="max"),
    Metric(REWARDS_ACCURACIES, "reward accuracy", direction="max"),
    Metric(LOGRATIOS_MARGINS, "log-ratio margin h (nats)", direction="max"),
    Metric(LOGPS_CHOSEN, "policy log-prob, chosen"),
    Metric(LOGPS_REJECTED, "policy log-prob, rejected"),
]}
PAIR_SPLITS: dict[str, str] = {"train": "train", "eval": "validation", "test": "test"}

_OTHERS = [
    Metric("train/grad_norm", "gradient norm (before clipping)"),
    Metric("train/lr", "learning rate"),
    Metric("perf/tokens_per_s", "tokens per second (non-padding)"),
    Metric("perf/step_s", "seconds per optimizer step"),
    Metric("gen/kl", "KL(π ‖ π_ref) per sample (nats)", "gen"),
    Metric("gen/kl_se", "standard error of gen/kl (nats)", "gen"),
    Metric("gen/length", "sample length (tokens)", "gen"),
    Metric("gen/reward", "ground-truth reward of samples", "reward", direction="max"),
    Metric("gen/reward_se", "standard error of gen/reward", "reward"),
    Metric("gen/ref_reward", "ground-truth reward of reference samples", "reward"),
    Metric("gen/win_rate", "win rate against the reference", "reward", direction="max"),
    Metric("gen/parsed", "fraction of samples that parse in the task's language", "reward",
           direction="max"),
    Metric("gen/reward_parsed", "ground-truth reward of the samples that parse", "reward"),
    Metric("eval/pref_accuracy", "held-out preference accuracy (true reward order)", "task",
           direction="max"),
    # harness.frontier: the best reward on the run's (gen/kl, gen/reward) path so far at KL <= k
    Metric("gen/reward_at_kl", "reward at matched KL (mean of the frontier at 1, 2, 4 nats)",
           "reward", direction="max"),
    *[Metric(f"gen/reward_at_kl_{k}", f"reward at KL ≤ {k} nats (frontier of the run's path)",
             "reward", direction="max") for k in (1, 2, 4)],
]
_HEADLINE = {"train/loss", "eval/loss", "eval/rewards/margins", "eval/rewards/accuracies",
             "test/loss", "gen/reward", "gen/kl", "gen/reward_at_kl"}


def _registry() -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for split, split_label in PAIR_SPLITS.items():
        for key, m in PAIR_METRICS.items():
            full = f"{split}/{key}"
            out[full] = replace(m, name=full, label=f"{m.label} ({split_label})",
                                headline=full in _HEADLINE)
    for m in _OTHERS:
        out[m.name] = replace(m, headline=m.name in _HEADLINE)
    return out


METRICS: dict[str, Metric] = _registry()
# Prefixes that wandb plots against `examples_seen` (runs with different batch sizes line up).
SPLITS: tuple[str, ...] = tuple(sorted({m.split for m in METRICS.values()}))


class UnknownMetric(KeyError):
    """A producer logged a name the registry lacks."""


def check(names: Iterable[str]) -> None:
    """Raise UnknownMetric naming every name that is not registered."""
    unknown = sorted(n for n in names if n not in METRICS)
    if unknown:
        raise UnknownMetric(f"metric(s) {', '.join(unknown)} not in harness.metrics.METRICS; "
                            "register a new metric there (name, label, what enables it)")


def gen_enabled(cfg: Any) -> bool:
    """Generation metrics: `gen_eval.enabled`, or by default on exactly when a task has a reward."""
    g = cfg.gen_eval.enabled
    return cfg.task.name != "none" if g is None else g


def _has_split(cfg: Any, split: str) -> bool:
    """Whether a run of this config has pairs in `split` (validation or test) by construction."""
    if cfg.task.name != "none":  # a task samples train and validation pairs, no test split
        return split == "validation" and cfg.task.n_val_prompts > 0
    d = cfg.data
    if d.validation_source or d.test_source:  # given files replace the fractions
        return bool(d.validation_source if split == "validation" else d.test_source)
    return d.split[1 if split == "validation" else 2] > 0


# Metrics of whether samples parse in the task's language, and the tasks that have one (a parse
# function in harness.prepare): a task without one (imdb: free text) does not log them.
PARSE_METRICS = frozenset({"gen/parsed", "gen/reward_parsed"})
PARSE_TASKS = frozenset({"controlled"})


def enabled(cfg: Any) -> set[str]:
    """Every metric name a run of this config logs: eval/ and gen/ need a validation split, test/
    a test split and train.test_at_end, gen/ generation metrics on, the parse metrics a task with
    a language, and the rest as `needs` says."""
    gen, task = gen_enabled(cfg), cfg.task.name != "none"
    on = {"always": True, "task": task, "gen": gen, "reward": gen and task}
    split_on = {"train": True, "perf": True, "eval": _has_split(cfg, "validation"),
                "gen": _has_split(cfg, "validation"),
                "test": cfg.train.test_at_end and _has_split(cfg, "test")}
    names = {m.name for m in METRICS.values() if on[m.needs] and split_on[m.split]}
    return names if cfg.task.name in PARSE_TASKS else names - PARSE_METRICS


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The few values `harness train` prints at the end, in registry order."""
    return {name: summary[name] for name, m in METRICS.items() if m.headline and name in summary}


def label(name: str) -> str:
    """A figure label for a metric name (the name itself when unknown)."""
    m = METRICS.get(name)
    return m.label if m else name
