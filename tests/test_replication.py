"""Answers that replicate: independent searches per cell (the estimate's unit), the folding of
their summary rows, and replication.md's verdicts per cell and per finding."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import replication
from analysis.load import fold_searches, load_study_summaries
from harness import stats
from harness.config import ConfigError, load_experiment
from harness.rundir import split_search
from harness.sweep.replicate import SAMPLER_STRIDE, SEED_STRIDE, replica_experiment
from tests.test_analysis import _write_study


def _experiment(tmp_path, **sweep) -> object:
    raw = {"name": "r", "task": {"name": "controlled"}, "train": {"seed": 7},
           "sweep": {"grid": {"dpo.beta": [0.1, 0.5]}, "trials": 2, "seeds": 2,
                     "search": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-3}},
                     "objective": {"metric": "gen/reward_at_kl"}, **sweep}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_independent_searches_are_cells_of_their_own_with_seeds_apart(tmp_path):
    """searches: 3 makes each grid cell three cells `<cell>,search=<r>`, whose runs train on seeds
    1,000 apart (the sampler seeds differ through the cell's name); the label splits back."""
    exp = load_experiment(_experiment(tmp_path, searches=3))
    assert [c.id for c in exp.cells[:3]] == ["beta=0.1,search=0", "beta=0.1,search=1", "beta=0.1,search=2"]
    seeds = [exp.run_config(c, {"train.lr": 1e-4}, 1, "x", []).train.seed for c in exp.cells[:3]]
    assert seeds == [8, 1008, 2008]
    assert split_search("beta=0.1,search=2") == ("beta=0.1", 2)
    assert split_search("beta=0.1") == ("beta=0.1", None) and split_search(None) == (None, None)
    assert split_search("search=1") == ("all", 1)  # no grid axes: the cell is "all"
    assert [c.id for c in load_experiment(_experiment(tmp_path)).cells] == ["beta=0.1", "beta=0.5"]


def test_several_searches_need_exactly_one_rerun_each(tmp_path):
    """Reruns of one search's pick share its learning rate: with searches > 1 the unit of the
    estimate is the search, so seeds must be 2 (one fresh rerun), and the error says so."""
    with pytest.raises(ConfigError, match="searches: 3 needs seeds: 2"):
        load_experiment(_experiment(tmp_path, searches=3, seeds=4))


def test_summary_rows_of_a_cells_searches_fold_into_one():
    df = pd.DataFrame({"study": ["s"] * 3, "cell": ["b=1,search=0", "b=1,search=1", "b=2"],
                       "search": [0, 1, None], "status": ["done", "done", "done"],
                       "seeds_degenerate": [1, 0, 0], "param/train.lr": [1e-4, 3e-4, 2e-4],
                       "at_edge": ["", "train.lr=high", ""], "run_dirs": ["x/1", "x/2", "y"]})
    folded = fold_searches(df).set_index("cell")
    assert list(folded.index) == ["b=1", "b=2"] and "search" not in folded
    one = folded.loc["b=1"]
    assert (one["searches"], one["seeds_degenerate"], one["status"]) == (2, 1, "done")
    assert one["param/train.lr"] == "0.0001; 0.0003" and one["at_edge"] == "train.lr=high"
    assert one["run_dirs"] == "x/1;x/2"


def test_replica_b_draws_other_seeds_and_keeps_the_rest(tmp_path):
    path = _experiment(tmp_path)
    out, study = replica_experiment(path, 1, tmp_path / "rep")
    raw = yaml.safe_load(out.read_text())
    assert study == "r-b" and raw["sweep"]["study"] == "r-b"
    assert raw["train"]["seed"] == 7 + SEED_STRIDE and raw["sweep"]["sampler_seed"] == SAMPLER_STRIDE
    assert raw["sweep"]["grid"] == {"dpo.beta": [0.1, 0.5]}
    assert load_experiment(out).study == "r-b"
    # the copy lives elsewhere: a relative local data file is named by its absolute path
    (tmp_path / "pairs.json").write_text("[]")
    plain = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**plain, "data": {"source": "pairs.json", "limit": 5}}))
    data = yaml.safe_load(replica_experiment(path, 1, tmp_path / "rep")[0].read_text())["data"]
    assert data == {"source": str((tmp_path / "pairs.json").resolve()), "limit": 5}


