"""`harness bench` on the tiny 50k-vocabulary model: both paths run on the same batches, the
agreement guard (harness/bench/agree.py) passes a clean run and fires on a wrong prompt mask, a
wrong reduction, a wrong β and an optimizer that does not step, and the report has what README
quotes. (Speed is measured by `make bench`, never asserted here.)"""

import dataclasses
import json
import math

import pytest
import torch

from harness import step as hstep
from harness.bench import agree, cases, cli, measure, paths

LN2 = math.log(2)
_loaded: dict = {}


@pytest.fixture(autouse=True)
def _needs_seed_data(seed_data):
    """The benchmark reads the seed data through experiments/seed_polite.yaml (../shared):
    without it every test here is skipped with the fixture's reason."""


@pytest.fixture(autouse=True)
def _load_once(monkeypatch):
    """A case's model and batches are built once for this file (the paths copy the model)."""
    real = cases.load

    def load(case, n_pairs):  # the first n_pairs / 8 batches of 24 pairs are those of n_pairs
        if case not in _loaded:
            _loaded[case] = real(case, max(n_pairs, 24))
        model, bats, cfg, n_params = _loaded[case]
        assert n_pairs <= 8 * len(bats)
        return model, bats[: n_pairs // 8], cfg, n_params

    monkeypatch.setattr(measure, "load", load)


def _bench(name: str, steps: int = 1, warmup: int = 2) -> dict:
    return measure.bench_case(cases.CASES[name], steps=steps, warmup=warmup, rate=1e11, memory=False)


def _fault_in_settings(monkeypatch, **change):
    """The harness path's StepSettings changed after it is built, the notebook's path not."""
    init = paths.HarnessPath.__init__

    def wrong(self, *args):
        init(self, *args)
        self.settings = dataclasses.replace(self.settings, **change)

    monkeypatch.setattr(paths.HarnessPath, "__init__", wrong)


def test_naive_logps_equal_harness_logps():
    """The notebook's full log-softmax path and the harness's sliced-head path score the same."""
    from harness.dpo import model_logps

    model, bats, _, _ = measure.load(cases.CASES["tiny-live-mean"], 24)
    _, batch = bats[0]
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    with torch.no_grad():
        for red in ("mean", "sum"):
            a = paths.naive_logps(model, ids, attn, mask, red)
            b = model_logps(model, ids, attn, mask, red)
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), red


def test_guard_fires_on_wrong_prompt_mask(monkeypatch):
    """A harness path that counts prompt tokens (attention_mask where loss_mask belongs) still
    gives ln 2 at step 1, but its log-probs differ and the bench refuses to report a timing."""
    real = hstep.model_logps
    monkeypatch.setattr(hstep, "model_logps",
                        lambda model, ids, attn, mask, red: real(model, ids, attn, attn.bool(), red))
    case = cases.CASES["tiny-live-mean"]
    model, bats, cfg, _ = measure.load(case, 24)
    assert paths.make_path("harness", model, cfg, bats).step(*bats[0]) == pytest.approx(LN2, abs=1e-6)
    with pytest.raises(agree.PathsDisagree, match=r"policy log-prob .*tolerance 0\.0001") as err:
        _bench("tiny-live-mean")
    [check] = err.value.checks
    assert not check.ok and check.diff > 100 * agree.LOGP_TOLERANCE
    assert check.naive != pytest.approx(check.harness, abs=1e-3)


