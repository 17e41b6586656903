"""`harness bench` on the tiny 50k-vocabulary model: both paths run on the same batches, their
first-step losses agree, and the report has what README quotes. (Speed is measured by
`make bench`, never asserted here.)"""

import json

import pytest
import torch

from harness.bench import cases, cli, measure, paths


@pytest.fixture(autouse=True)
def _needs_seed_data(seed_data):
    """The benchmark reads the seed data through experiments/seed_polite.yaml (../shared):
    without it every test here is skipped with the fixture's reason."""


def test_naive_logps_equal_harness_logps():
    """The notebook's full log-softmax path and the harness's sliced-head path score the same."""
    from harness.dpo import model_logps

    case = cases.CASES["tiny-live-mean"]
    model, bats, cfg, _ = cases.load(case, 8)
    _, batch = bats[0]
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    with torch.no_grad():
        for red in ("mean", "sum"):
            a = paths.naive_logps(model, ids, attn, mask, red)
            b = model_logps(model, ids, attn, mask, red)
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), red


@pytest.mark.parametrize("name", ["tiny-live-mean", "tiny-cache-mean"])
def test_bench_case_runs_and_checks_losses(name):
    rate = measure.matmul_rate(n=256, repeats=3)
    r = measure.bench_case(cases.CASES[name], steps=1, warmup=1, rate=rate, memory=False)
    assert r["first_loss_abs_diff"] <= cases.LOSS_TOLERANCE
    assert r["first_loss"]["naive"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference
    for p in ("naive", "harness"):
        assert r["paths"][p]["tokens_per_s"] > 0 and r["paths"][p]["step_s"] > 0
    assert r["n_params"] > 6_000_000  # the 50k x 128 embedding is there
    if name == "tiny-cache-mean":
        assert r["cache_build_s"] > 0


def test_bench_fails_when_paths_disagree(monkeypatch):
    """A harness path that computed something else (here: a loss off by 0.01) is caught."""
    real = paths.HarnessPath.step

    def wrong(self, idx, batch):
        return real(self, idx, batch) + 0.01

    monkeypatch.setattr(paths.HarnessPath, "step", wrong)
    with pytest.raises(RuntimeError, match="first-step losses differ"):
        measure.bench_case(cases.CASES["tiny-live-mean"], steps=1, warmup=0, rate=1e11, memory=False)


def test_cli_writes_report(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "padding_report", lambda: {
        "tokenizer": "t", "file_order": {"padding_fraction": 0.2},
        "length_grouped": {"padding_fraction": 0.05}})
    from harness.cli import main

    assert main(["bench", "--cases", "tiny-live-sum", "--steps", "1", "--warmup", "0",
                 "--no-memory", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert report["results"][0]["case"]["reduction"] == "sum"
    assert report["matmul_flops"] > 0 and report["machine"]["cores"] >= 1


def test_peak_rss_child_counts_only_itself():
    case = cases.CASES["tiny-live-mean"]
    naive = measure.peak_rss_child(case, "naive", 1)
    harness = measure.peak_rss_child(case, "harness", 1)
    assert 0 < harness < naive  # the naive path materialises [B, T, 50k] log-probs


def test_profile_prints_both_paths():
    text = measure.profile_case(cases.CASES["tiny-live-mean"], rows=5)
    assert "tiny-live-mean / harness" in text and "tiny-live-mean / naive" in text
    assert "aten::" in text  # real profiler rows
