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
from analysis.load import load_curves, load_finals, load_study_summaries, load_wandb
from analysis.style import MissingData
from harness import metrics, stats
from harness.rundir import LABELS
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


def _lines(ax) -> dict[str, list[tuple[float, float]]]:
    """The data lines seaborn drew on an axis (bands are collections, not lines), by legend label
    in drawing order."""
    drawn = [line for line in ax.lines if len(line.get_xdata()) > 1]
    return {str(i): list(zip(map(float, line.get_xdata()), map(float, line.get_ydata()), strict=True))
            for i, line in enumerate(drawn)}


def _means(frame: pd.DataFrame, metric: str) -> list[tuple[float, float]]:
    m = frame.dropna(subset=[metric]).groupby("examples_seen")[metric].mean()
    return [(float(x), float(y)) for x, y in m.items()]


def test_curve_and_notebook_figures_plot_the_compared_runs(results, tmp_path, monkeypatch):
    """What the curve and notebook figures draw, not only that a file exists: the notebook figure's
    lines are the mean over the compared runs of train and validation loss (and margin, notebook
    units) at each examples-seen; the curve figure has one row per metric, one column per masking,
    one line per β, each the mean of that cell's compared runs."""
    from analysis import fig_curves, fig_notebook
    from analysis.common import best_runs, curves_or_fail

    figs = {}

    def keep(fig, out, name):
        figs[name] = fig
        return style.save(fig, out, name)

    monkeypatch.setattr(fig_curves, "save", keep)
    monkeypatch.setattr(fig_notebook, "save", keep)
    fig_curves.draw(results, tmp_path)
    fig_notebook.draw(results, tmp_path)
    compared = best_runs(results, curves_or_fail(results, ["eval/loss"]))
    assert compared["run"].nunique() == 8  # 4 cells x 2 fresh-seed reruns

    loss_ax, margin_ax = figs["notebook_a"].axes[:2]
    for ax, metric in ((loss_ax, "loss"), (margin_ax, "logratios/margins")):
        want = [_means(compared, f"{split}/{metric}") for split in ("train", "eval")]
        got = list(_lines(ax).values())
        assert len(got) == 2, metric
        for g, w in zip(got, want, strict=True):
            assert [x for x, _ in g] == [x for x, _ in w]
            assert [y for _, y in g] == pytest.approx([y for _, y in w], rel=1e-6), metric

    grid = figs["curves_tiny-xs"].axes  # row by row: 3 metrics x 2 maskings
    assert len(grid) == 3 * 2
    titles = sorted(ax.get_title() for ax in grid if ax.get_title())
    assert titles == ["masking: full-sum", "masking: masked-mean"]
    for j, masking in enumerate(["full-sum", "masked-mean"]):
        for i, metric in enumerate(fig_curves.METRICS):
            got = list(_lines(grid[i * 2 + j]).values())
            sub = compared[compared["masking"] == masking]
            want = [_means(sub[sub["dpo.beta"] == b], metric) for b in (0.1, 0.5)]
            assert len(got) == 2, (masking, metric)  # one line per beta
            for g, w in zip(got, want, strict=True):
                assert [y for _, y in g] == pytest.approx([y for _, y in w], rel=1e-6), (masking, metric)


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
    assert style.label("loss") == metrics.PAIR_METRICS["loss"].label
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


# --- Methods on the controlled task: synthetic run files written by hand --------------------------

def _write_run(results: Path, study: str, cell: str, slot: str, *, loss="sigmoid", eps=0.0, beta=0.1,
               masking="masked-sum", path=((0.0, 0.2), (1.0, 0.4)), degenerate=False) -> Path:
    """One run's config.json, metrics.jsonl (an eval point per (gen/kl, gen/reward) of `path`)
    and summary.json, as a sweep's seed rerun of `cell` writes them."""
    rd = results / study / "runs" / cell / slot
    rd.mkdir(parents=True)
    labels = {"study": study, "cell": cell, "trial": 0, "role": "seeds", "masking": masking,
              "seed": int(slot.removeprefix("seed")), "storage": None}
    config = {"model": {"name": "tiny-xs"}, "labels": labels,
              "dpo": {"loss": loss, "label_smoothing": eps, "beta": beta}}
    rows = [{"step": 4 * i, "examples_seen": 16 * i, "gen/kl": kl, "gen/kl_se": 0.1,
             "gen/reward": r, "gen/reward_se": 0.02, "gen/ref_reward": 0.2}
            for i, (kl, r) in enumerate(path)]
    (rd / "config.json").write_text(json.dumps(config))
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {**rows[-1], **labels, "status": "finished", "n_params": 1000, "degenerate": degenerate}
    (rd / "summary.json").write_text(json.dumps(summary))
    return rd


