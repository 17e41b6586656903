"""The frontier's language panels and intervals, best-of-N at its estimated KL, DPO + NLL as a
method, and the data-scaling figure, on run files written by hand."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import fig_frontier, fig_scaling
from analysis.methods import method_of
from analysis.style import MissingData


def write_run(results: Path, study: str, cell: str, slot: str, rows: list[dict], *, beta=0.1,
              loss="sigmoid", sft_weight=0.0, n_train=256, epochs=1, degenerate=False) -> Path:
    """One seed rerun of `cell`: config.json, metrics.jsonl (`rows`, eval points) and summary.json."""
    rd = results / study / "runs" / cell / slot
    rd.mkdir(parents=True)
    labels = {"study": study, "cell": cell, "trial": 0, "role": "seeds", "masking": "masked-sum",
              "seed": int(slot.removeprefix("seed")), "storage": None}
    config = {"model": {"name": "tiny-xs"}, "labels": labels,
              "dpo": {"loss": loss, "label_smoothing": 0.0, "beta": beta, "sft_weight": sft_weight},
              "task": {"n_train_prompts": n_train, "samples_per_prompt": 4},
              "train": {"epochs": epochs}}
    (rd / "config.json").write_text(json.dumps(config))
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {**rows[-1], **labels, "status": "finished", "n_params": 1000, "degenerate": degenerate}
    (rd / "summary.json").write_text(json.dumps(summary))
    return rd


def eval_rows(points: list[tuple[int, float, float, float]]) -> list[dict]:
    """Eval points (pairs seen, gen/kl, gen/reward, gen/parsed); the reward over parsed samples is
    the reward + 0.1; gen/reward_at_kl_4 the best reward so far within 4 nats."""
    rows, best = [], -math.inf
    for i, (seen, kl, r, parsed) in enumerate(points):
        best = max(best, r) if kl <= 4 else best
        rows.append({"step": i, "examples_seen": seen, "gen/kl": kl, "gen/kl_se": 0.1,
                     "gen/reward": r, "gen/reward_se": 0.02, "gen/ref_reward": 0.0,
                     "gen/parsed": parsed, "gen/reward_parsed": r + 0.1, "gen/reward_at_kl_4": best})
    return rows


def summary_csv(results: Path, study: str, run_dirs: dict[str, list[Path]]) -> None:
    rows = [{"cell": cell, "model.name": "tiny-xs", "status": "done", "objective": "gen/reward",
             "direction": "maximize", "run_dirs": ";".join(map(str, dirs))}
            for cell, dirs in run_dirs.items()]
    pd.DataFrame(rows).to_csv(results / study / "summary.csv", index=False)


@pytest.fixture
def language_study(tmp_path):
    """DPO at β 0.1 (final rewards 0.50, 0.52, 0.54 at KL 2, parsed 0.6) and Preferred-FT (0.2 at
    KL 0.5, parsed 0.9), 3 seeds each, from the reference (KL 0, reward 0, parsed 0.92)."""
    results = tmp_path / "results"
    dirs = {}
    for cell, loss, finals in (("dpo", "sigmoid", [(2.0, 0.50, 0.6), (2.0, 0.52, 0.6), (2.0, 0.54, 0.6)]),
                               ("sft", "sft", [(0.5, 0.2, 0.9)] * 3)):
        dirs[cell] = [write_run(results, "lang", cell, f"seed{k}", eval_rows([(0, 0.0, 0.0, 0.92),
                                                                            (96, *f)]), loss=loss)
                      for k, f in enumerate(finals, start=1)]
    summary_csv(results, "lang", dirs)
    return results


def test_frontier_has_language_panels_and_front_intervals(language_study):
    """Three panels on one KL axis: reward, reward of the parsed samples, fraction parsed (the SFT
    reference's 0.92 as a star at KL 0). DPO's front point carries the 95% t-interval of its
    three seeds' rewards: t(0.975, 2) · 0.02 / √3 = 0.0497."""
    (f,) = fig_frontier.frontiers(language_study)
    assert fig_frontier.language_panels(f) == ["gen/reward_parsed", "gen/parsed"]
    dpo = f.fronts[f.fronts["method"] == "DPO"].set_index("examples_seen").loc[96]
    assert f.fronts[f.fronts["method"] == "DPO"]["examples_seen"].tolist() == [0, 96]
    assert dpo["gen/reward"] == pytest.approx(0.52) and dpo["y_half"] == pytest.approx(0.04968, abs=1e-4)
    assert dpo["x_half"] == 0.0  # the same KL in every seed
    fig = fig_frontier.plot(f)
    reward, parsed_reward, parsed = fig.axes[:3]
    assert parsed.get_title() == "samples that parse (the task's language)"
    finals = {tuple(line.get_xydata()[0]) for line in parsed.lines if len(line.get_xydata()) == 1}
    assert (2.0, 0.6) in finals and (0.5, 0.9) in finals
    stars = [c.get_offsets().tolist() for c in parsed.collections if c.get_offsets().size]
    assert [[0.0, 0.92]] in stars
    assert {tuple(line.get_xydata()[0].round(6)) for line in parsed_reward.lines
            if len(line.get_xydata()) == 1} >= {(2.0, 0.6), (2.0, 0.64), (0.5, 0.3)}


def test_best_of_n_at_its_estimated_kl_beside_the_bound(language_study):
    """A best_of_n.csv with estimated KL: the solid line runs through (kl, reward), a dashed one
    through (kl_bound, reward); the legend names both."""
    rows = [{"model.name": "tiny-xs", "n": n, "reward": 0.1 * i, "reward_se": 0.01, "kl": 0.5 * k,
             "kl_se": 0.05, "kl_bound": k, "kl_kind": "estimate"}
            for i, (n, k) in enumerate(((1, 0.0), (4, 0.636), (16, 1.835)))]
    (language_study / "lang" / "baselines").mkdir()
    pd.DataFrame(rows).to_csv(language_study / "lang" / "baselines" / "best_of_n.csv", index=False)
    (f,) = fig_frontier.frontiers(language_study)
    assert f.baseline_note == "best-of-N (KL from samples)"
    ax = fig_frontier.plot(f).axes[0]
    xs = {tuple(line.get_xdata()) for line in ax.lines if len(line.get_xdata()) == 3}
    assert (0.0, 0.318, 0.9175) in {tuple(round(x, 4) for x in t) for t in xs}
    assert (0.0, 0.636, 1.835) in xs
    legend = [t.get_text() for t in fig_frontier.plot(f).axes[-1].get_legend().get_texts()]
    assert "best-of-N (KL from samples)" in legend and "best-of-N at its KL bound" in legend


def test_dpo_with_an_nll_term_is_its_own_method():
    assert method_of("sigmoid", 0.0, 0.2) == "DPO + NLL" and method_of("sigmoid", 0.0, 0.0) == "DPO"
    assert method_of("ipo", 0.0, 1.0) == "IPO + NLL" and method_of("sft", 0.0, 1.0) == "Preferred-FT"
    assert method_of("sigmoid", 0.0, float("nan")) == "DPO"


def test_scaling_figure_by_hand(tmp_path):
    """Two data settings of DPO β 0.1 (256 and 1024 prompts), 2 seeds each: the mean line at each
    pairs-seen value is the seeds' mean, a degenerate seed stays in the mean and is also drawn
    dotted, and the settings are named and ordered by size."""
    results = tmp_path / "results"
    dirs = {"n256": [write_run(results, "sc", "n256", f"seed{k}",
                               eval_rows([(0, 0, 0, 0.9), (1536, 1.0, r, 0.8)]), n_train=256)
                     for k, r in ((1, 0.3), (2, 0.5))],
            "n1024": [write_run(results, "sc", "n1024", f"seed{k}",
                                eval_rows([(0, 0, 0, 0.9), (3072, 2.0, r, p), (6144, 3.0, r + 0.2, p)]),
                                n_train=1024, degenerate=k == 2)
                      for k, r, p in ((1, 0.6, 0.7), (2, 0.8, 0.1))]}
    summary_csv(results, "sc", dirs)
    pts = fig_scaling.scaling_points(results)
    assert set(pts["setting"]) == {"256 prompts · 4 samples/prompt · 1 epochs",
                                   "1024 prompts · 4 samples/prompt · 1 epochs"}
    fig = fig_scaling.plot("sc", pts)
    top = fig.axes[0]
    means = {tuple(line.get_xdata()): tuple(line.get_ydata()) for line in top.lines
             if line.get_marker() == "." and line.get_linestyle() == "-"}
    assert means[(0, 1536)] == pytest.approx((0.0, 0.4))
    assert means[(0, 3072, 6144)] == pytest.approx((0.0, 0.7, 0.9))
    dotted = [line for line in top.lines if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and tuple(dotted[0].get_ydata()) == pytest.approx((0.0, 0.8, 1.0))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][:2] == [
        "256 prompts · 4 samples/prompt · 1 epochs", "1024 prompts · 4 samples/prompt · 1 epochs"]
    assert {p.name for p in fig_scaling.draw(results, tmp_path / "out")} == {"scaling_sc.png",
                                                                             "scaling_sc.pdf"}


def test_scaling_figure_needs_a_data_axis(language_study):
    with pytest.raises(MissingData, match="no study varies task.n_train_prompts"):
        fig_scaling.scaling_points(language_study)


def test_fronts_compared_over_the_kl_both_cover():
    """A: (0.5, .3), (1, .5), (2, .8); B: (0.2, .2), (1.5, .45). Both cover 0.5–1.5 nats; at k =
    0.5, 1, 1.5 A's best is .3, .5, .5 against B's .2, .2, .45: above at all 3, gap ≥ +0.05; with
    half-widths 0.1 A is wholly above only where the gap exceeds 0.2 (k = 1). Fronts that share
    no KL are not compared."""
    from analysis.methods import compare_fronts

    def front(points, half=0.1):
        return pd.DataFrame({"gen/kl": [0.0] + [k for k, _ in points], "gen/reward": [0.0] + [r for _, r in points],
                             "y_half": half, "examples_seen": range(len(points) + 1)})

    a, b = front([(0.5, 0.3), (1.0, 0.5), (2.0, 0.8)]), front([(0.2, 0.2), (1.5, 0.45)])
    c = compare_fronts(a, b)
    assert c["range"] == (0.5, 1.5) and c["n"] == 3 and c["above"] == 3 and c["separated"] == 1
    assert c["min_gap"] == pytest.approx(0.05)
    assert compare_fronts(b, a)["above"] == 0
    assert compare_fronts(front([(3.0, 1.0)]), b)["range"] is None


def test_findings_compare_training_prompts_with_the_rest_held(tmp_path):
    """A study over training prompts (256, 1024) at two βs: findings.md compares the prompt
    counts within each β and the βs within each prompt count, never across them; the results
    table names the prompt count."""
    from analysis.findings import findings
    from analysis.table import draw as table

    results = tmp_path / "results"
    dirs = {}
    for beta in (0.1, 0.5):
        for n, base in ((256, 0.3), (1024, 0.7)):
            cell = f"n{n}-b{beta}"
            dirs[cell] = [write_run(results, "sc", cell, f"seed{k}",
                                    eval_rows([(0, 0, 0, 0.9), (n * 6, 1.0, base + beta + 0.01 * k, 0.8)]),
                                    n_train=n, beta=beta) for k in (1, 2, 3)]
    summary_csv(results, "sc", dirs)
    text = findings(results)
    section = text.split("## training prompts")[1].split("##")[0]
    assert section.startswith(" (2 of 2 comparisons separated)")
    assert "- tiny-xs, β 0.1, masked-sum: 1024 prompts − 256 prompts = +0.4 " in section
    assert "## β (2 of 2 comparisons separated)" in text and "tiny-xs, masked-sum, 1024 prompts: β 0.5 − β 0.1" in text
    table(results, tmp_path / "out")
    assert "task.n_train_prompts" in (tmp_path / "out" / "results_table.md").read_text()
