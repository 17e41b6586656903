"""harness/rundir.py, the run directory's one owner: where runs live, a run's labels, and the
start-or-resume decision on a directory an earlier attempt left (a finished run refused, a usable
checkpoint resumed with metrics.jsonl cut back to its rows, anything else started over). The
decision is checked here on files laid out by hand; tests/test_checkpoint.py checks it end to end
on trained runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import checkpoint, rundir
from tests.conftest import ROOT
from tests.runs import quick_config

CONFIG = {"dpo": {"beta": 0.1}, "tracking": {"tags": [], "progress": False}}  # a resolved config


def attempt(run_dir: Path, rows: int = 3, status: str | None = "interrupted",
            checkpoint_rows: int | None = 2, **state) -> Path:
    """A cut-off run laid out by hand: config.json, `rows` complete rows of metrics.jsonl and half
    a row, a summary with `status` (none when None), a gen_samples table, and a checkpoint at
    step 2 that counted `checkpoint_rows` rows (none when None); `state` overrides its state.json."""
    run_dir.mkdir(parents=True)
    (run_dir / rundir.CONFIG).write_text(json.dumps(CONFIG))
    (run_dir / rundir.METRICS).write_text("".join(f'{{"step": {i}}}\n' for i in range(rows)) + '{"st')
    if status is not None:
        (run_dir / rundir.SUMMARY).write_text(json.dumps({"status": status}))
    (run_dir / rundir.table_file("gen/samples")).write_text("[]")
    if checkpoint_rows is not None:
        step = rundir.checkpoint_dir(run_dir) / f"{checkpoint.PREFIX}00000002"
        step.mkdir(parents=True)
        (step / checkpoint.STATE).write_text(json.dumps({
            "format": checkpoint.FORMAT, "config": CONFIG, "precision": "fp32",
            "progress": {"step": 2, "seen": 8}, "metrics_lines": checkpoint_rows,
            "tracker_last": {}, **state}))
    return run_dir


def test_layouts():
    """A single run is results/runs/<name>-<time>; a sweep's runs are
    results/<study>/runs/<cell>/trial-NNN (by slot) and .../seedK (by seed offset)."""
    single = rundir.single_run_dir("results", "smoke")
    assert single.parent == Path("results") / "runs"
    assert re.fullmatch(r"smoke-\d{8}-\d{6}", single.name)
    study = rundir.study_dir("results", "s")
    assert study == Path("results/s")
    assert rundir.trial_dir(study, "beta=0.1", "search", 7) == Path("results/s/runs/beta=0.1/trial-007")
    assert rundir.trial_dir(study, "beta=0.1", "seeds", 2) == Path("results/s/runs/beta=0.1/seed2")
    assert rundir.table_file("gen/samples") == "gen_samples.json"


def test_study_run_dirs_are_the_run_folders(tmp_path):
    """A study's run folders are every <cell>/<run> under its runs/, files beside them aside."""
    for name in ("a/trial-000", "a/seed1", "b/trial-000"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / "a" / "stray.txt").write_text("")
    found = [p.relative_to(tmp_path / "runs").as_posix() for p in rundir.study_run_dirs(tmp_path)]
    assert found == ["a/seed1", "a/trial-000", "b/trial-000"]


def test_run_labels_are_the_label_columns(tmp_path):
    """run_labels gives exactly LABELS, in order: the sweep's five (None outside a sweep), the
    config's masking and seed."""
    cfg = quick_config(tmp_path, tmp_path, **{"train.seed": 3})
    single = rundir.run_labels(cfg)
    assert tuple(single) == rundir.LABELS
    assert single == {"study": None, "cell": None, "trial": None, "role": None,
                      "masking": cfg.dpo.masking, "seed": 3, "storage": None}
    sweep = {"study": "s", "cell": "beta=0.1", "trial": 4, "role": "seeds", "storage": "db"}
    assert rundir.run_labels(cfg, sweep) == {**single, **sweep}