def _write_study(results: Path, study: str, cells: dict) -> Path:
    """Runs of every cell (`{cell: (settings, [final (kl, reward) per seed], degenerate seeds)}`)
    and the study's summary.csv, whose run_dirs name the non-degenerate ones (KL budget 4 nats)."""
    rows = []
    for cell, (settings, finals, bad) in cells.items():
        dirs = [_write_run(results, study, cell, f"seed{k}", path=((0.0, 0.2), final), **settings,
                           degenerate=k in bad) for k, final in enumerate(finals, start=1)]
        rows.append({"cell": cell, "model.name": "tiny-xs", "dpo.beta": settings.get("beta", 0.1),
                     "masking": settings.get("masking", "masked-sum"),
                     "dpo.loss": settings.get("loss", "sigmoid"), "status": "done",
                     "objective": "gen/reward", "direction": "maximize", "kl_budget": 4.0,
                     "kl_penalty": 1.0, "seeds_degenerate": len(bad),
                     "run_dirs": ";".join(str(d) for k, d in enumerate(dirs, start=1) if k not in bad)})
    pd.DataFrame(rows).to_csv(results / study / "summary.csv", index=False)
    return results


def _best_of_n(results: Path, study: str) -> None:
    """best_of_n.csv: N = 1, 4, 16, 64 with the KL bound log N − (N−1)/N."""
    rows = [{"model.name": "tiny-xs", "n": n, "reward": 0.2 + 0.05 * i, "reward_se": 0.01,
             "kl": math.log(n) - (n - 1) / n, "kl_kind": "bound"} for i, n in enumerate((1, 4, 16, 64))]
    (results / study / "baselines").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(results / study / "baselines" / "best_of_n.csv", index=False)


@pytest.fixture
def methods_study(tmp_path):
    """Study `m`: DPO at β 0.1 (3 seeds, KL 2, rewards 0.50/0.52/0.54; a 4th seed degenerate at
    KL 25) and β 0.5 (rewards 0.30/0.31/0.32 at KL 1); IPO at β 0.1 (0.45/0.51/0.57 at KL 2: overlaps
    DPO) and β 0.5 (reward 0.9 but KL 6: 2 nats over budget, objective −1.1); SLiC (hinge) at β 0.1
    (0.20/0.21/0.22 at KL 1.5: clearly below DPO)."""
    cells = {
        "dpo-0.1": ({}, [(2.0, 0.50), (2.0, 0.52), (2.0, 0.54), (25.0, 0.9)], {4}),
        "dpo-0.5": ({"beta": 0.5}, [(1.0, 0.30), (1.0, 0.31), (1.0, 0.32)], set()),
        "ipo-0.1": ({"loss": "ipo"}, [(2.0, 0.45), (2.0, 0.51), (2.0, 0.57)], set()),
        "ipo-0.5": ({"loss": "ipo", "beta": 0.5}, [(6.0, 0.9), (6.0, 0.9), (6.0, 0.9)], set()),
        "hinge-0.1": ({"loss": "hinge"}, [(1.5, 0.20), (1.5, 0.21), (1.5, 0.22)], set()),
    }
    (tmp_path / "results" / "m").mkdir(parents=True)
    return _write_study(tmp_path / "results", "m", cells)


