"""harness/sweep/trial.py: search slots fill the budget once, a seed rerun takes its queued seed,
and a run that finished with the same config is read back instead of trained again (the
concurrent claims are in tests/test_scale_out.py, the whole sweep in tests/test_faults.py)."""

import json

import pytest

from harness import rundir
from harness.sweep.trial import Surplus, finished_summary, free_slot, seed_offset, settle_slot
from tests.runs import quick_config
from tests.test_faults import _study


def test_slots_fill_the_budget_once():
    """Free slots are the lowest untaken ones; a slot taken meanwhile moves the trial on."""
    study = _study()
    assert free_slot(study, 3) == 0
    a = study.ask()
    assert settle_slot(a, 0, 3) == 0
    b = study.ask()
    assert settle_slot(b, 0, 3) == 1  # slot 0 is a's
    study.tell(a, 1.0)
    assert free_slot(study, 3) == 2
    c = study.ask()
    settle_slot(c, 2, 3)
    assert free_slot(study, 3) is None


def test_a_seed_rerun_takes_its_queued_seed_or_is_surplus():
    """A queued rerun carries its seed offset; a trial asked for without one runs nothing."""
    study = _study()
    study.enqueue_trial({}, user_attrs={"seed_offset": 2})
    assert seed_offset(study.ask()) == 2
    late = study.ask()
    with pytest.raises(Surplus, match="no seed rerun left"):
        seed_offset(late)
    assert late.user_attrs["surplus"] is True


def test_a_finished_run_is_read_back_only_under_the_same_config(tmp_path):
    """finished_summary returns the summary of a run that finished in the directory under the
    same config (labels, tracking.tags and tracking.progress aside), else None: another config, a
    run that did not finish, or a directory without its files."""
    cfg = quick_config(tmp_path, tmp_path)
    run_dir = tmp_path / "run"
    assert finished_summary(run_dir, cfg) is None
    run_dir.mkdir()
    labels = rundir.run_labels(cfg, {"study": "s", "trial": 3})
    (run_dir / rundir.CONFIG).write_text(json.dumps({**cfg.to_dict(), "labels": labels}))
    summary = {"status": rundir.FINISHED, "train/loss": 0.5}
    (run_dir / rundir.SUMMARY).write_text(json.dumps(summary))
    assert finished_summary(run_dir, cfg) == summary
    tagged = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tags": ["x"]})})
    assert finished_summary(run_dir, tagged) == summary
    other = quick_config(tmp_path, tmp_path, **{"dpo.beta": cfg.dpo.beta * 2})
    assert finished_summary(run_dir, other) is None
    (run_dir / rundir.SUMMARY).write_text(json.dumps({**summary, "status": "interrupted"}))
    assert finished_summary(run_dir, cfg) is None
