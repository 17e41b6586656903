"""What a study reports: estimates over fresh seeds with t-intervals (checked against printed
t tables and by hand), degenerate and diverged reruns left out and counted, search spaces that
depend on the cell, best parameters flagged at a range edge, and findings that say
"inconclusive" where the intervals overlap."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from analysis.findings import comparisons, sentence
from harness import stats
from harness.config import ConfigError, ParamSpec
from harness.evaluation import degenerate
from harness.sweep import load_experiment
from harness.sweep.estimate import estimate as _estimate


@pytest.mark.parametrize("df,t", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                  (29, 2.045), (200, 1.972)])
def test_t_quantiles_match_the_printed_table(df, t):
    assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)


def test_estimate_and_welch_by_hand():
    e = stats.estimate([1.0, 2.0, 6.0])  # mean 3, sd sqrt(7), half-width t(.975, 2) sd / sqrt(3)
    half = 4.3027 * math.sqrt(7) / math.sqrt(3)
    assert (e.n, e.mean, e.median) == (3, 3.0, 2.0) and e.sd == pytest.approx(math.sqrt(7))
    assert (e.low, e.high) == pytest.approx((3 - half, 3 + half), abs=1e-3)
    assert stats.estimate([0.4]).low is None  # one value: no interval
    # Welch: a = [1, 2, 3], b = [4, 5, 6]: diff -3, se sqrt(1/3 + 1/3), df 4, t(.975, 4) = 2.7764
    d = stats.welch([1, 2, 3], [4, 5, 6])
    half = 2.7764 * math.sqrt(2 / 3)
    assert d.df == pytest.approx(4.0) and (d.low, d.high) == pytest.approx((-3 - half, -3 + half), abs=1e-3)
    assert d.separated
    assert not stats.welch([1, 2, 3], [1.5, 2.5, 3.5]).separated
    assert stats.welch([1.0], [2.0, 3.0]) is None


def _t_cdf(x: float, df: float, steps: int = 20_000) -> float:
    """Student's t CDF by Simpson's rule on its density (independent of harness.stats)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = x / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_welch_with_unequal_variances_and_sizes_by_hand():
    """a = [1, 2, 6] (n 3, variance 7), b = [2, 4, 4, 6] (n 4, variance 8/3): diff −1, squared
    standard errors 7/3 and 2/3 (se √3), Welch–Satterthwaite df = 3² / ((7/3)²/2 + (2/3)²/3)
    = 9 / (49/18 + 4/27) = 3.1355 (not the pooled 5), and the half-width's t quantile is the one
    whose CDF at that fractional df is 0.975."""
    d = stats.welch([1, 2, 6], [2, 4, 4, 6])
    df = 9 / (49 / 18 + 4 / 27)
    assert d.diff == pytest.approx(-1.0) and d.df == pytest.approx(df, rel=1e-9)
    half = (d.high - d.low) / 2
    assert d.low + half == pytest.approx(-1.0)
    assert _t_cdf(half / math.sqrt(3), df) == pytest.approx(0.975, abs=2e-4)
    assert not d.separated
    swapped = stats.welch([2, 4, 4, 6], [1, 2, 6])  # the order flips the sign only
    assert (swapped.diff, swapped.low, swapped.high, swapped.df) == pytest.approx(
        (1.0, -d.high, -d.low, d.df))


def trial(value, **attrs):
    return SimpleNamespace(value=value, user_attrs={"run_dir": f"/r/{value}", **attrs})