def test_method_names_from_the_config():
    """dpo.loss (and label smoothing) name the method; unknown losses keep their name; a frame
    without dpo.loss is the default loss, DPO."""
    from analysis.methods import add_method, method_of

    assert method_of("sigmoid") == "DPO" and method_of("sigmoid", 0.1) == "cDPO"
    assert method_of("ipo") == "IPO" and method_of("hinge") == "SLiC (hinge)"
    assert method_of("sft") == "Preferred-FT" and method_of("robust", 0.1) == "robust"
    assert method_of(None) == "DPO" and method_of(float("nan")) == "DPO"
    assert list(add_method(pd.DataFrame({"dpo.beta": [0.1]}))["method"]) == ["DPO"]
    frame = pd.DataFrame({"dpo.loss": ["sigmoid", "sigmoid", "apo_zero"], "dpo.label_smoothing": [0, 0.2, 0]})
    assert list(add_method(frame)["method"]) == ["DPO", "cDPO", "apo_zero"]


def test_pareto_front_by_hand():
    """Of A(1, .3) B(2, .5) C(3, .4) D(.5, .1) E(2, .45) F(4, .6): C is dominated by B (more KL,
    less reward), E by B (same KL, less reward); the front is D, A, B, F in KL order."""
    from analysis.methods import pareto_front

    pts = pd.DataFrame({"name": list("ABCDEF"), "gen/kl": [1, 2, 3, 0.5, 2, 4],
                        "gen/reward": [0.3, 0.5, 0.4, 0.1, 0.45, 0.6]})
    assert list(pareto_front(pts)["name"]) == ["D", "A", "B", "F"]
    assert list(pareto_front(pts.iloc[[1, 4]])["name"]) == ["B"]


def test_frontier_with_and_without_best_of_n(methods_study, tmp_path):
    """Without best_of_n.csv the figure is drawn and its legend says the file is missing; with
    it, best-of-N is drawn at each N (labelled N=1..64, KL an upper bound). A file with other
    columns is refused, naming itself."""
    from analysis import fig_frontier

    (f,) = fig_frontier.frontiers(methods_study)
    assert f.baseline is None and "no baselines/best_of_n.csv" in f.baseline_note
    assert {p.name for p in fig_frontier.draw(methods_study, tmp_path / "a")} == {
        "frontier_m_tiny-xs.png", "frontier_m_tiny-xs.pdf"}
    _best_of_n(methods_study, "m")
    (f,) = fig_frontier.frontiers(methods_study)
    assert list(f.baseline["n"]) == [1, 4, 16, 64] and f.baseline_note == "best-of-N (KL: upper bound)"
    ax = fig_frontier.plot(f).axes[0]
    assert sorted(t.get_text() for t in ax.texts if t.get_text().startswith("N=")) == [
        "N=1", "N=16", "N=4", "N=64"]
    assert "best-of-N (KL: upper bound)" in [t.get_text() for t in ax.get_legend().get_texts()]
    csv = methods_study / "m" / "baselines" / "best_of_n.csv"
    pd.read_csv(csv).rename(columns={"kl": "KL"}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="best_of_n.csv: columns .* expected exactly"):
        fig_frontier.frontiers(methods_study)


def test_frontier_draws_degenerate_runs_and_fronts(methods_study):
    """Every seed rerun is drawn, the degenerate one (KL 25, left out of its cell's estimate)
    hollow; each method's front is over cell means without it: DPO's runs through β 0.5 (1, .31)
    and β 0.1 (2, .52); IPO's β 0.1 (2, .51) and β 0.5 (6, .9); SLiC's single cell."""
    from analysis import fig_frontier

    (f,) = fig_frontier.frontiers(methods_study)
    assert len(f.finals) == 16 and list(f.finals.loc[f.finals["flag"] != "", "gen/kl"]) == [25.0]
    fronts = {s: list(zip(g["gen/kl"], g["gen/reward"].round(6), strict=True))
              for s, g in f.fronts.groupby("series")}
    assert fronts == {"DPO": [(0.0, 0.2), (1.0, 0.31), (2.0, 0.52)],
                      "IPO": [(0.0, 0.2), (2.0, 0.51), (6.0, 0.9)],
                      "SLiC (hinge)": [(0.0, 0.2), (1.5, 0.21)]}
    ax = fig_frontier.plot(f).axes[0]
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none"
              and line.get_xdata().size and line.get_marker() != ">"]
    assert [list(line.get_xdata()) for line in hollow] == [[25.0]]
    assert f.reference == pytest.approx(0.2)
    # The axis ends past the unflagged runs (max KL 6) unless every point is within twice that:
    # the degenerate run at 25 nats is then drawn at the edge, and the figure says so.
    assert fig_frontier.kl_limit(f) == pytest.approx(1.15 * 6.0)
    ax = fig_frontier.plot(f).axes[0]
    edge = [line for line in ax.lines if line.get_marker() == ">"]
    assert [list(line.get_xdata()) for line in edge] == [[pytest.approx(6.9)]]
    assert "1 run(s) beyond, KL up to 25 nats" in [t.get_text() for t in ax.texts]