def test_a_finished_run_is_refused_naming_its_summary(tmp_path):
    """A directory whose summary.json says finished raises FileExistsError naming summary.json,
    and every file is left as it was."""
    run_dir = attempt(tmp_path / "r", status=rundir.FINISHED)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"already holds a finished run \(summary\.json\)"):
        rundir.open_run_dir(tmp_path, "x", run_dir, CONFIG, "fp32")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_cut_off_run_with_a_usable_checkpoint_resumes(tmp_path, capsys):
    """A cut-off run whose checkpoint was saved under the same config (tags may differ) and
    precision resumes from it: metrics.jsonl keeps the rows the checkpoint counted, the stale
    summary goes, the checkpoint and the other files stay, and it says so."""
    run_dir = attempt(tmp_path / "r")
    tagged = {**CONFIG, "tracking": {"tags": ["again"], "progress": True}}
    opened, ckpt = rundir.open_run_dir(tmp_path, "x", run_dir, tagged, "fp32")
    assert opened == run_dir and ckpt is not None and ckpt.step == 2
    assert (run_dir / rundir.METRICS).read_text() == '{"step": 0}\n{"step": 1}\n'
    assert not (run_dir / rundir.SUMMARY).exists()
    assert ckpt.path.parent == rundir.checkpoint_dir(run_dir) and ckpt.path.exists()
    assert (run_dir / rundir.CONFIG).exists() and (run_dir / "gen_samples.json").exists()
    assert "resuming from the checkpoint at step 2 (8 pairs seen)" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "why"), [
    ({"config": {**CONFIG, "dpo": {"beta": 0.2}}}, "the checkpoint was saved under another config"),
    ({"precision": "bf16"}, "the checkpoint was computed in bf16, this run computes in fp32"),
    ({"format": 0}, f"checkpoint format 0, not {checkpoint.FORMAT}"),
    ({"metrics_lines": 5}, "metrics.jsonl holds fewer rows than the checkpoint counted"),
    (None, "no checkpoint"),
])
def test_an_unusable_checkpoint_starts_over(tmp_path, capsys, change, why):
    """A cut-off run whose checkpoint cannot be continued (another config, precision or format,
    metrics.jsonl shorter than it counted, or none at all) starts over, saying why: metrics,
    summary and checkpoint are removed (the run appends to none of them)."""
    run_dir = attempt(tmp_path / "r", checkpoint_rows=None if change is None else 2, **(change or {}))
    opened, ckpt = rundir.open_run_dir(tmp_path, "x", run_dir, CONFIG, "fp32")
    assert opened == run_dir and ckpt is None
    for name in (rundir.METRICS, rundir.SUMMARY, rundir.CHECKPOINT):
        assert not (run_dir / name).exists(), name
    assert f"{run_dir}: starting over ({why})" in capsys.readouterr().err


def test_a_new_run_starts_without_a_word(tmp_path, capsys):
    """No run_dir given: a new results/runs/<name>-<time> folder is made; nothing to resume and
    nothing printed."""
    opened, ckpt = rundir.open_run_dir(tmp_path, "smoke", None, CONFIG, "fp32")
    assert ckpt is None and opened.is_dir() and opened.parent == tmp_path / "runs"
    assert opened.name.startswith("smoke-")
    assert capsys.readouterr().err == ""


def test_metrics_are_cut_back_to_the_rows_a_checkpoint_counted(tmp_path):
    """Resuming keeps the first N complete rows of metrics.jsonl and drops the stale summary;
    a file with fewer complete rows than the checkpoint counted (a half-written last row does
    not count) is left alone and the run cannot resume from it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"st')
    (tmp_path / "summary.json").write_text('{"status": "interrupted"}')
    assert not rundir.resume_files(tmp_path, 4)
    assert path.read_text().endswith('{"st') and (tmp_path / "summary.json").exists()
    assert rundir.resume_files(tmp_path, 2)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'
    assert not (tmp_path / "summary.json").exists()
    assert rundir.resume_files(tmp_path, 0) and path.read_text() == ""


def test_the_run_file_names_load_without_torch():
    """analysis/ reads the run files' names from harness.rundir without importing torch."""
    code = ("import sys, analysis.load, analysis.common, harness.rundir; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_workers_log_is_where_supervise_writes_it(tmp_path, capsys):
    """supervise.py still spells its log's name; it must be rundir.WORKERS_LOG."""
    from harness.sweep import supervise

    assert supervise._open_log(tmp_path).name == rundir.WORKERS_LOG


def test_metrics_rows_read_back_skip_half_a_last_line_and_name_a_bad_one(tmp_path, capsys):
    """No metrics file yet: no rows. Half a last line (a run killed mid-write) is skipped with a
    warning; a bad line before the last is an error naming the file and the line."""
    assert rundir.read_metrics(tmp_path) == []
    path = tmp_path / rundir.METRICS
    path.write_text('{"step": 0}\n{"step": 1}\n{"st')
    assert rundir.read_metrics(tmp_path) == [{"step": 0}, {"step": 1}]
    assert "line 3 is incomplete; skipped" in capsys.readouterr().out
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        rundir.read_metrics(tmp_path)