def test_a_cell_is_estimated_from_fresh_reruns_without_degenerate_ones():
    best = trial(0.9)  # the search trial that picked the parameters: never counted
    done = [trial(0.5), trial(0.6), trial(0.7), trial(-80.0, degenerate=True)]
    out = _estimate(best, done, seeds=5)
    assert (out["estimate_from"], out["estimate_n"]) == ("seed reruns", 3)
    assert out["objective_mean"] == pytest.approx(0.6) and out["objective_median"] == 0.6
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert (out["objective_ci_low"], out["objective_ci_high"]) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-4)
    assert out["run_dirs"] == "/r/0.5;/r/0.6;/r/0.7"
    # Without reruns a study reports its search trial and says so.
    assert _estimate(best, [], seeds=1)["estimate_from"] == "search trial"
    assert "objective_mean" not in _estimate(best, [], seeds=3)
    # One trial per cell picked nothing: it counts as a seed beside the reruns (unless degenerate).
    alone = _estimate(trial(0.4), done, seeds=5, selected=False)
    assert alone["estimate_n"] == 4 and alone["objective_mean"] == pytest.approx(0.55)
    assert alone["run_dirs"] == "/r/0.4;/r/0.5;/r/0.6;/r/0.7"
    assert _estimate(trial(0.4, degenerate=True), done, seeds=5, selected=False)["estimate_n"] == 3
    # objective.degenerate: count averages a degenerate rerun in (its score reads its own path).
    kept = _estimate(best, [trial(0.5), trial(0.6), trial(0.1, degenerate=True)], seeds=4,
                     keep_degenerate=True)
    assert kept["estimate_n"] == 3 and kept["objective_mean"] == pytest.approx(0.4)
    assert kept["run_dirs"] == "/r/0.5;/r/0.6;/r/0.1"


def test_degenerate_is_a_kl_past_the_ceiling_or_samples_that_stop_parsing():
    def flag(kl=None, parsed=None, ceiling=20.0, floor=0.5):
        last = {k: v for k, v in (("gen/kl", kl), ("gen/parsed", parsed)) if v is not None}
        return degenerate(last, ceiling, floor)

    assert flag(25.0) == {"degenerate": True, "degenerate_reason": "gen/kl 25 > 20 nats"}
    assert flag(3.4, 0.9) == {"degenerate": False, "degenerate_reason": None}
    assert flag(math.inf)["degenerate"] and flag(math.nan)["degenerate"]
    assert flag(3.4, 0.2) == {"degenerate": True, "degenerate_reason": "gen/parsed 0.20 < 0.5"}
    assert flag(30.0, 0.2)["degenerate_reason"] == "gen/kl 30 > 20 nats; gen/parsed 0.20 < 0.5"
    assert flag() == {"degenerate": None} and flag(80.0, ceiling=None) == {"degenerate": None}
    assert flag(80.0, 0.1, ceiling=None, floor=None) == {"degenerate": None}


def test_parsing_tells_the_language_from_drift():
    from harness.tasks.controlled import parses, reward

    x = "review : the plot was dull ."
    assert parses(x, " the plot was not very clever but the music was superb .")
    assert parses(x, " the cast was long .")  # neutral, still the language
    for drifted in (" the plot was", " the plot was superb superb .", " superb superb superb .",
                    " the plot was great and .", "", " .", " the plot was great"):
        assert not parses(x, drifted), drifted
    # The reward scores unparseable text 0, so a mostly drifted sample can still score above 0:
    # the parse check sees what the reward hides.
    assert reward(x, " the plot was superb and superb superb .") > 0
    assert not parses(x, " the plot was superb and superb superb .")


def test_best_parameters_at_a_range_edge_are_flagged():
    lr = ParamSpec(type="log_float", low=1e-5, high=1e-3)
    assert lr.at_edge(1.1e-5) == "low" and lr.at_edge(9.5e-4) == "high" and lr.at_edge(1e-4) is None
    assert ParamSpec(type="int", low=0, high=20).at_edge(19.5) == "high"
    assert ParamSpec(type="categorical", choices=[1, 2]).at_edge(1) is None


def write(tmp_path, seed_data, sweep):
    raw = {"name": "t", "data": {"source": str(seed_data), "limit": 100},
           "model": {"name": "tiny-xs"}, "sweep": sweep}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


SEARCH = {"train.lr": {"type": "log_float", "low": 1e-5, "high": 1e-4}}