def test_verdicts_by_hand():
    """Separated in both the same way: replicates; opposite ways: flips; in one: inconclusive in
    one; in neither: not separated in either."""
    up, down, wide = ({"diff": d, "interval": stats.welch(a, b)} for d, a, b in (
        (0.3, [0.5, 0.51, 0.52], [0.2, 0.21, 0.22]), (-0.3, [0.2, 0.21, 0.22], [0.5, 0.51, 0.52]),
        (0.01, [0.1, 0.5, 0.9], [0.2, 0.4, 0.8])))
    assert replication.verdict(up, up) == "replicates"
    assert replication.verdict(up, down) == "flips"
    assert replication.verdict(up, wide) == "inconclusive in one" == replication.verdict(None, up)
    assert replication.verdict(wide, wide) == "not separated in either"


@pytest.fixture
def two_studies(tmp_path) -> Path:
    """Results of two studies of β 0.1 and 0.5: in `a` β 0.5 is clearly better (0.61 against
    0.31); in `b` clearly worse (0.11): a flip. β 0.1's intervals overlap, β 0.5's do not."""
    results = tmp_path / "results"
    for study, high in (("a", [0.60, 0.61, 0.62]), ("b", [0.10, 0.11, 0.12])):
        (results / study).mkdir(parents=True)
        _write_study(results, study, {
            "beta=0.1": ({}, [(2.0, 0.30), (2.0, 0.31), (2.0, 0.32)], set()),
            "beta=0.5": ({"beta": 0.5}, [(2.0, r) for r in high], set())})
    return results


def test_replication_report_of_two_studies(two_studies):
    results = two_studies
    text = replication.report(results, ["a", "b"], {"a": 12.0}, command="harness replicate x")
    assert "**Cells**: intervals overlap in 1 of 2; apart: tiny-xs, 0.5, masked-sum." in text
    assert "0 replicate (separated in both, the same way), 1 flip" in text
    row = next(s for s in text.splitlines() if s.startswith("| tiny-xs, masked-sum: β 0.5 − β 0.1"))
    assert row.endswith("| flips |") and "+0.3 [" in row and "-0.2 [" in row
    assert "| tiny-xs, 0.1, masked-sum | n 3, 0.31 [" in text and "`harness replicate x`" in text
    assert "a: 12 s" in text


def test_replication_figure_draws_both_replicas(two_studies, tmp_path, monkeypatch):
    """replication.png: per replica one series of points at each cell's mean, in cell order."""
    from analysis import style

    results = two_studies
    figs = []
    real = style.save
    monkeypatch.setattr(style, "save", lambda fig, out, name: figs.append(fig) or real(fig, out, name))
    out = replication.write_report(results, ["a", "b"], tmp_path / "rep" / "replication.md")
    assert out.read_text().endswith("![the cells in both replicas](replication.png)\n")
    assert (tmp_path / "rep" / "replication.png").exists()
    (ax,) = figs[0].axes
    means = [[round(float(x), 6) for x in c.lines[0].get_xdata()] for c in ax.containers]
    assert means == [[0.31, 0.61], [0.31, 0.11]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


def test_folded_summaries_are_what_analysis_reads(tmp_path):
    """A study whose summary.csv has a `search` column is read one row per cell."""
    (tmp_path / "s").mkdir()
    pd.DataFrame({"cell": ["b=1,search=0", "b=1,search=1"], "search": [0, 1],
                  "status": ["done", "incomplete"]}).to_csv(tmp_path / "s" / "summary.csv", index=False)
    cells = load_study_summaries(tmp_path)
    assert list(cells["cell"]) == ["b=1"] and cells["status"].iloc[0] == "done, incomplete"


@pytest.mark.slow
def test_harness_replicate_end_to_end(tmp_path):
    """`harness replicate` from outside the repository (the console script, as `make replicate`
    runs it): two studies of a tiny controlled experiment, the second on other seeds, and
    replication.md naming both, with a row per cell and per finding."""
    import os
    import subprocess
    import sys

    from tests import chaos

    study = chaos.write_study(tmp_path / "exp", **{"sweep.seeds": 2, "sweep.trials": 1,
                                                   "gen_eval.parsed_floor": None})
    env = {**os.environ, "DPO_HARNESS_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-m", "harness", "replicate", str(study), "--view", "off",
                          "--results-dir", str(tmp_path / "results")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "results" / "chaos-replication" / "replication.md").read_text()
    assert report.startswith("# Replication: chaos-a and chaos-b")
    assert "| tiny-xs, 0.1, masked-sum | n 2, " in report and "| tiny-xs, 0.5, masked-sum | n 2, " in report
    assert "masked-sum: β 0.5 − β 0.1" in report
    seeds = {json.loads(p.read_text())["train"]["seed"]
             for p in (tmp_path / "results").glob("chaos-*/runs/*/*/config.json")}
    assert seeds == {0, 1, 100_000, 100_001}  # the search trials and reruns of each replica


def test_run_dirs_written_relative_to_another_folder_still_name_their_runs(tmp_path, monkeypatch):
    """A sweep started with a relative results folder records relative run_dirs; analysis run
    from another folder still finds them under RESULTS (from the study folder on)."""
    from analysis.common import _under_results

    results = tmp_path / "clone" / "results"
    monkeypatch.chdir(tmp_path)
    rel = "results/s/runs/b=1/seed1"
    assert _under_results(Path(rel), results, "s") == "s/runs/b=1/seed1"
    assert _under_results(results / "s" / "runs" / "b=1" / "seed1", results, "s") == "s/runs/b=1/seed1"


def _adaptive(tmp_path, **sweep) -> Path:
    raw = yaml.safe_load(_experiment(tmp_path).read_text())
    raw["sweep"].update({"searches": 2, "max_searches": 5, "target_halfwidth": 0.05,
                         "pruner": {"type": "none"}, **sweep})
    path = tmp_path / "adaptive.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("sweep,needle", [
    ({"target_halfwidth": None}, "target_halfwidth and max_searches go together"),
    ({"max_searches": 2}, "max_searches > searches, got searches: 2, max_searches: 2"),
    ({"searches": 1, "seeds": 3}, "need searches >= 2"),
    ({"target_halfwidth": 0}, "target_halfwidth must be > 0"),
])
def test_adaptive_searches_settings_are_checked(tmp_path, sweep, needle):
    with pytest.raises(ConfigError, match=needle):
        load_experiment(_adaptive(tmp_path, **sweep))


