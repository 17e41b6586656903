"""analysis/: the loader's frames against the run files of a small real sweep (journal storage),
labels read from the run files and nothing else, every figure drawn (Optuna's from the storage the
sweep recorded), the results table checked by hand, byte-identical outputs across processes, and
plain messages for missing data."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import fig_optuna, style, table
from analysis.load import LABELS, load_curves, load_finals, load_study_summaries, load_wandb
from analysis.style import MissingData
from harness import metrics
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def results(tmp_path_factory, seed_data):
    """A real sweep: 2 betas x 2 maskings on tiny-xs, 2 trials, 2 seed reruns, its Optuna studies in a
    journal file (about 15 s). One torch thread (tiny models on a busy machine run several times
    slower with more) and no wandb (analysis reads the run files; load_wandb has its own test)."""
    import torch

    from harness.sweep import run_sweep

    root = tmp_path_factory.mktemp("analysis")
    raw = {
        "name": "a",
        "data": {"source": str(seed_data), "limit": 100, "max_length": 128},
        "model": {"name": "tiny-xs"},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 8, "eval_batches": 1,
                  "save_model": False, "lr": 1e-3, "num_threads": 1},
        "tracking": {"results_dir": str(root / "results"), "progress": False},
        "sweep": {"grid": {"dpo.beta": [0.1, 0.5], "masking": ["masked-mean", "full-sum"]},
                  "trials": 2, "seeds": 3,
                  "search": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 3e-3}}},
    }
    (root / "exp.yaml").write_text(yaml.safe_dump(raw))
    (root / "results" / "a").mkdir(parents=True)
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WANDB_MODE", "disabled")
            run_sweep(root / "exp.yaml", storage=str(root / "results" / "a" / "journal.log"))
    finally:
        torch.set_num_threads(threads)  # the runs set it for the whole test process
    return root / "results"


@pytest.fixture(scope="module")
def drawn(results, tmp_path_factory):
    """`python -m analysis.figures RESULTS OUT` run twice, in two processes at once (different hash
    seeds), into two folders: ([out1, out2], [stdout1, stdout2])."""
    root = tmp_path_factory.mktemp("figures")
    outs = [root / "first", root / "second"]
    procs = [subprocess.Popen([sys.executable, "-m", "analysis.figures", str(results), str(out)],
                              cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, out in enumerate(outs, start=1)]
    done = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, done, strict=True):
        assert p.returncode == 0, err
    return outs, [stdout for stdout, _ in done]


def _runs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.rglob("summary.json"))


def _same(value, label) -> bool:
    """A frame cell equals a label (a None label may read back as NaN)."""
    if label is None:
        return value is None or (isinstance(value, float) and math.isnan(value))
    return value == label


def test_frames_match_the_run_files(results):
    """Curves: one row per logged line of every metrics.jsonl; finals: one row per run; values
    and config columns as in the files."""
    curves, finals = load_curves(results), load_finals(results)
    runs = _runs(results)
    n_lines = sum(len((r / "metrics.jsonl").read_text().splitlines()) for r in runs)
    assert len(curves) == n_lines and len(finals) == len(runs) == 4 * (2 + 2)
    for col in ("run", "step", "examples_seen", "dpo.beta", *LABELS, "train/loss",
                "eval/rewards/accuracies"):
        assert col in curves, col
    assert not any(c.startswith("labels.") for c in curves)  # labels are columns of their own
    one = runs[0]
    rel = str(one.relative_to(results))
    summary = json.loads((one / "summary.json").read_text())
    config = json.loads((one / "config.json").read_text())
    row = finals[finals["run"] == rel].iloc[0]
    assert row["eval/loss"] == pytest.approx(summary["eval/loss"])
    assert row["dpo.beta"] == config["dpo"]["beta"]
    first = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])
    c = curves[(curves["run"] == rel) & (curves["step"] == first["step"])]
    assert c["examples_seen"].iloc[0] == first["examples_seen"]
    assert len(load_study_summaries(results)) == 4


def test_labels_are_the_run_files_labels(results):
    """Every run's config.json has a labels block with all seven labels and summary.json repeats
    them; for every run, the finals row and every curves row carry exactly those values. The
    sweep's labels are what it ran: study `a`, the four cells of summary.csv, both roles, both
    maskings, the journal storage."""
    curves, finals = load_curves(results), load_finals(results)
    runs = _runs(results)
    assert len(runs) == 16
    for rd in runs:
        config = json.loads((rd / "config.json").read_text())
        summary = json.loads((rd / "summary.json").read_text())
        assert isinstance(config.get("labels"), dict), f"{rd}: config.json has no labels block"
        labels = config["labels"]
        assert set(LABELS) <= set(labels), f"{rd}: labels lack {set(LABELS) - set(labels)}"
        for k in LABELS:
            assert summary[k] == labels[k], (rd, k)
        rel = str(rd.relative_to(results))
        row = finals[finals["run"] == rel]
        rows = curves[curves["run"] == rel]
        assert len(row) == 1 and len(rows) > 0
        for k in LABELS:
            assert _same(row[k].iloc[0], labels[k]), (rel, k, row[k].iloc[0], labels[k])
            assert all(_same(v, labels[k]) for v in rows[k]), (rel, k)
    assert set(finals["study"]) == {"a"}
    assert set(finals["cell"]) == set(pd.read_csv(results / "a" / "summary.csv")["cell"])
    assert set(finals["role"]) == {"search", "seeds"}
    assert set(finals["masking"]) == {"masked-mean", "full-sum"}
    assert set(finals["storage"]) == {str(results / "a" / "journal.log")}


def test_labels_come_only_from_the_labels_block(results, tmp_path, capsys):
    """The labels are read, never derived: a run whose labels disagree with its name, directory
    and dpo settings loads with its labels; a run without labels (an older harness) loads with None
    labels and its config columns intact, and each load prints one warning with the count."""
    old, new = _runs(results)[:2]
    for src, name in ((old, "old"), (new, "new")):
        (tmp_path / name).mkdir()
        for f in ("config.json", "metrics.jsonl", "summary.json"):
            shutil.copy(src / f, tmp_path / name / f)
    config = json.loads((new / "config.json").read_text())
    odd = {"study": "elsewhere", "cell": "c", "trial": 99, "role": "seeds", "seed": 7,
           "masking": "full-mean" if config["labels"]["masking"] != "full-mean" else "masked-sum",
           "storage": "postgresql://host/db"}
    for f in ("config.json", "summary.json"):
        data = json.loads((tmp_path / "new" / f).read_text())
        data.update({"labels": odd} if f == "config.json" else odd)
        (tmp_path / "new" / f).write_text(json.dumps(data))
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["labels"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    (tmp_path / "old" / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                              if k not in LABELS}))
    capsys.readouterr()
    finals = load_finals(tmp_path).set_index("run")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "no labels" in line]
    assert len(warnings) == 1 and "1 of 2 runs" in warnings[0]
    assert all(_same(finals.loc["new", k], odd[k]) for k in LABELS)
    assert all(_same(finals.loc["old", k], None) for k in LABELS)
    assert finals.loc["old", "dpo.beta"] == config["dpo"]["beta"]
    curves = load_curves(tmp_path)
    assert sum("no labels" in line for line in capsys.readouterr().out.splitlines()) == 1
    assert all(_same(v, odd[k]) for k in LABELS for v in curves[curves["run"] == "new"][k])


def test_every_figure_is_drawn(drawn, results):
    """`make figures` draws every figure that has data (an Optuna history per cell included); the
    missing ones say why, none crash."""
    (out, _), (stdout, _) = drawn
    names = {p.name for p in out.iterdir()}
    for prefix in ("notebook_a", "curves_tiny-xs", "heatmap_beta_masking", "results_table"):
        assert any(n.startswith(prefix) for n in names), prefix
    for cell in pd.read_csv(results / "a" / "summary.csv")["cell"]:
        assert f"optuna_history_a_{cell}.png" in names, cell
    assert all((out / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    assert "model size: skipped" in stdout and "frontier: skipped" in stdout


def test_optuna_figures_from_the_journal_storage(results, tmp_path, monkeypatch):
    """The sweep kept its studies in a journal file (no optuna.db anywhere): the Optuna figures
    come from the storage its runs' labels name. Each cell's history plots exactly that cell's
    finished search runs (x = their `trial` labels, y = their objective from summary.json), and
    reading the storage changes no file under the results."""
    assert not list(results.rglob("optuna.db")) and (results / "a" / "journal.log").exists()
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    points = {}

    def keep_points(fig, out, name):
        points[name] = sorted(map(tuple, fig.axes[0].collections[0].get_offsets().tolist()))
        return style.save(fig, out, name)

    monkeypatch.setattr(fig_optuna, "save", keep_points)
    fig_optuna.draw(results, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before
    finals = load_finals(results)
    objective = str(load_study_summaries(results)["objective"].iloc[0])
    cells = sorted(pd.read_csv(results / "a" / "summary.csv")["cell"])
    assert sorted(points) == [f"optuna_history_a_{c}" for c in cells]
    for cell in cells:
        search = finals[(finals["cell"] == cell) & (finals["role"] == "search")]
        expected = sorted(zip(search["trial"].astype(float), search[objective].astype(float), strict=True))
        drawn_points = points[f"optuna_history_a_{cell}"]
        assert [x for x, _ in drawn_points] == [x for x, _ in expected], cell
        assert [y for _, y in drawn_points] == pytest.approx([y for _, y in expected]), cell


def test_optuna_storage_from_the_labels(results, tmp_path, monkeypatch):
    """Which storage is opened: a server URL (PostgreSQL) as the labels give it, without heartbeat
    and with its password kept out of messages; results copied elsewhere, whose journal is missing
    at its recorded path, use the one under results/<study>/ of the same name; a storage found
    nowhere is said to be missing and nothing is created in its place."""
    from harness.sweep import storage as hstorage

    moved = tmp_path / "moved"
    shutil.copytree(results, moved, ignore=shutil.ignore_patterns("wandb"))

    def relabel(url: str) -> None:
        for config in moved.rglob("config.json"):
            data = json.loads(config.read_text())
            data["labels"]["storage"] = url
            config.write_text(json.dumps(data))

    server = "postgresql://user:secret@db.example/optuna"
    relabel(server)
    opened, real_open = [], hstorage.open_storage

    def fake_open(url, heartbeat=True):  # the server holds the sweep's studies
        opened.append((url, heartbeat))
        return real_open(str(results / "a" / "journal.log"), heartbeat=False)

    monkeypatch.setattr(hstorage, "open_storage", fake_open)
    paths = fig_optuna.draw(moved, tmp_path / "figs")
    assert opened == [(server, False)]
    assert sum(p.name.startswith("optuna_history_a_") for p in paths) == 2 * 4  # PNG + PDF per cell

    def server_down(url, heartbeat=True):
        raise ConnectionError(f"cannot reach {url.split('@')[-1]}")

    monkeypatch.setattr(hstorage, "open_storage", server_down)
    with pytest.raises(RuntimeError, match="cannot reach") as err:
        fig_optuna.draw(moved, tmp_path / "figs")
    assert "user:***@db.example" in str(err.value) and "secret" not in str(err.value)
    monkeypatch.undo()

    gone = tmp_path / "elsewhere" / "a" / "journal.log"
    relabel(str(gone))
    found, missing = fig_optuna.storages(moved)
    assert found == {str((moved / "a" / "journal.log").resolve()): {"a"}} and not missing
    (moved / "a" / "journal.log").unlink()
    with pytest.raises(MissingData, match="not found"):
        fig_optuna.draw(moved, tmp_path / "figs")
    assert not gone.exists() and not (moved / "a" / "journal.log").exists()


def test_optuna_db_of_studies_without_labels(tmp_path):
    """Results of an older harness (no labels): results/<study>/optuna.db is read, only for the
    studies named by its folder."""
    import optuna

    db = tmp_path / "old" / "optuna.db"
    db.parent.mkdir()
    for name in ("old/beta=0.1", "other/beta=0.1"):
        study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert fig_optuna.storages(tmp_path) == ({f"sqlite:///{db.resolve()}": {"old"}}, [])
    names = {p.name for p in fig_optuna.draw(tmp_path, tmp_path / "figs")}
    assert names == {"optuna_history_old_beta=0.1.png", "optuna_history_old_beta=0.1.pdf"}


def test_results_table_by_hand(results):
    """Each cell's n, mean, sd and 95% t-interval equal those computed here from the summary.json
    of its fresh seed reruns (the search trial is not among them), and equal the sweep's own."""
    df = table.results_table(results)
    cells = pd.read_csv(results / "a" / "summary.csv")
    for _, cell in cells.iterrows():
        dirs = cell["run_dirs"].split(";")
        assert all(Path(d).name.startswith("seed") for d in dirs)
        values = [json.loads((Path(d) / "summary.json").read_text())["eval/rewards/accuracies"]
                  for d in dirs]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        half = 12.706205 * sd / math.sqrt(2)  # t(0.975, 1 degree of freedom)
        row = df[(df["dpo.beta"] == cell["dpo.beta"]) & (df["masking"] == cell["masking"])].iloc[0]
        assert row["n"] == len(values) == 2
        assert row["objective mean"] == pytest.approx(mean) == cell["objective_mean"]
        assert row["sd"] == pytest.approx(sd)
        assert (row["ci95 low"], row["ci95 high"]) == pytest.approx((mean - half, mean + half), abs=1e-5)
        assert row["ci95 low"] == pytest.approx(cell["objective_ci_low"], abs=1e-9)
        assert row["search trial"] == pytest.approx(cell["search_value"])
        assert row["train.lr"] == pytest.approx(cell["param/train.lr"])


