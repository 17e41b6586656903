"""Sweeps under faults: dead workers' trials are retried in their slot, failing cells are given up
on and named, objectives never take a non-finite value, and a study SIGKILLed at chosen moments
ends with the same table as an uninterrupted one (the short variant of `make chaos`)."""

import math
import multiprocessing as mp
import os
import socket

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from harness.config import ObjectiveSpec
from harness.sweep import SweepIncomplete, faults, run_sweep
from harness.sweep.storage import masked
from harness.sweep.study import objective_value, slot_seed
from harness.sweep.trial import waiting_slot


def _dead_pid() -> int:
    p = mp.get_context("fork").Process(target=lambda: None)
    p.start()
    p.join()
    return p.pid


def _study():
    return optuna.create_study(storage=optuna.storages.InMemoryStorage())


def test_a_dead_local_workers_trial_is_retried_at_once_in_its_slot():
    """A RUNNING trial whose worker process is gone is failed and queued again with its
    parameters and slot; a live worker's trial is left alone."""
    study = _study()
    dead = study.ask()
    dead.suggest_float("lr", 1e-4, 1e-2, log=True)
    dead.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    dead.set_user_attr("slot", 1)
    live = study.ask()
    live.set_user_attr("worker", f"{socket.gethostname()}:{os.getppid()}")
    assert faults.reap_stale(study) == 1
    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == TrialState.FAIL and states[live.number] == TrialState.RUNNING
    (retry,) = [t for t in study.trials if t.state == TrialState.WAITING]
    assert retry.params == {"lr": dead.params["lr"]} and retry.user_attrs["slot"] == 1
    assert "worker" not in retry.user_attrs
    assert waiting_slot(study) == 1


def test_slot_seeds_are_stable_and_distinct():
    assert slot_seed(0, "beta=0.1", 1) == slot_seed(0, "beta=0.1", 1)
    seeds = {slot_seed(0, "beta=0.1", 1), slot_seed(0, "beta=0.1", 2), slot_seed(0, "beta=0.5", 1),
             slot_seed(1, "beta=0.1", 1), slot_seed(0, "beta=0.1", 1, "host:12:0")}
    assert len(seeds) == 5


def test_a_cell_is_given_up_after_max_failures_in_a_row():
    """Errors in a row mark the cell failed (recorded on the study); a killed trial neither
    counts nor breaks the streak; a success resets it."""
    study = _study()

    def trial(error=None, value=None):
        t = study.ask()
        if error:
            t.set_user_attr("error", error)
        study.tell(t, value, state=TrialState.COMPLETE if value is not None else TrialState.FAIL)

    trial(error="ValueError: one")
    assert faults.cell_failure(study, 2) is None
    trial(value=0.5)
    trial(error="ValueError: two")
    trial()  # killed: no error of its own
    assert faults.cell_failure(study, 2) is None
    trial(error="ValueError: three")
    assert faults.cell_failure(study, 2) == "2 trials in a row failed; last: ValueError: three"
    assert study.user_attrs["failed"].endswith("three")


def test_objective_by_hand_and_never_non_finite():
    """gen/reward minus 1 per nat of KL above a 4-nat budget (the default study's objective);
    non-finite metrics or KL give no value at all."""
    spec = ObjectiveSpec(metric="gen/reward", kl_budget=4.0, kl_penalty=1.0)
    assert objective_value(spec, {"gen/reward": 0.5, "gen/kl": 6.0}) == pytest.approx(-1.5)
    assert objective_value(spec, {"gen/reward": 0.5, "gen/kl": 3.0}) == pytest.approx(0.5)
    low = ObjectiveSpec(metric="eval/loss", direction="minimize", kl_budget=4.0, kl_penalty=2.0)
    assert objective_value(low, {"eval/loss": 0.6, "gen/kl": 5.0}) == pytest.approx(2.6)
    assert objective_value(spec, {"gen/reward": math.nan, "gen/kl": 1.0}) is None
    assert objective_value(spec, {"gen/reward": 0.5, "gen/kl": math.nan}) is None
    assert objective_value(spec, {"gen/reward": 0.5}) is None


def test_storage_urls_are_printed_without_password():
    assert masked("postgresql://bob:s3cret@db:5432/dpo") == "postgresql://bob:***@db:5432/dpo"
    assert masked("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_a_failing_cell_is_named_and_the_others_finish(tmp_path, seed_data, monkeypatch):
    """A cell whose batch size exceeds its pairs is failed by the checks before any training (no
    run folder); a cell that fails at run time (here: every run raises) is given up after
    max_failures trials; the good cell finishes; the sweep ends with an error naming both, and
    the storage URL comes from DPO_HARNESS_STORAGE."""
    import harness.train

    real = harness.train.train

    def flaky(cfg, **kw):
        if cfg.train.warmup_steps == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, **kw)

    monkeypatch.setattr(harness.train, "train", flaky)
    raw = {"name": "f", "data": {"source": str(seed_data), "limit": 60, "max_length": 128},
           "model": {"name": "tiny-xs"},
           "train": {"max_steps": 2, "eval_every": 4, "eval_batches": 1, "save_model": False,
                     "test_at_end": False},
           "tracking": {"results_dir": str(tmp_path / "results"), "progress": False,
                        "wandb": "disabled"},
           "sweep": {"grid": {"train.batch_size": [4, 500], "train.warmup_steps": [0, 1]},
                     "trials": 2, "pruner": {"type": "none"}}}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(raw))
    journal = tmp_path / "elsewhere" / "j.log"
    journal.parent.mkdir()
    monkeypatch.setenv("DPO_HARNESS_STORAGE", str(journal))
    with pytest.raises(SweepIncomplete) as err:
        run_sweep(tmp_path / "f.yaml")
    assert "batch_size=500,warmup_steps=0: failed (precheck: ValueError: train.batch_size 500" in str(err.value)
    assert "batch_size=4,warmup_steps=1: failed (2 trials in a row failed; last: RuntimeError: CUDA" in str(err.value)
    df = pd.read_csv(tmp_path / "results" / "f" / "summary.csv").set_index("cell")
    assert df.loc["batch_size=4,warmup_steps=0", "status"] == "done"
    assert df.loc["batch_size=4,warmup_steps=0", "trials"] == 2
    assert df.loc["batch_size=4,warmup_steps=1", "failed"] == 2
    assert df.loc["batch_size=500,warmup_steps=1", "status"] == "failed"
    runs = tmp_path / "results" / "f" / "runs"
    assert not (runs / "batch_size=500,warmup_steps=0").exists()  # failed before training
    assert journal.exists() and not (tmp_path / "results" / "f" / "optuna.db").exists()


@pytest.mark.slow
def test_short_chaos_kills_change_nothing(tmp_path, seed_data):
    """The study SIGKILLed while sampling pairs, after a run's summary but before Optuna's record,
    and inside seed queuing, then twice at random moments, restarted each time: the final summary
    table equals the uninterrupted study's."""
    from tests import chaos

    assert chaos.main(["--short", "--kills", "2", "--out", str(tmp_path)]) == 0
