"""analysis/: the loader's frames against the run files of a small real sweep, every figure drawn,
the results table checked by hand, determinism, and plain messages for missing data."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import figures, table
from analysis.load import load_curves, load_finals, load_study_summaries, load_wandb
from analysis.style import MissingData


@pytest.fixture(scope="module")
def results(tmp_path_factory, request):
    """A real sweep: 2 betas x 2 maskings on tiny-xs, 2 trials, 2 seeds (about 30 s)."""
    from tests.conftest import SEED_DATA

    if not SEED_DATA.exists():
        pytest.skip("seed data not found")
    from harness.sweep import run_sweep

    root = tmp_path_factory.mktemp("analysis")
    raw = {
        "name": "a",
        "data": {"source": str(SEED_DATA), "limit": 100, "max_length": 128},
        "model": {"name": "tiny-xs"},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 8, "eval_batches": 1,
                  "save_model": False, "lr": 1e-3},
        "tracking": {"results_dir": str(root / "results"), "progress": False},
        "sweep": {"grid": {"dpo.beta": [0.1, 0.5], "masking": ["masked-mean", "full-sum"]},
                  "trials": 2, "seeds": 2,
                  "search": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 3e-3}}},
    }
    (root / "exp.yaml").write_text(yaml.safe_dump(raw))
    run_sweep(root / "exp.yaml")
    return root / "results"


def _runs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.rglob("summary.json"))


def test_frames_match_the_run_files(results):
    """Curves: one row per logged line of every metrics.jsonl; finals: one row per run; values
    and config columns as in the files."""
    curves, finals = load_curves(results), load_finals(results)
    runs = _runs(results)
    n_lines = sum(len((r / "metrics.jsonl").read_text().splitlines()) for r in runs)
    assert len(curves) == n_lines and len(finals) == len(runs) == 4 * (2 + 1)
    for col in ("run", "step", "examples_seen", "dpo.beta", "masking", "seed", "study", "cell",
                "train/loss", "eval/rewards/accuracies"):
        assert col in curves, col
    one = runs[0]
    rel = str(one.relative_to(results))
    summary = json.loads((one / "summary.json").read_text())
    config = json.loads((one / "config.json").read_text())
    row = finals[finals["run"] == rel].iloc[0]
    assert row["eval/loss"] == pytest.approx(summary["eval/loss"])
    assert row["dpo.beta"] == config["dpo"]["beta"] and row["study"] == "a"
    first = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])
    c = curves[(curves["run"] == rel) & (curves["step"] == first["step"])]
    assert c["examples_seen"].iloc[0] == first["examples_seen"]
    assert set(curves["masking"]) == {"masked-mean", "full-sum"}
    assert len(load_study_summaries(results)) == 4


def test_every_figure_is_drawn(results, tmp_path):
    """`make figures` draws every figure that has data; the missing ones say why, none crash."""
    out = tmp_path / "figs"
    assert figures.main(results, out) == 0
    names = {p.name for p in out.iterdir()}
    for prefix in ("notebook_a", "curves_tiny-xs", "heatmap_beta_masking", "optuna_history_a_",
                   "results_table"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert all((out / n).stat().st_size > 1000 for n in names if n.endswith(".png"))


def test_results_table_by_hand(results, tmp_path):
    """Each cell's mean and sd equal those computed here from the compared runs' summary.json."""
    df = table.results_table(results)
    cells = pd.read_csv(results / "a" / "summary.csv")
    for _, cell in cells.iterrows():
        values = [json.loads((Path(d) / "summary.json").read_text())["eval/rewards/accuracies"]
                  for d in cell["run_dirs"].split(";")]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        row = df[(df["dpo.beta"] == cell["dpo.beta"]) & (df["masking"] == cell["masking"])].iloc[0]
        assert row["eval/rewards/accuracies mean"] == pytest.approx(mean)
        assert row["eval/rewards/accuracies sd"] == pytest.approx(sd)
        assert row["seeds"] == len(values) == 2
        assert row["train.lr"] == pytest.approx(cell["param/train.lr"])


def test_outputs_are_deterministic(results, tmp_path):
    """The same results give byte-identical CSV and identical figure files."""
    a, b = tmp_path / "a", tmp_path / "b"
    table.draw(results, a), table.draw(results, b)
    assert (a / "results_table.csv").read_bytes() == (b / "results_table.csv").read_bytes()
    from analysis import fig_heatmap

    fig_heatmap.draw(results, a), fig_heatmap.draw(results, b)
    assert (a / "heatmap_beta_masking.png").read_bytes() == (b / "heatmap_beta_masking.png").read_bytes()


def test_missing_data_is_said_plainly(tmp_path, results):
    """An empty results folder, or a study without gen/ metrics, gets a plain message."""
    from analysis import fig_frontier, fig_size

    with pytest.raises(MissingData, match="no runs under"):
        fig_frontier.draw(tmp_path / "empty", tmp_path)
    with pytest.raises(MissingData, match="no ground-truth reward|none of"):
        fig_frontier.draw(results, tmp_path)
    with pytest.raises(MissingData, match="at least two model sizes"):
        fig_size.draw(results, tmp_path)


def test_wandb_loader_with_the_api_mocked():
    """load_wandb builds the same frame shape from the wandb API (mocked at the API object)."""

    class Run:
        name, group = "r1", "study"
        config = {"dpo": {"beta": 0.1, "mask_prompt": True, "reduction": "mean"}}
        summary = {"eval/loss": 0.5, "_runtime": 3}

        def scan_history(self):
            return [{"_step": 1, "train/loss": 0.69, "examples_seen": 8},
                    {"_step": 2, "train/loss": 0.6, "examples_seen": 16}]

    class Api:
        def runs(self, path, filters=None):
            assert path == "me/proj" and filters == {"group": "study"}
            return [Run()]

    curves, finals = load_wandb("proj", entity="me", group="study", api=Api())
    assert list(curves["step"]) == [1, 2] and list(curves["train/loss"]) == [0.69, 0.6]
    assert curves["masking"].iloc[0] == "masked-mean" and curves["dpo.beta"].iloc[0] == 0.1
    assert finals.iloc[0]["eval/loss"] == 0.5 and "_runtime" not in finals