def test_search_ranges_can_depend_on_the_cell(tmp_path, seed_data):
    mean_lr = {"type": "log_float", "low": 1e-3, "high": 3e-2}
    sweep = {"grid": {"dpo.beta": [0.1, 0.5], "masking": ["masked-sum", "masked-mean"]},
             "search": SEARCH, "search_by": {"masking": {"masked-mean": {"train.lr": mean_lr}}}}
    exp = load_experiment(write(tmp_path, seed_data, sweep))
    spaces = {c.id: exp.space(c)["train.lr"] for c in exp.cells}
    assert spaces["beta=0.5,masking=masked-mean"].low == 1e-3
    assert spaces["beta=0.5,masking=masked-sum"].low == 1e-5
    assert exp.spec.search["train.lr"].low == 1e-5  # the shared range is left as it was


def test_search_ranges_can_depend_on_a_combination_of_axes(tmp_path, seed_data):
    """A search_by key of several axes joined by commas takes their values joined the same way;
    it wins over a single-axis key listed before it, and other combinations keep that one's."""
    grid = {"model.name": ["tiny-xs", "tiny-s"], "masking": ["masked-sum", "masked-mean"]}
    wide = {"type": "log_float", "low": 1e-3, "high": 3e-2}
    pair = {"type": "log_float", "low": 2e-4, "high": 4e-4}
    sweep = {"grid": grid, "search": SEARCH, "search_by": {
        "masking": {"masked-mean": {"train.lr": wide}},
        "model.name,masking": {"tiny-s,masked-mean": {"train.lr": pair}}}}
    exp = load_experiment(write(tmp_path, seed_data, sweep))
    lows = {(dict(c.values)["model.name"], dict(c.values)["masking"]): exp.space(c)["train.lr"].low
            for c in exp.cells}
    assert lows == {("tiny-xs", "masked-sum"): 1e-5, ("tiny-xs", "masked-mean"): 1e-3,
                    ("tiny-s", "masked-sum"): 1e-5, ("tiny-s", "masked-mean"): 2e-4}
    for by, needle in [
        ({"model.name,beta": {"tiny-s,0.1": {"train.lr": pair}}}, "sweep.search_by.model.name,beta: "
                                                                  "beta is not a grid axis"),
        ({"model.name,masking": {"tiny-s": {"train.lr": pair}}}, "needs one value per axis"),
        ({"model.name,masking": {"tiny-m,masked-sum": {"train.lr": pair}}},
         "'tiny-m' is not a value of the grid axis model.name"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_experiment(write(tmp_path, seed_data, {**sweep, "search_by": by}))


@pytest.mark.parametrize("search_by,needle", [
    ({"model.name": {"tiny-s": {"train.lr": SEARCH["train.lr"]}}}, "sweep.search_by.model.name: not a grid axis"),
    ({"masking": {"full-sum": {"train.lr": SEARCH["train.lr"]}}}, "sweep.search_by.masking.full-sum: not a value"),
    ({"masking": {"masked-sum": {"train.warmup_steps": {"type": "int", "low": 0, "high": 5}}}},
     "only parameters of sweep.search"),
    ({"masking": {"masked-sum": {"train.lr": {"type": "log_float", "low": 0, "high": 1}}}},
     "sweep.search_by"),
])
def test_search_by_mistakes_name_the_field(tmp_path, seed_data, search_by, needle):
    sweep = {"grid": {"masking": ["masked-sum", "masked-mean"]}, "search": SEARCH, "search_by": search_by}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_experiment(write(tmp_path, seed_data, sweep))


def test_findings_say_inconclusive_where_intervals_overlap():
    rows = []
    for beta, values in ((0.1, [0.50, 0.52, 0.48]), (0.5, [0.70, 0.71, 0.69]), (1.0, [0.6, 0.9, 0.5])):
        rows += [{"dpo.beta": beta, "model.name": "tiny-s", "masking": "masked-sum",
                  "n_params": 1e6, "objective": v} for v in values]
    found = comparisons(pd.DataFrame(rows))
    assert [(c["axis"], c["a"], c["b"]) for c in found] == [("β", "β 0.5", "β 0.1"), ("β", "β 1", "β 0.5")]
    first, second = (sentence(c, "maximize") for c in found)
    assert first.endswith("β 0.5 is better") and "+0.2" in first
    assert second.endswith("not separated (inconclusive)")
    assert sentence(found[0], "minimize").endswith("β 0.1 is better")