# Fresh-rerun values of each search (by beta): beta 0.1's agree, so its 95% half-width falls below
# 0.05 at 3 searches (0.50, 0.51, 0.505: half-width 0.0124; at 2 it is 0.0635); beta 0.5's
# disagree, so it runs to the cap of 5 (half-width 0.50 at 5).
RERUNS = {0.1: [0.50, 0.51, 0.505, 0.9, 0.9], 0.5: [0.1, 0.9, 0.3, 0.7, 0.5]}


def test_adaptive_searches_run_until_the_interval_is_narrow_or_the_cap(tmp_path, monkeypatch):
    """A cell gets one more search while its interval is wider than target_halfwidth: beta 0.1
    stops at 3 searches (its 4th and 5th are `not needed`), beta 0.5 runs all 5; an adaptive
    search begins only once every earlier one of its cell has its rerun; the study continued
    afterwards runs nothing more; analysis counts only the searches that ran."""
    from harness.config.load import SEARCH_SEEDS
    from harness.sweep import estimate
    from harness.sweep.schedule import Sweep
    from harness.sweep.summary import summary_rows

    exp = load_experiment(_adaptive(tmp_path))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep = Sweep(exp, url, tmp_path / "results")
    order, early = [], []

    def fake_run(trial, cfg, run_dir, on_eval, labels, role):
        search, offset = divmod(cfg.train.seed - 7, SEARCH_SEEDS)
        cell = Cell_of(labels["cell"])
        if estimate.is_extra(exp.spec, cell):  # every earlier search of the cell is settled
            rows = estimate.earlier_searches(sweep, cell)
            early.append(rows is None or any(r["status"] != "done" for r in rows))
        order.append((cfg.dpo.beta, search, role))
        value = RERUNS[cfg.dpo.beta][search] if role == "seeds" else 0.2 + cfg.train.lr
        return {"gen/reward_at_kl": value, "precision": sweep.precision}

    cells = {c.id: c for c in exp.cells}

    def Cell_of(cell_id):  # noqa: N802
        return cells[cell_id]

    monkeypatch.setattr("harness.sweep.schedule.run_trial", fake_run)
    sweep.work()
    assert early and not any(early)  # no adaptive search began before the earlier ones settled
    rows = {r["cell"]: r for r in summary_rows(sweep)}
    status = {cid: r["status"] for cid, r in rows.items()}
    assert [status[f"beta=0.1,search={r}"] for r in range(5)] == ["done"] * 3 + ["not needed"] * 2
    assert [status[f"beta=0.5,search={r}"] for r in range(5)] == ["done"] * 5
    assert [rows[f"beta=0.5,search={r}"]["objective_mean"] for r in range(5)] == RERUNS[0.5]
    assert sum(1 for b, _, role in order if b == 0.1 and role == "seeds") == 3
    assert len(order) == (3 + 5) * 3  # 2 search trials + 1 rerun per search that ran
    assert Sweep(exp, url, tmp_path / "results").work() == 0  # continued: nothing left to run

    df = pd.DataFrame([{**r, "study": "r"} for r in rows.values()])
    folded = fold_searches(df).set_index("cell")
    assert folded.loc["beta=0.1", "searches"] == 3 and folded.loc["beta=0.5", "searches"] == 5
    assert folded.loc["beta=0.1", "status"] == "done"


