"""Best-of-N sampling from the SFT reference: the baseline beside DPO in the reward-vs-KL plane
(the DPO paper's Figure 2, left).

    harness baselines EXPERIMENT.yaml [--n-max 64] [--force]

For each model size of a study (the `model.name` values of its cells, the experiment's own if
no cell sets one) the command takes the SFT checkpoint the runs start from (the shared cache,
built when missing), draws n_max samples of each gen-eval prompt the runs are evaluated on,
scores them with the task's reward, and for N = 1, 2, 4, ..., n_max writes the expected reward
of the best of N samples (mean and standard error over prompts) to
results/<study>/baselines/best_of_n.csv.

Its KL is estimated from the same samples (`kl`, `kl_se`, `kl_kind` "estimate"): best-of-N with
ties broken at random puts mass q_r = F(r)^N − F(r⁻)^N on each reward level r (F the reference's
reward distribution for the prompt), spread over that level's texts in proportion to π_ref, so
KL(π_best-of-N ‖ π_ref) = Σ_r q_r log(q_r / p_r), p_r the reference's mass at r: computed with
each prompt's empirical F from its n_max samples and averaged over prompts. Beside it, `kl_bound`:
the closed form log N − (N−1)/N (Beirami et al. 2024, arXiv 2401.01879), an upper bound, reached
only when no two texts share a reward. The controlled task's reward takes few values (ties are
common), so the estimate lies well below the bound; with N near n_max the plug-in F makes it
an underestimate (it cannot exceed log n_max).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from harness import atomic
from harness.config import ConfigError, Experiment, RunConfig
from harness.generate import mean_se, sample

COLUMNS = ["model.name", "n", "reward", "reward_se", "kl", "kl_se", "kl_bound", "kl_kind"]
FORMAT = 2  # CSV layout version: a file of another layout is sampled again
SAMPLE_ROWS = 256  # sequences sampled in one batch


# ----------------------------------------------------------------------------- estimators


def expected_best_of_n(rewards: list[float], n: int) -> float:
    """E[max of N draws] estimated without bias from M ≥ N i.i.d. rewards of one prompt.

    With the rewards sorted, r_(1) ≤ ... ≤ r_(M), the mean of the maximum over all C(M, N)
    subsets of size N is Σ_i r_(i)·C(i−1, N−1) / C(M, N): r_(i) is the maximum of exactly the
    C(i−1, N−1) subsets that hold it and N−1 of the i−1 smaller ones. N = 1 gives the mean,
    N = M the maximum.
    """
    m = len(rewards)
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs 1 <= N <= M samples, got M = {m}")
    total = math.comb(m, n)
    return sum(r * (math.comb(i, n - 1) / total) for i, r in enumerate(sorted(rewards)))


def kl_bound(n: int) -> float:
    """log N − (N−1)/N: the upper bound on KL(best-of-N ‖ π_ref) (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def kl_best_of_n(rewards: list[float], n: int) -> float:
    """KL(best-of-N ‖ π_ref) for one prompt, its reference distribution taken to be the empirical
    one of `rewards` (module docstring): Σ_r q_r log(q_r / p_r), q_r = F(r)^N − F(r⁻)^N."""
    m = len(rewards)
    if not 1 <= n:
        raise ValueError(f"best-of-{n}: N must be at least 1")
    levels = sorted(set(rewards))
    counts = [rewards.count(r) for r in levels]
    total, below = 0.0, 0
    for c in counts:
        p, q = c / m, ((below + c) / m) ** n - (below / m) ** n
        total += q * math.log(q / p) if q > 0 else 0.0
        below += c
    return total


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max (n_max itself included when it is not a power of two)."""
    ns = [2**k for k in range(n_max.bit_length()) if 2**k <= n_max]
    return ns if ns[-1] == n_max else [*ns, n_max]


def best_of_n_rows(model_name: str, rewards: list[list[float]], n_max: int) -> list[dict]:
    """One CSV row per N: mean and standard error over prompts of each prompt's estimate."""
    rows = []
    for n in powers_of_two(n_max):
        mean, se = mean_se([expected_best_of_n(r, n) for r in rewards])
        kl, kl_se = mean_se([kl_best_of_n(r, n) for r in rewards])
        rows.append({"model.name": model_name, "n": n, "reward": mean, "reward_se": se, "kl": kl,
                     "kl_se": kl_se, "kl_bound": kl_bound(n), "kl_kind": "estimate"})
    return rows


# ----------------------------------------------------------------------------- sampling


def sample_rewards(cfg: RunConfig, n_max: int, device, say) -> list[list[float]]:
    """n_max rewards per gen-eval prompt from samples of the run's SFT reference."""
    from tqdm.auto import tqdm

    from harness.prepare import TASKS
    from harness.sft import load_checkpoint

    prep = TASKS[cfg.task.name].prepare(cfg, device, say)
    if prep.reward_fn is None or prep.init_path is None:
        raise ConfigError(f"task.name: {cfg.task.name!r} has no SFT reference with a known reward")
    tok = prep.tokenizer
    model = load_checkpoint(prep.init_path).to(device)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prep.eval_prompts]
    rows = [i for i in range(len(ids)) for _ in range(n_max)]  # prompt index of each sample
    texts: list[str] = []
    for s in tqdm(range(0, len(rows), SAMPLE_ROWS), desc=f"best-of-{n_max} {cfg.model.name}",
                  unit="batch", disable=not cfg.tracking.progress):
        chunk = [ids[i] for i in rows[s:s + SAMPLE_ROWS]]
        out = sample(model, chunk, cfg.gen_eval.max_new_tokens, tok.eos_token_id,
                     tok.pad_token_id, cfg.gen_eval.seed + s, device)
        texts += [tok.decode([t for t in o if t != tok.eos_token_id]) for o in out]
    rewards: list[list[float]] = [[] for _ in ids]
    for i, text in zip(rows, texts, strict=True):
        rewards[i].append(prep.reward_fn(prep.eval_prompts[i], text))
    return rewards