def test_outputs_are_deterministic(drawn):
    """Two processes drawing from the same results (different hash seeds) write the same set of
    files with the same bytes: every PNG, PDF, CSV and Markdown file."""
    (a, b), _ = drawn
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {Path(f).suffix for f in files} == {".png", ".pdf", ".csv", ".md"}
    differ = [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()]
    assert not differ, differ


def test_metric_labels_come_from_the_registry():
    """Figures label a metric as harness.metrics does; the local labels are for other columns."""
    for name in metrics.METRICS:
        assert style.label(name) == metrics.label(name)
    assert style.label("loss") == metrics.PAIR_METRICS["loss"]
    assert not set(style.LABELS) & set(metrics.METRICS)


def test_missing_data_is_said_plainly(tmp_path, results):
    """An empty results folder, or a study without gen/ metrics, gets a plain message."""
    from analysis import fig_frontier, fig_size

    with pytest.raises(MissingData, match="no runs under"):
        fig_frontier.draw(tmp_path / "empty", tmp_path)
    with pytest.raises(MissingData, match="no ground-truth reward|none of"):
        fig_frontier.draw(results, tmp_path)
    with pytest.raises(MissingData, match="at least two model sizes"):
        fig_size.draw(results, tmp_path)
    with pytest.raises(MissingData, match="no Optuna study"):
        fig_optuna.draw(tmp_path / "empty", tmp_path)


