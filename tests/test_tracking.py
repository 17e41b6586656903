"""Tracking: the offline wandb runs of training runs and studies, read back from their .wandb logs
with `wandb leet inspect`: the same metric values as summary.json, best values, a step metric for
every split, the samples table at every eval, and a study's runs named uniquely in one folder."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness import metrics
from harness.metrics import METRICS
from harness.tracking import BEST, JOB_TYPES, STEP_METRIC
from harness.train import train
from tests.runs import quick_config, read_metrics

WANDB = Path(sys.executable).parent / "wandb"


def wandb_summary(wandb_dir: str) -> dict:
    """The run summary as wandb stored it: `wandb leet inspect --summary --json <run dir>` prints one
    JSON object whose `summary` maps flat metric names ("train/loss") to their last values."""
    out = subprocess.run([str(WANDB), "leet", "inspect", "--summary", "--json", wandb_dir],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert isinstance(found, dict) and isinstance(found.get("summary"), dict), out.stdout[:500]
    return found


def wandb_records(wandb_dir: str | Path) -> dict[str, list[dict]]:
    """The records of a run's .wandb log by type (`run`, `metric`, `history`, ...):
    `wandb leet inspect --json <run dir>` prints one JSON record per line."""
    out = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(wandb_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    records: dict[str, list[dict]] = {}
    for line in out.stdout.splitlines():
        r = json.loads(line)
        records.setdefault(r["type"], []).append(r[r["type"]])
    return records


def test_wandb_offline_summary_matches_summary_json(seed_data, tmp_path):
    """Every registered metric with a number in summary.json has the same value (to float
    precision) in the offline wandb run's summary; they include the train, eval and test
    metrics, and the wandb run finished. Beside them, `best/<name>` holds the best value of each
    headline metric over metrics.jsonl (max or min by its direction). The run is named after its
    run directory, its job type is `train`, and its wandb folder is inside the run directory."""
    run_dir = tmp_path / "w"
    summary = train(quick_config(seed_data, tmp_path), run_dir=run_dir)
    assert summary["wandb_mode"] == "offline" and summary["wandb_dir"]
    assert Path(summary["wandb_dir"]).parent == run_dir / "wandb"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    values = {k: v for k, v in on_disk.items()
              if k in METRICS and isinstance(v, int | float) and not isinstance(v, bool)}
    assert {"train/loss", "eval/rewards/margins", "test/rewards/accuracies"} <= values.keys()

    found = wandb_summary(summary["wandb_dir"])
    assert found["state"] == "finished" and found["exit_code"] == 0
    wb = found["summary"]
    missing = sorted(values.keys() - wb.keys())
    assert not missing, missing
    for name, value in sorted(values.items()):
        assert isinstance(wb[name], int | float), (name, wb[name])
        assert math.isfinite(value), name
        assert wb[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name

    rows = read_metrics(run_dir)
    logged = [name for name in BEST if any(name in r for r in rows)]
    assert {"train/loss", "eval/loss", "test/loss", "eval/rewards/accuracies"} <= set(logged)
    for name in logged:
        pick = max if BEST[name] == "max" else min
        assert wb[f"best/{name}"] == pytest.approx(pick(r[name] for r in rows if name in r)), name
    # Not the final values again: here at least one curve was best before its end.
    assert any(wb[f"best/{name}"] != wb[name] for name in logged)
    run = wandb_records(summary["wandb_dir"])["run"][0]
    assert run["display_name"] == "w" and run["job_type"] == "train"


def test_best_directions_cover_the_headline_metrics():
    """The best values wandb keeps are those of the headline metrics with a registry direction;
    the only headline metric without one is gen/kl (held to a budget, not maximised or
    minimised)."""
    headline = {name for name, m in METRICS.items() if m.headline}
    assert set(BEST) <= headline
    assert headline - set(BEST) == {"gen/kl"}
    assert set(BEST.values()) == {"max", "min"}
    assert all(BEST[n] == "min" for n in BEST if n.endswith("/loss"))


def test_every_split_steps_on_examples_seen_and_samples_at_every_eval(seed_data, tmp_path):
    """The wandb run defines `<split>/*` against examples_seen for every split of the metric
    registry (test/ included), and the test metrics' row carries examples_seen. The gen/samples
    table is logged at every eval step (0, 2, 4, 6 here, as metrics.jsonl's gen/ rows say), and
    the last one holds the same rows as the run's gen_samples.json."""
    cfg = quick_config(seed_data, tmp_path, **{
        "gen_eval.enabled": True, "gen_eval.n_prompts": 4, "gen_eval.max_new_tokens": 4,
        "gen_eval.table_rows": 3, "train.eval_every": 8})
    summary = train(cfg, run_dir=tmp_path / "g")
    records = wandb_records(summary["wandb_dir"])

    globs = {m["glob_name"]: m.get("step_metric") for m in records["metric"] if "glob_name" in m}
    assert set(metrics.SPLITS) == {"eval", "gen", "perf", "test", "train"}
    assert globs == {f"{split}/*": STEP_METRIC for split in metrics.SPLITS}
    history = {h["step"].get("num", 0): h["item"] for h in records["history"]}
    test_rows = [item for item in history.values() if "test/loss" in item]
    assert len(test_rows) == 1 and test_rows[0][STEP_METRIC] == summary["examples_seen"] == 24

    eval_steps = [r["step"] for r in read_metrics(tmp_path / "g") if "gen/kl" in r]
    assert eval_steps == [0, 2, 4, 6]
    table_steps = sorted(s for s, item in history.items() if item.get("gen/samples._type") == "table-file")
    assert table_steps == eval_steps
    last = json.loads((Path(summary["wandb_dir"]) / "files" / history[6]["gen/samples.path"]).read_text())
    on_disk = json.loads((tmp_path / "g" / "gen_samples.json").read_text())
    assert len(on_disk) == 3
    assert [dict(zip(last["columns"], row, strict=True)) for row in last["data"]] == on_disk


def test_study_runs_share_one_wandb_folder_with_unique_names(seed_data, tmp_path):
    """A study of two cells, one search trial each and a seed rerun: every run (and the study's
    summary) is a wandb run in results/<study>/wandb, none in a run directory; the names are
    `<cell>/<slot>`, all different (each cell has a `trial-000`); the group is the study and the
    job type the run's role."""
    from harness.sweep import run_sweep
    from tests.test_sweep import experiment

    sweep = {"study": "s", "grid": {"dpo.beta": [0.1, 0.5]}, "trials": 1, "seeds": 2,
             "search": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-3}}}
    path = experiment(tmp_path, seed_data, sweep, data={"limit": 60, "max_length": 96},
                      train={"max_steps": 1})
    run_sweep(path)

    study = tmp_path / "results" / "s"
    assert not list((study / "runs").glob("*/*/wandb"))
    runs = [wandb_records(d)["run"][0] for d in sorted((study / "wandb").glob("offline-run-*"))]
    names = {r["display_name"]: r for r in runs}
    assert len(names) == len(runs) == 5
    assert set(names) == {"beta=0.1/trial-000", "beta=0.1/seed1", "beta=0.5/trial-000",
                          "beta=0.5/seed1", "s-summary"}
    assert {r["run_group"] for r in runs} == {"s"}
    for name, r in names.items():
        role = "summary" if name == "s-summary" else "seeds" if name.endswith("seed1") else "search"
        assert r["job_type"] == JOB_TYPES[role], name
    assert JOB_TYPES["seeds"] == "seed-rerun" and JOB_TYPES[None] == "train"