def test_frontier_single_method_keeps_maskings_apart(tmp_path):
    """A DPO-only study over two maskings: one front per masking, drawn in its own line style."""
    from analysis import fig_frontier

    (tmp_path / "r" / "d").mkdir(parents=True)
    results = _write_study(tmp_path / "r", "d", {
        "sum": ({"masking": "masked-sum"}, [(1.0, 0.3), (1.0, 0.3)], set()),
        "mean": ({"masking": "masked-mean"}, [(2.0, 0.2), (2.0, 0.2)], set())})
    (f,) = fig_frontier.frontiers(results)
    assert sorted(set(f.fronts["series"])) == ["DPO · masked-mean", "DPO · masked-sum"]
    styles = {line.get_linestyle() for line in fig_frontier.plot(f).axes[0].lines
              if line.get_linewidth() == 1.6 and line.get_linestyle() != "None"}  # not the caps
    assert styles == {"-", "--"}


def test_methods_in_findings_and_table(methods_study):
    """findings.md: each method's best cell by the objective (IPO's is β 0.1: β 0.5's reward 0.9
    is 2 nats over the KL budget); IPO against DPO overlaps (not separated), SLiC (hinge) is
    clearly below (0.21 − 0.52 = −0.31, DPO better); best-of-N at N=16, whose KL bound 1.84 is the
    closest to DPO's KL 2. The table gains a `method` column, one row per cell."""
    from analysis import findings

    _best_of_n(methods_study, "m")
    text = findings.findings(methods_study)
    assert "## Methods (1 of 2 comparisons with DPO separated)" in text
    assert "- tiny-xs, IPO (β 0.1, masked-sum): 0.51 [" in text
    assert "- tiny-xs, DPO (β 0.1, masked-sum): 0.52 [" in text
    ipo = next(s for s in text.splitlines() if s.startswith("- tiny-xs: IPO − DPO"))
    assert ipo.endswith("not separated (inconclusive)") and "-0.01 [" in ipo
    slic = next(s for s in text.splitlines() if s.startswith("- tiny-xs: SLiC (hinge) − DPO"))
    d = stats.welch([0.20, 0.21, 0.22], [0.50, 0.52, 0.54])
    assert f"-0.31 [{d.low:+.3g}, {d.high:+.3g}]" in slic and slic.endswith("DPO is better")
    assert "best-of-N at N=16 (KL bound 1.84 nats, the closest to DPO's 2)" in text
    assert "gen/reward 0.3 ± 0.01" in text
    df = table.results_table(methods_study)
    assert list(df.columns[:3]) == ["model.name", "method", "dpo.beta"]
    assert list(zip(df["method"], df["dpo.beta"], df["n"], strict=True)) == [
        ("DPO", 0.1, 3), ("DPO", 0.5, 3), ("IPO", 0.1, 3), ("IPO", 0.5, 3), ("SLiC (hinge)", 0.1, 3)]
    assert list(df["degenerate reruns"]) == [1, 0, 0, 0, 0]


def test_per_masking_figures_keep_methods_apart(methods_study, tmp_path):
    """Figures with a column per masking get one per method and masking in a study of several
    methods (never an average over methods); a study of one method keeps its masking names."""
    from analysis import fig_heatmap
    from analysis.common import compared_runs, methods_apart

    runs, _ = compared_runs(methods_study)
    assert set(methods_apart(runs)["masking"]) == {"DPO · masked-sum", "IPO · masked-sum",
                                                   "SLiC (hinge) · masked-sum"}
    assert set(methods_apart(runs[runs["method"] == "DPO"])["masking"]) == {"masked-sum"}
    assert {p.name for p in fig_heatmap.draw(methods_study, tmp_path)} == {
        "heatmap_beta_masking.png", "heatmap_beta_masking.pdf"}


