"""Sweeps: validation before anything runs, a small study end to end (grid × trials × seeds, with
pruning), resuming after a killed worker, and two workers sharing one study."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from harness.config import ConfigError
from harness.sweep import load_experiment, open_storage, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def experiment(tmp_path, seed_data, sweep, **sections):
    """A sweep over the seed data on the smallest tiny model: each run takes a second or two."""
    raw = {
        "name": "t",
        "data": {"source": str(seed_data), "limit": 100, "max_length": 128},
        "model": {"name": "tiny-xs"},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 1,
                  "save_model": False, "test_at_end": False},
        "dpo": {},
        "tracking": {"results_dir": str(tmp_path / "results"), "progress": False},
        "sweep": sweep,
    }
    for k, v in sections.items():
        raw[k].update(v)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


SEARCH = {"train.lr": {"type": "log_float", "low": 1e-4, "high": 3e-3}}


@pytest.mark.parametrize(
    "sweep,needle",
    [
        ({"grid": {"dpo.beta": []}}, "sweep.grid.dpo.beta: List should have at least 1 item"),
        ({"grid": {"dpo.beta": [0.1, -1]}}, "sweep.grid.dpo.beta[1]"),
        ({"grid": {"dpo.betta": [0.1]}}, "dpo.betta: unknown key"),
        ({"grid": {"masking": ["masked-median"]}}, "sweep.grid.masking[0]"),
        ({"trials": "many"}, "sweep.trials"),
        ({"colour": 1}, "sweep.colour: unknown key"),
        ({"objective": {"metric": "eval/bleu"}}, "sweep.objective.metric: no run of this experiment logs"),
        ({"search": {"train.lr": {"type": "log_float", "low": 0, "high": 1}}}, "sweep.search.train.lr"),
        ({"search": {"train.batch_size": {"type": "categorical", "choices": [4, 0]}}}, "train.batch_size"),
    ],
)
def test_validation_names_file_and_field(tmp_path, sweep, needle):
    """Every mistake is caught before any run starts, with the file and the field."""
    path = experiment(tmp_path, tmp_path / "unused.json", sweep)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)
    assert not (tmp_path / "results").exists()


def test_small_sweep_end_to_end(tmp_path, seed_data):
    """2 betas × 2 maskings × 3 trials + 1 seed rerun: every run, the study and the summary.

    The median pruner (no start-up grace) must stop at least one trial.
    """
    sweep = {"grid": {"dpo.beta": [0.1, 0.5], "masking": ["masked-mean", "full-sum"]},
             "trials": 3, "seeds": 2, "search": SEARCH,
             "objective": {"metric": "eval/rewards/margins"},
             "pruner": {"type": "median", "n_startup_trials": 1}}
    path = experiment(tmp_path, seed_data, sweep)
    out = run_sweep(path)
    df = pd.read_csv(out)
    assert len(df) == 4 and set(df["masking"]) == {"masked-mean", "full-sum"}
    assert (df["trials"] == 3).all() and (df["seeds_done"] == 1).all()
    # The estimate is the fresh rerun's value, not the search trial's that picked the parameters.
    assert (df["estimate_from"] == "seed reruns").all() and (df["estimate_n"] == 1).all()
    assert df["pruned"].sum() >= 1
    assert df["param/train.lr"].between(1e-4, 3e-3).all()
    for cell in df["cell"]:  # each trial of a cell tries its own learning rate
        lrs = [t.params["train.lr"] for t in _count(
            f"sqlite:///{tmp_path / 'results' / 't' / 'optuna.db'}", f"t/{cell}", tuple(TrialState))]
        assert len(lrs) == 3 and len(set(lrs)) == 3, lrs
    storage = open_storage(f"sqlite:///{tmp_path / 'results' / 't' / 'optuna.db'}")
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    # a search study and a seeds study per cell, and the study's own record (its precision)
    assert len(names) == 9 and sum("/" not in n for n in names) == 1
    record = optuna.load_study(study_name="t", storage=storage)
    assert record.trials == [] and record.user_attrs["precision"] in ("fp32", "bf16")
    assert set(df["precision"]) == {record.user_attrs["precision"]}
    runs = list((tmp_path / "results" / "t" / "runs").glob("*/*/summary.json"))
    assert len(runs) == 4 * (3 + 1)
    # The seed rerun repeats the best trial's parameters with another seed.
    cell = df.iloc[0]
    (rerun,) = cell["run_dirs"].split(";")
    url = f"sqlite:///{tmp_path / 'results' / 't' / 'optuna.db'}"
    searched = next(t for t in _count(url, f"t/{cell['cell']}", tuple(TrialState))
                    if t.number == cell["best_trial"])
    assert cell["search_value"] == pytest.approx(searched.value)
    rerun_value = json.loads((Path(rerun) / "summary.json").read_text())["eval/rewards/margins"]
    assert cell["objective_mean"] == pytest.approx(rerun_value)
    c0 = json.loads((Path(searched.user_attrs["run_dir"]) / "config.json").read_text())
    c1 = json.loads((Path(rerun) / "config.json").read_text())
    assert c0["train"]["lr"] == c1["train"]["lr"] and c0["train"]["seed"] != c1["train"]["seed"]
    assert c0["tracking"]["group"] == "t"
    assert cell["cell"] == "beta=0.1,masking=masked-mean"  # grid order
    assert {"beta=0.1", "masking=masked-mean", "search", f"lr={c0['train']['lr']:.3g}"} <= set(
        c0["tracking"]["tags"])
    assert "seeds" in c1["tracking"]["tags"]
    # Every run's files carry its labels explicitly (what analysis/ groups by), equal to the
    # trial's own record in the Optuna storage.
    url = f"sqlite:///{(tmp_path / 'results' / 't' / 'optuna.db').resolve()}"
    for summary_path in runs:
        run_dir = summary_path.parent
        labels = json.loads((run_dir / "config.json").read_text())["labels"]
        summary = json.loads(summary_path.read_text())
        assert {k: summary[k] for k in labels} == labels
        role = "search" if run_dir.name.startswith("trial-") else "seeds"
        study = f"t/{run_dir.parent.name}" + ("/seeds" if role == "seeds" else "")
        trial = next(t for t in _count(url, study, tuple(TrialState)) if t.number == labels["trial"])
        assert trial.user_attrs["run_dir"] == str(run_dir)
        assert labels == {"study": "t", "cell": run_dir.parent.name, "trial": trial.number,
                          "role": role, "storage": url, "seed": summary["seed"],
                          "masking": "masked-mean" if "masked-mean" in run_dir.parent.name else "full-sum"}
    # Running again finds nothing left to do: no new runs.
    run_sweep(path)
    assert len(list((tmp_path / "results" / "t" / "runs").glob("*/*/summary.json"))) == 16


def _count(storage_url, study_name, states):
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    return [t for t in study.get_trials(deepcopy=False) if t.state in states]


def test_killed_worker_resumes_without_losing_or_rerunning(tmp_path, seed_data, monkeypatch):
    """SIGKILL a worker mid-study; rerunning the command keeps every finished trial, retries the
    one that was cut off, and finishes the budget."""
    monkeypatch.setattr("harness.sweep.storage.GRACE_S", 2)
    monkeypatch.setattr("harness.sweep.storage.HEARTBEAT_S", 1)
    sweep = {"grid": {"dpo.beta": [0.1]}, "trials": 4, "search": SEARCH, "pruner": {"type": "none"}}
    path = experiment(tmp_path, seed_data, sweep, train={"max_steps": 30})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"sqlite:///{tmp_path / 'results' / 't' / 'optuna.db'}"
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            if len(_count(url, "t/beta=0.1", (TrialState.COMPLETE,))) >= 1 and _count(
                    url, "t/beta=0.1", (TrialState.RUNNING,)):
                break
        except Exception:  # noqa: BLE001 - the study may not exist yet
            continue
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {t.number: t.value for t in _count(url, "t/beta=0.1", (TrialState.COMPLETE,))}
    assert done_before, "the worker was killed before finishing a trial"
    time.sleep(3)  # past the grace period: the RUNNING trial is stale
    run_sweep(path)
    complete = _count(url, "t/beta=0.1", (TrialState.COMPLETE,))
    assert len(complete) == 4
    for t in complete:  # finished trials were kept, not rerun
        if t.number in done_before:
            assert t.value == done_before[t.number]
    failed = _count(url, "t/beta=0.1", (TrialState.FAIL,))
    assert len(failed) == 1  # the cut-off trial, retried with the same parameters
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number]
    assert retried and retried[0].params == failed[0].params


def test_two_workers_share_one_study(tmp_path, seed_data):
    """--workers 2 --devices 0,1 on one SQLite study: the budget is met exactly, no trial runs
    twice, and each worker sees only its own device (CUDA_VISIBLE_DEVICES, recorded by its runs)."""
    sweep = {"grid": {"dpo.beta": [0.1, 0.3]}, "trials": 3, "search": SEARCH, "pruner": {"type": "none"}}
    path = experiment(tmp_path, seed_data, sweep)
    run_sweep(path, workers=2, devices=["0", "1"])
    url = f"sqlite:///{tmp_path / 'results' / 't' / 'optuna.db'}"
    trial_dirs, device_of = [], {}
    for cell in ("beta=0.1", "beta=0.3"):
        study_trials = _count(url, f"t/{cell}", tuple(TrialState))
        complete = [t for t in study_trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 3  # exactly the budget: a racing ask ends as surplus
        assert all(t.user_attrs.get("surplus") for t in study_trials if t.state != TrialState.COMPLETE)
        trial_dirs += [t.user_attrs["run_dir"] for t in complete]
        for t in complete:
            summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
            device_of.setdefault(t.user_attrs["worker"], set()).add(summary["visible_devices"])
    assert len(set(trial_dirs)) == len(trial_dirs)  # no trial ran twice
    on_disk = sorted(str(p.parent) for p in (tmp_path / "results" / "t" / "runs").glob("*/*/summary.json"))
    assert on_disk == sorted(trial_dirs)  # and no run happened outside the study
    assert all(len(d) == 1 for d in device_of.values())  # a worker keeps its one device
    assert set().union(*device_of.values()) <= {"0", "1"}
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None  # the parent's environment is as it was


def test_k_betas_compute_reference_logps_and_samples_once(tmp_path, seed_data, monkeypatch):
    """A sweep of 3 beta values on the same data and model with `reference: cache` runs the
    reference forward passes for one run only; the other runs read the cache. The reference's
    generation samples are drawn once for the sweep too, and the first eval (policy = reference)
    samples nothing: 1 reference pass + 1 policy pass per run in all, not 3 × (1 + 2)."""
    import json

    import harness.generate
    import harness.reference

    calls, sampled = [], []
    real, real_sample = harness.reference.compute_logps, harness.generate.sample

    def counting(model, items, *args, **kwargs):
        calls.append(len(items))
        return real(model, items, *args, **kwargs)

    def counting_sample(model, prompts, *args, **kwargs):
        sampled.append(len(prompts))
        return real_sample(model, prompts, *args, **kwargs)

    monkeypatch.setattr(harness.reference, "compute_logps", counting)
    monkeypatch.setattr(harness.generate, "sample", counting_sample)
    sweep = {"grid": {"dpo.beta": [0.1, 0.3, 0.5]}, "trials": 1, "pruner": {"type": "none"}}
    path = experiment(tmp_path, seed_data, sweep, dpo={"reference": "cache"})
    raw = yaml.safe_load(path.read_text())
    raw["gen_eval"] = {"enabled": True, "n_prompts": 3, "max_new_tokens": 6}
    raw["train"]["eval_every"] = 16  # pairs: evals at step 0 and the end (step 4)
    path.write_text(yaml.safe_dump(raw))
    out = run_sweep(path)
    assert len(pd.read_csv(out)) == 3
    runs = sorted((tmp_path / "results" / "t" / "runs").glob("*/*/summary.json"))
    assert len(runs) == 3
    summaries = [json.loads(r.read_text()) for r in runs]
    assert sorted(s["reference_cache_reused"] for s in summaries) == [False, True, True]
    assert len(calls) == 3  # one pass per split (train, validation, test) for the first run only
    assert sorted(s["reference_samples_reused"] for s in summaries) == [False, True, True]
    assert sampled == [3] * 4  # the reference once, then each run's policy at its final eval
    assert all(s["gen/kl"] != 0 for s in summaries), [s["gen/kl"] for s in summaries]  # trained policies


def test_recorded_storage_urls_open_anywhere_and_hold_no_password(tmp_path, monkeypatch):
    """The storage URL written into run files is absolute (opens from any folder) and carries no
    password (the driver reads PGPASSWORD or ~/.pgpass instead)."""
    from harness.sweep.storage import absolute, without_password

    monkeypatch.chdir(tmp_path)
    assert absolute("sqlite:///r/optuna.db") == f"sqlite:///{tmp_path / 'r' / 'optuna.db'}"
    assert absolute("r/journal.log") == str(tmp_path / "r" / "journal.log")
    assert absolute("postgresql://u@h/db") == "postgresql://u@h/db"
    assert without_password("postgresql://bob:s3cret@db.example:5432/dpo") == \
        "postgresql://bob@db.example:5432/dpo"
    assert without_password("postgresql:///dpo") == "postgresql:///dpo"


def test_workers_start_on_different_model_sizes(tmp_path, seed_data):
    """Worker k of K scans the cells from the k-th K-th of the list: in a size grid the two
    workers of a machine first need different SFT checkpoints and pair sets, built side by side;
    a worker alone goes in grid order."""
    from harness.config.load import load_experiment
    from harness.sweep.schedule import Sweep, first_cell

    grid = {"model.name": ["tiny-xs", "tiny-s"], "dpo.beta": [0.1, 0.5]}
    exp = load_experiment(experiment(tmp_path, seed_data, {"grid": grid, "trials": 1}))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert [c.id for c in exp.cells][:2] == ["beta=0.1,name=tiny-xs", "beta=0.1,name=tiny-s"]
    first = [Sweep(exp, url, tmp_path, w, 2).next_work()[1].id for w in (0, 1)]
    assert first == ["beta=0.1,name=tiny-xs", "beta=0.1,name=tiny-s"]
    assert Sweep(exp, url, tmp_path).next_work()[1].id == "beta=0.1,name=tiny-xs"
    assert first_cell(exp.cells, 3, 2) == 1  # worker 3 of 2 (several machines): the second size
    one_size = exp.cells[::2]  # tiny-xs only: k/K of the way down
    assert [first_cell(one_size, w, 2) for w in (0, 1)] == [0, 1]
