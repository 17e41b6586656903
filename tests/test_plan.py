"""The memory plan (harness plan): its training-state parts equal what a built run holds, its
estimate of a run's peak is within the issue's bound of the measured peak, and a sweep's workers
per GPU follow it."""

import pytest
import torch

from harness import plan
from harness.cli import main
from harness.prepare import prepare
from harness.step import StepSettings
from harness.sweep import supervise
from harness.train import build_models
from tests.runs import SMOKE, quick_config

CASES = [({"train.precision": "fp32"}, "full fp32"),
         ({"train.precision": "bf16"}, "full, bf16 reference"),
         ({"train.precision": "bf16", "model.lora.r": 8}, "LoRA on a bf16 base"),
         ({"train.precision": "fp32", "model.lora.r": 4, "model.lora.target_modules": ["c_attn"]},
          "LoRA on c_attn only")]


@pytest.mark.parametrize(("overrides", "what"), CASES, ids=[c[1] for c in CASES])
def test_plan_counts_the_state_a_built_run_holds(seed_data, tmp_path, overrides, what):
    """From the config alone (a meta-device model), the plan's parameters, trained parameters,
    weights, gradients, optimizer and reference bytes equal those of the models the run builds
    (summary.json's state/*), for full and LoRA runs in fp32 and bf16."""
    cfg = quick_config(seed_data, tmp_path, **overrides)
    p = plan.plan_run(cfg, torch.device("cpu"))
    prep = prepare(cfg, torch.device("cpu"), lambda *a: None)
    info = build_models(cfg, prep, StepSettings.from_config(cfg), torch.device("cpu")).info
    assert (p.n_params, p.n_trainable) == (info["n_params"], info["n_trainable"]), what
    for part in ("weights", "gradients", "optimizer", "reference"):
        assert p.parts[part] / plan.GB == pytest.approx(info[f"state/{part}_gb"], rel=1e-9), part


def test_plan_estimate_is_within_a_quarter_of_the_measured_peak(seed_data, tmp_path):
    """tiny-l, full fp32 training on the seed data at batch 8: the estimated peak is within ±25%
    (or 50 MB) of the peak RSS increase a fresh `harness train` process measures over the same 3
    steps (the estimate does not read the measurement: harness/plan.py's constants)."""
    cfg = plan.quick(quick_config(seed_data, tmp_path, **{
        "model.name": "tiny-l", "data.limit": None, "data.max_length": 512, "train.batch_size": 8,
        "train.precision": "fp32"}), 3)
    estimate = plan.plan_run(cfg, torch.device("cpu")).peak
    measured = plan.measure(cfg, 3)
    assert abs(estimate - measured) <= max(0.25 * measured, 50e6), (estimate / 1e9, measured / 1e9)


def test_harness_plan_prints_each_cell_and_whether_it_fits(seed_data, tmp_path, capsys):
    """`harness plan` on a study prints one row per grid cell (model size x LoRA rank here) with
    its parts and peak, larger for the larger model, and whether it fits the machine."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(SMOKE.read_text().replace("source: https", f"source: {seed_data}\n  #") + """
sweep:
  trials: 1
  grid:
    model.name: [tiny-xs, tiny-m]
    model.lora.r: [0, 8]
  search: {train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-3}}
""")
    assert main(["plan", str(exp), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert set(rows) == {"name=tiny-xs,r=0", "name=tiny-xs,r=8", "name=tiny-m,r=0", "name=tiny-m,r=8"}
    peak = out[1].split().index("peak")
    assert float(rows["name=tiny-m,r=0"][peak]) > float(rows["name=tiny-xs,r=0"][peak])
    assert all(r[peak + 1] == "yes" for r in rows.values())


def test_workers_auto_puts_as_many_runs_on_a_gpu_as_the_plan_allows():
    """--workers auto on 2 GPUs with a plan that fits 3 runs per GPU: 6 workers, round-robin;
    without a plan, one per GPU; a count given by hand is kept."""
    assert supervise.plan_workers("auto", ["0", "1"], lambda: 3) == ["0", "1"] * 3
    assert supervise.plan_workers("auto", ["0", "1"]) == ["0", "1"]
    assert supervise.plan_workers(2, ["0", "1"], lambda: 3) == ["0", "1"]
    p = plan.Plan("x", {"weights": 10e9}, capacity=80e9)
    assert p.per_device() == 7 and p.fits  # 90% of 80 GB over 10 GB
    assert plan.Plan("y", {"weights": 90e9}, capacity=80e9).fits is False