def test_two_studies_are_drawn_apart(tmp_path, capsys):
    """Two studies with the same cell (DPO, tiny-xs, β 0.1, masked-sum): `make figures` draws each
    into its own folder from its own runs, so neither table nor findings pools them (study `d`'s
    seeds score 0.50/0.52/0.54, study `p`'s 0.10/0.11/0.12)."""
    from analysis import figures

    results = tmp_path / "results"
    for study, finals in (("d", [(2.0, 0.50), (2.0, 0.52), (2.0, 0.54)]),
                          ("p", [(1.0, 0.10), (1.0, 0.11), (1.0, 0.12)])):
        (results / study).mkdir(parents=True)
        _write_study(results, study, {"c": ({}, finals, set())})
    assert figures.main(results, tmp_path / "out") == 0
    for study, mean in (("d", 0.52), ("p", 0.11)):
        table = pd.read_csv(tmp_path / "out" / study / "results_table.csv")
        assert len(table) == 1 and table["n"].tolist() == [3], table
        assert table["objective mean"].tolist() == [pytest.approx(mean)]
        assert {p.name for p in (tmp_path / "out" / study).glob("frontier_*.png")} == {
            f"frontier_{study}_tiny-xs.png"}
    assert "study d:" in capsys.readouterr().out


def test_a_cell_without_counted_runs_keeps_its_row(tmp_path):
    """Every rerun of cell `bad` degenerate: the table still has its row, n 0 with no mean and
    its 2 degenerate reruns, beside the counted cell."""
    from analysis.table import results_table

    results = tmp_path / "results"
    (results / "d").mkdir(parents=True)
    _write_study(results, "d", {"ok": ({}, [(2.0, 0.50), (2.0, 0.52), (2.0, 0.54)], set()),
                                "bad": ({"beta": 0.5}, [(25.0, 0.1), (30.0, 0.1)], {1, 2})})
    csv = results / "d" / "summary.csv"
    pd.read_csv(csv).assign(estimate_n=[3, 0]).to_csv(csv, index=False)
    table = results_table(results)
    assert sorted(table["n"]) == [0, 3]
    bad = table[table["dpo.beta"] == 0.5].iloc[0]
    assert bad["degenerate reruns"] == 2 and pd.isna(bad["objective mean"])
    # The heatmap keeps its cell too: grey, "n=0" and why, where it would have no row at all.
    import matplotlib.pyplot as plt

    from analysis import fig_heatmap

    drawn = []
    real = fig_heatmap.save
    fig_heatmap.save = lambda fig, out, name: drawn.append(fig) or real(fig, out, name)
    try:
        fig_heatmap.draw(results, tmp_path / "fig")
    finally:
        fig_heatmap.save = real
    [ax] = [a for a in drawn[0].axes if a.get_title() == "tiny-xs"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.1", "0.5"]
    texts = [t.get_text() for t in ax.texts]
    assert "n=0\n2 degenerate" in texts and any(t.startswith("0.520") for t in texts)
    plt.close("all")


def test_frontier_of_runs_outside_a_sweep(tmp_path):
    """Runs without sweep labels (`harness train` alone) get `frontier_<model>`, titled by the
    model alone."""
    from analysis import fig_frontier

    rd = _write_run(tmp_path / "results", "single", "c", "seed1")
    for name in ("config.json", "summary.json"):
        data = json.loads((rd / name).read_text())
        data.update({k: None for k in LABELS} if name == "summary.json" else
                    {"labels": dict.fromkeys(LABELS)})
        (rd / name).write_text(json.dumps(data))
    (f,) = fig_frontier.frontiers(tmp_path / "results")
    assert (f.study, f.name) == ("", "tiny-xs")
    assert fig_frontier.plot(f).axes[0].get_title() == "tiny-xs: reward vs KL"
    assert {p.name for p in fig_frontier.draw(tmp_path / "results", tmp_path / "out")} == {
        "frontier_tiny-xs.png", "frontier_tiny-xs.pdf"}