def test_lr_scan_finds_each_cells_peak_and_a_range_per_group():
    """Runs scoring 0.3 − (log10 lr − log10 peak)² around peaks 1e-4 and 4e-4 (tiny-s, two betas
    each) give those peaks back and a range a factor 4 wide around their geometric mean, as a
    search_by block that loads; a cell whose scores curve up has no peak and is named."""
    from analysis import lr_scan

    rows = []
    for cell, size, peak in (("a1", "tiny-s", 1e-4), ("a2", "tiny-s", 4e-4), ("b1", "tiny-xs", None)):
        for lr in np.logspace(-5, -2.5, 7):
            score = 0.3 - (math.log10(lr) - math.log10(peak)) ** 2 if peak else (math.log10(lr) + 4) ** 2
            rows.append({"cell": cell, "model.name": size, "masking": "masked-sum",
                         "train.lr": lr, "gen/reward_at_kl": score})
    rows.append({**rows[0], "gen/reward_at_kl": float("nan")})  # a run without a score: left out
    cells = lr_scan.scan(pd.DataFrame(rows), ["model.name", "masking"]).set_index("cell")
    assert cells.loc["a1", "peak"] == pytest.approx(1e-4) and cells.loc["a2", "peak"] == pytest.approx(4e-4)
    assert cells.loc["a1", "at_peak"] == pytest.approx(0.3) and cells.loc["a1", "runs"] == 7
    assert pd.isna(cells.loc["b1", "peak"]) and "curves up" in cells.loc["b1", "why"]
    groups = lr_scan.ranges(cells.reset_index(), ["model.name", "masking"], width=4.0)
    text = lr_scan.report(cells.reset_index(), groups, ["model.name", "masking"], 4.0, "gen/reward_at_kl")
    block = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    got = block["search_by"]["model.name,masking"]["tiny-s,masked-sum"]["train.lr"]
    assert (got["low"], got["high"]) == (pytest.approx(1e-4, rel=0.01), pytest.approx(4e-4, rel=0.01))
    assert "# tiny-xs,masked-sum: no cell with an interior peak" in text
    with pytest.raises(ValueError, match="no masking"):
        lr_scan.scan(pd.DataFrame(rows).drop(columns=["masking"]), ["model.name", "masking"])


def test_lr_scan_holds_a_range_below_the_largest_stable_rate():
    """Runs at 10^-4.0 .. 10^-3.7 are stable, 1 of 4 degenerate at 10^-3.6 (a share of 0.25 > 0.2):
    the largest stable rate is 10^-3.6; a range around a peak at 2e-4 (factor 5: up to 4.5e-4) is
    cut there, and a group without a peak spans a factor sqrt(5) below it."""
    from analysis import lr_scan

    lr = pd.Series([10 ** e for e in (-4.0, -4.0, -4.0, -3.8, -3.8, -3.8, -3.58, -3.58, -3.58, -3.58)])
    degenerate = pd.Series([False] * 6 + [True, False, False, False])
    assert lr_scan.stable_limit(lr, degenerate) == pytest.approx(10 ** -3.6)
    assert lr_scan.stable_limit(lr, degenerate, max_share=0.3) is None
    cells = pd.DataFrame({"model.name": ["s", "xs"], "cell": ["a", "b"], "peak": [2e-4, float("nan")]})
    limits = {"s": 10 ** -3.6, "xs": 1e-4}
    (s, xs) = lr_scan.ranges(cells, ["model.name"], 5.0, limits)
    assert (s["low"], s["high"]) == (pytest.approx(2e-4 / 5 ** 0.5), pytest.approx(10 ** -3.6))
    assert (xs["low"], xs["high"]) == (pytest.approx(1e-4 / 5 ** 0.5), 1e-4) and "centre" not in xs