# ----------------------------------------------------------------------------- the command


def model_configs(exp: Experiment) -> dict[str, RunConfig]:
    """The run config of the first cell of each model size, in cell order: the runs of every
    cell of that size start from the same SFT checkpoint."""
    out: dict[str, RunConfig] = {}
    for cell in exp.cells:
        cfg = exp.run_config(cell, {}, 0, f"{exp.study}-best-of-n", [])
        out.setdefault(cfg.model.name, cfg)
    return out


def settings(configs: dict[str, RunConfig], n_max: int) -> dict:
    """What determines the CSV: the fields behind each model's SFT checkpoint, prompts and samples."""
    return {"format": FORMAT, "n_max": n_max, "models": {
        name: cfg.model_dump(mode="json", include={"model", "sft", "task", "data", "gen_eval"})
        for name, cfg in configs.items()}}


def run_baselines(exp: Experiment, results_dir: str | Path, n_max: int = 64,
                  force: bool = False) -> Path:
    """Write <results_dir>/<study>/baselines/best_of_n.csv (skipped when it exists for the same
    settings, unless `force`); returns its path."""
    import pandas as pd

    from harness.device import pick_device

    if n_max < 1:
        raise ConfigError(f"--n-max {n_max}: at least 1 sample per prompt")
    configs = model_configs(exp)
    if any(cfg.task.name == "none" for cfg in configs.values()):
        raise ConfigError(f"{exp.path}: task.name: best-of-N needs a task with a ground-truth "
                          "reward (task.name: controlled)")
    out = Path(results_dir) / exp.study / "baselines" / "best_of_n.csv"
    meta = out.with_suffix(".json")
    wanted = settings(configs, n_max)
    if not force and out.exists() and meta.exists() and json.loads(meta.read_text()) == wanted:
        print(f"best-of-N: {out} is up to date (--force to sample again)", file=sys.stderr)
        return out
    rows = []
    for name, cfg in configs.items():
        rewards = sample_rewards(cfg, n_max, pick_device(cfg.train.device),
                                 lambda msg: print(msg, file=sys.stderr))
        rows += best_of_n_rows(name, rewards, n_max)
    df = pd.DataFrame(rows, columns=COLUMNS)
    atomic.atomic_write(out, df.to_csv(index=False))
    atomic.atomic_json(meta, wanted)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"best-of-N: wrote {out}", file=sys.stderr)
    return out