def test_wandb_loader_with_the_api_mocked(capsys):
    """load_wandb builds the same frame shape from the wandb API (mocked at the API object), with
    the labels from the run config's `labels` block, whether wandb keeps it nested or flattens it
    to `labels.*` keys; a run without labels gets None and one warning."""
    labels = {"study": "s", "cell": "beta=0.1", "trial": 3, "role": "search", "masking": "masked-mean",
              "seed": 124, "storage": "postgresql://u:p@host/db"}

    class Run:
        summary = {"eval/loss": 0.5, "_runtime": 3}

        def __init__(self, name, config):
            self.name, self.config, self.group = name, config, "s"

        def scan_history(self):
            return [{"_step": 1, "train/loss": 0.69, "examples_seen": 8},
                    {"_step": 2, "train/loss": 0.6, "examples_seen": 16}]

    dpo = {"dpo": {"beta": 0.1, "mask_prompt": False, "reduction": "sum"}}
    runs = [Run("nested", {**dpo, "labels": labels}),
            Run("flat", {**dpo, **{f"labels.{k}": v for k, v in labels.items()}}),
            Run("old", dpo)]

    class Api:
        def runs(self, path, filters=None):
            assert path == "me/proj" and filters == {"group": "s"}
            return runs

    curves, finals = load_wandb("proj", entity="me", group="s", api=Api())
    assert list(curves["step"]) == [1, 2] * 3 and list(curves["train/loss"]) == [0.69, 0.6] * 3
    assert not any(c.startswith("labels") for c in finals)
    finals = finals.set_index("run")
    for name in ("nested", "flat"):
        assert all(finals.loc[name, k] == v for k, v in labels.items()), name
        assert (curves[curves["run"] == name]["masking"] == "masked-mean").all()
    # The old run's config would say full-sum; nothing is derived from it.
    assert all(_same(finals.loc["old", k], None) for k in LABELS)
    assert finals.loc["old", "dpo.beta"] == 0.1 and finals.loc["old", "eval/loss"] == 0.5
    assert "_runtime" not in finals
    out = capsys.readouterr().out
    assert out.count("no labels") == 1 and "1 of 3 runs" in out