def test_guard_fires_on_wrong_reduction(monkeypatch, tmp_path, capsys):
    """Sum where mean is configured, in the harness path only: `harness bench` exits 1 naming
    the log-prob, both values and the tolerance, and writes no report."""
    _fault_in_settings(monkeypatch, reduction="sum")
    monkeypatch.setattr(cli, "padding_report", lambda: pytest.fail("reached the report"))
    from harness.cli import main

    assert main(["bench", "--cases", "tiny-live-mean", "--steps", "1", "--warmup", "2",
                 "--no-memory", "--out", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert "tiny-live-mean: the harness path disagrees" in message
    assert "policy log-prob (mean, first batch" in message and "tolerance 0.0001" in message
    assert not list(tmp_path.glob("bench-*.json"))


def test_guard_fires_on_wrong_beta(monkeypatch):
    """β doubled in the harness path (here with the cached reference): log-probs agree and step
    1's loss is ln 2 on both, but the first gradient norm is twice the notebook's."""
    beta = measure.load(cases.CASES["tiny-cache-mean"], 24)[2].dpo.beta
    _fault_in_settings(monkeypatch, beta=2 * beta)
    with pytest.raises(agree.PathsDisagree, match="gradient norm") as err:
        _bench("tiny-cache-mean")
    logp, norm, loss = err.value.checks
    assert logp.ok and loss.ok and not norm.ok
    assert norm.harness == pytest.approx(2 * norm.naive, rel=1e-5)
    assert norm.diff == pytest.approx(1.0, rel=1e-5)


def test_guard_fires_when_the_optimizer_does_not_step(monkeypatch):
    """A harness path whose update only clears the gradients agrees on everything before the
    first update (sum-reduced log-probs included); its loss then stays at ln 2 while the
    notebook's moves, and the guard stops at step 2."""
    monkeypatch.setattr(paths.HarnessPath, "update",
                        lambda self: self.opt.zero_grad(set_to_none=True))
    with pytest.raises(agree.PathsDisagree, match="loss") as err:
        _bench("tiny-live-sum")
    *before, loss = err.value.checks
    assert all(c.ok for c in before) and not loss.ok
    assert loss.where.startswith("step 2") and loss.harness == pytest.approx(LN2, abs=1e-6)
    assert loss.diff > 10 * agree.LOSS_TOLERANCE


def test_checks_by_hand():
    """The three comparisons on hand-made values: a `sum` log-prob is compared per counted token,
    the worst row or step is named, nan never passes, and fewer than 3 steps are refused."""
    with pytest.raises(ValueError, match="3 in all"):
        measure.bench_case(cases.CASES["tiny-live-mean"], steps=1, warmup=1, rate=1e11, memory=False)
    naive, harness = torch.tensor([-50.0, -20.0]), torch.tensor([-50.5, -20.0])
    counted = torch.tensor([100, 4])
    summed = agree.logps_check(naive, harness, counted, "sum", 1e-2)
    assert summed.diff == pytest.approx(0.005) and summed.ok  # 0.5 nats over 100 tokens
    mean = agree.logps_check(naive, harness, counted, "mean", 1e-2)
    assert mean.diff == pytest.approx(0.5) and not mean.ok and "chosen row 0" in mean.where
    nan = agree.logps_check(naive, torch.tensor([-50.0, math.nan]), counted, "mean", 1.0)
    assert "rejected row 0" in nan.where and not nan.ok
    assert agree.grad_norm_check(2.0, 2.01, 1e-3).diff == pytest.approx(0.005)
    assert not agree.grad_norm_check(2.0, math.nan, 1e-3).ok
    loss = agree.loss_check([LN2, 0.69, 0.68], [LN2, 0.69, 0.681], 1e-4)
    assert loss.where.startswith("step 3") and loss.diff == pytest.approx(1e-3) and not loss.ok
    err = agree.PathsDisagree("c", [summed, mean])
    assert "naive -50, harness -50.5, difference 0.5 nats per counted token > tolerance 0.01" \
        in str(err) and "0.005" not in str(err)


def test_clean_run_passes_the_guard(tmp_path, monkeypatch, capsys):
    """A clean run through the command line: exit 0; log-probs, the first gradient norm and three
    steps' losses agree within the fp32 tolerances, recorded in the JSON report and the table.
    Step 3's loss has left ln 2 by more than the loss tolerance, so an update that differed by as
    much as the whole move would be seen."""
    monkeypatch.setattr(cli, "padding_report", lambda: {
        "tokenizer": "t", "file_order": {"padding_fraction": 0.2},
        "length_grouped": {"padding_fraction": 0.05}})
    from harness.cli import main

    assert main(["bench", "--cases", "tiny-live-mean", "--steps", "1", "--warmup", "2",
                 "--no-memory", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    r = report["results"][0]
    checks = {c["quantity"]: c for c in r["agreement"]}
    assert list(checks) == ["policy log-prob", "gradient norm", "loss"]
    assert all(c["ok"] and 0 <= c["diff"] <= c["tolerance"] for c in checks.values())
    assert checks["policy log-prob"]["tolerance"] == agree.LOGP_TOLERANCE
    assert checks["loss"]["where"].endswith("the worst of steps 1-3")
    for p in ("naive", "harness"):
        assert r["losses"][p][0] == pytest.approx(LN2, abs=1e-6)  # policy = reference
        assert LN2 - r["losses"][p][2] > agree.LOSS_TOLERANCE
        assert r["paths"][p]["tokens_per_s"] > 0 and r["paths"][p]["step_s"] > 0
    assert r["steps"] == 1 and r["warmup"] == 2 and r["cache_build_s"] == 0
    assert r["n_params"] > 6_000_000  # the 50k x 128 embedding is there
    assert report["matmul_flops"] > 0 and report["machine"]["cores"] >= 1
    assert "tiny-live-mean: paths agree: policy log-prob" in capsys.readouterr().out


def test_cli_refuses_too_few_steps_for_the_guard(capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--cases", "tiny-live-sum", "--steps", "1", "--warmup", "1"])
    assert exc.value.code == 2 and "at least 1 measured step and 3 in all" in capsys.readouterr().err


def test_peak_rss_child_counts_only_itself():
    case = cases.CASES["tiny-live-mean"]
    naive = measure.peak_rss_child(case, "naive", 1)
    harness = measure.peak_rss_child(case, "harness", 1)
    assert 0 < harness < naive  # the naive path materialises [B, T, 50k] log-probs


def test_profile_prints_both_paths():
    text = measure.profile_case(cases.CASES["tiny-live-mean"], rows=5)
    assert "tiny-live-mean / harness" in text and "tiny-live-mean / naive" in text
    assert "aten::" in text  # real profiler rows
