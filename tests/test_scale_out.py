"""Scaling a sweep out: a device per worker, machines that share one study (each known by its
own host name, so none takes another's live trial for dead), no trial beyond the budget when
workers race for the last slot, and `harness status` read from the storage alone."""

import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from harness.cli import main
from harness.sweep import faults, load_experiment, supervise
from harness.sweep.status import study_status
from harness.sweep.storage import HOST_ENV
from harness.sweep.trial import Surplus, free_slot, settle_slot
from tests.test_faults import _dead_pid, _study
from tests.test_sweep import ROOT, SEARCH, experiment


def test_auto_gives_a_worker_per_device_else_per_core(monkeypatch):
    monkeypatch.setattr(supervise, "visible_accelerators", lambda: ["0", "1", "2"])
    assert supervise.plan_workers("auto", None) == ["0", "1", "2"]
    assert supervise.plan_workers("auto", ["4", "6"]) == ["4", "6"]  # --devices wins
    assert supervise.plan_workers(4, ["4", "6"]) == ["4", "6", "4", "6"]  # round-robin
    assert supervise.plan_workers(2, None) == [None, None]  # a count alone assigns nothing
    monkeypatch.setattr(supervise, "visible_accelerators", lambda: [])
    monkeypatch.setattr(supervise, "usable_cores", lambda: 6)
    assert supervise.plan_workers("auto", None) == [None] * 6
    with pytest.raises(ValueError, match="at least one worker"):
        supervise.plan_workers(0, None)


def test_visible_accelerators_follow_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert supervise.visible_accelerators() == ["5", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert supervise.visible_accelerators() == ["0", "1"]


def test_only_a_trial_of_this_machine_can_be_found_dead(monkeypatch):
    """A dead pid means a dead worker only on the machine that ran it: another machine with the
    same pid number (or the same container host name, told apart by DPO_HARNESS_HOST) is not."""
    monkeypatch.setenv(HOST_ENV, "host-a")
    study = _study()
    pid = _dead_pid()
    for host in ("host-a", "host-b"):
        t = study.ask()
        t.set_user_attr("worker", f"{host}:{pid}")
    assert faults.reap_stale(study) == 1
    (left,) = [t for t in study.trials if t.state == TrialState.RUNNING]
    assert left.user_attrs["worker"] == f"host-b:{pid}"
    assert faults.me() == f"host-a:{os.getpid()}"


def test_a_trial_asked_for_after_the_last_slot_went_runs_nothing():
    """Two workers saw one free slot and both asked: the second trial ends FAIL as surplus, not
    as a trial past the budget, and is no failure of the cell."""
    study = _study()
    a, b = study.ask(), study.ask()
    assert settle_slot(a, 0, 1) == 0
    with pytest.raises(Surplus):
        settle_slot(b, 0, 1)
    study.tell(b, state=TrialState.FAIL)
    assert study.trials[1].user_attrs == {"surplus": True, "slot": -1}
    assert not faults.real_failure(study.trials[1])
    assert faults.cell_failure(study, 1) is None


def test_two_claims_of_one_slot_at_the_same_moment_leave_one(monkeypatch):
    """Worker b read the trials before worker a wrote its claim on slot 0, so both chose slot 0:
    b, reading again after writing its own claim, finds a's and gives the slot up."""
    study = _study()
    a, b = study.ask(), study.ask()
    before_a_claimed = study.get_trials(deepcopy=True)
    assert settle_slot(a, 0, 2) == 0
    reads = []
    real = study.get_trials

    def stale_first(*args, **kwargs):
        reads.append(1)
        return before_a_claimed if len(reads) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(study, "get_trials", stale_first)
    with pytest.raises(Surplus, match="claimed at the same moment"):
        settle_slot(b, 0, 2)
    monkeypatch.undo()
    study.tell(b, state=TrialState.FAIL)  # what Optuna does with the trial on the exception
    assert study.trials[b.number].user_attrs["slot"] == -1  # its claim withdrawn
    assert free_slot(study, 2) == 1  # slot 1 is still there to fill


def test_status_reads_the_storage_while_a_trial_runs(tmp_path, seed_data, capsys):
    sweep = {"grid": {"dpo.beta": [0.1, 0.3]}, "trials": 2, "seeds": 2, "search": SEARCH}
    path = experiment(tmp_path, seed_data, sweep)
    exp = load_experiment(path)
    url = f"sqlite:///{tmp_path / 'results' / 't' / 'optuna.db'}"
    (tmp_path / "results" / "t").mkdir(parents=True)
    study = optuna.create_study(study_name="t/beta=0.1", storage=url, direction="maximize")
    done = study.ask()
    done.suggest_float("train.lr", 1e-4, 3e-3, log=True)
    done.set_user_attr("slot", 0)
    study.tell(done, 0.25)
    running = study.ask()
    running.set_user_attr("worker", "node-7:4242")
    running.set_user_attr("slot", 1)
    rows = {r["cell"]: r for r in study_status(exp, url)}
    a, b = rows["beta=0.1"], rows["beta=0.3"]
    assert (a["state"], a["done"], a["running"], a["best"]) == ("running", 1, 1, 0.25)
    assert a["workers"][0].startswith("node-7:4242 (search slot 1")
    assert (b["state"], b["done"], b["best"]) == ("not started", 0, None)
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "held by node-7:4242" in out and "1/2" in out
    assert optuna.study.get_all_study_names(url) == ["t/beta=0.1"]  # status created nothing


def _sweep_process(path, host: str, study: str, url: str) -> subprocess.Popen:
    env_var = "DPO_HARNESS_TEST_STUDY_URL"
    env = {**os.environ, HOST_ENV: host, "OMP_NUM_THREADS": "1", env_var: url}
    return subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(path), "--study", study,
                             "--storage-env", env_var], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_hosts_share_one_postgresql_study(tmp_path, seed_data):
    """Two sweep commands, as two machines (DPO_HARNESS_HOST host-a and host-b), on one
    PostgreSQL study named by --storage-env: every cell gets exactly its budget of trials, no
    parameters twice, both machines take work, and `harness status` sees it all."""
    url = os.environ.get("DPO_HARNESS_TEST_POSTGRES")
    if not url:
        pytest.skip("DPO_HARNESS_TEST_POSTGRES is not set (no PostgreSQL server for this run)")
    study = f"hosts-{os.getpid()}-{time.time_ns()}"
    sweep = {"grid": {"dpo.beta": [0.1, 0.3]}, "trials": 3, "search": SEARCH,
             "pruner": {"type": "none"}}
    path = experiment(tmp_path, seed_data, sweep)
    procs = [_sweep_process(path, h, study, url) for h in ("host-a", "host-b")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    hosts, params = set(), []
    for cell in ("beta=0.1", "beta=0.3"):
        trials = optuna.load_study(study_name=f"{study}/{cell}", storage=url).trials
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 3  # the budget, exactly
        assert all(t.user_attrs.get("surplus") for t in trials if t.state != TrialState.COMPLETE)
        assert sorted(t.user_attrs["slot"] for t in complete) == [0, 1, 2]
        params += [t.params["train.lr"] for t in complete]
        hosts |= {t.user_attrs["worker"].split(":")[0] for t in complete}
    assert len(set(params)) == len(params)  # no parameters twice
    assert hosts == {"host-a", "host-b"}
    exp = load_experiment(path, study)
    rows = study_status(exp, url)
    assert [(r["state"], r["done"], r["workers"]) for r in rows] == [("done", 3, [])] * 2
