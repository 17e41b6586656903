"""`harness bench` on the tiny 50k-vocabulary model: both paths run on the same batches, the
agreement guard (harness/bench/agree.py) passes a clean run and fires on a wrong prompt mask, a
wrong reduction, a wrong β and an optimizer that does not step, and the report has what README
quotes. (Speed is measured by `make bench`, never asserted here.)"""

import copy
import dataclasses
import json
import math
import subprocess

import pytest
import torch

from harness import data as hdata
from harness import device as hdevice
from harness import generate, packing
from harness import models as hmodels
from harness.bench import agree, cases, cli, gen, measure, memory, paths, trl_path

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
    """The harness path's DPO settings changed after it is built, the notebook's path not."""
    init = paths.HarnessPath.__init__

    def wrong(self, *args, **kwargs):
        init(self, *args, **kwargs)
        dpo = self.settings.dpo.model_copy(update=change)
        self.settings = self.stepper.settings = dataclasses.replace(self.settings, dpo=dpo)

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
    """A harness path that counts prompt tokens (attention_mask where loss_mask belongs, in the
    shared-prompt layout) still gives ln 2 at step 1, but its log-probs differ and the bench
    refuses to report a timing."""
    real = packing.pack
    monkeypatch.setattr(packing, "pack", lambda batch: real(
        {**batch, "loss_mask": batch["attention_mask"].bool() & (torch.arange(
            batch["input_ids"].shape[1]) > 0)}))
    case = cases.CASES["tiny-live-mean"]
    model, bats, cfg, _ = measure.load(case, 24)
    assert paths.make_path("harness", model, cfg, bats).step(*bats[0])[0] == pytest.approx(LN2, abs=1e-6)
    with pytest.raises(agree.PathsDisagree, match=r"policy log-prob .*tolerance 0\.0001") as err:
        _bench("tiny-live-mean")
    harness, rows = err.value.checks
    assert rows.ok and rows.path == "rows"  # the two-row layout, not patched, agrees
    assert not harness.ok and harness.diff > 100 * agree.LOGP_TOLERANCE
    assert harness.naive != pytest.approx(harness.harness, abs=1e-3)


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
    logp, logp_rows, *norms, loss_rows, loss = err.value.checks
    assert logp.ok and logp_rows.ok and loss.ok and loss_rows.ok
    assert {n.path for n in norms} == {"harness", "rows"}
    for norm in norms:
        assert not norm.ok and norm.harness == pytest.approx(2 * norm.naive, rel=1e-5)
        assert norm.diff == pytest.approx(1.0, rel=1e-5)


def test_guard_fires_when_the_optimizer_does_not_step(monkeypatch):
    """A harness path whose optimizer does not step (the run's optimizer_step still clears the
    gradients) agrees on everything before the first update (sum-reduced log-probs included); its loss then stays at ln 2 while the
    notebook's moves, and the guard stops at step 2."""
    init = paths.HarnessPath.__init__

    def no_update(self, *args, **kwargs):  # the run's step, its optimizer's step a no-op
        init(self, *args, **kwargs)
        self.stepper.optimizer.step = lambda *a, **k: None

    monkeypatch.setattr(paths.HarnessPath, "__init__", no_update)
    with pytest.raises(agree.PathsDisagree, match="loss") as err:
        _bench("tiny-live-sum")
    *before, loss_rows, loss = err.value.checks
    assert all(c.ok for c in before) and len(before) == 4  # log-probs and norms of both paths
    for check in (loss_rows, loss):
        assert not check.ok and check.where.startswith("step 2")
        assert check.harness == pytest.approx(LN2, abs=1e-6)
        assert check.diff > 10 * agree.LOSS_TOLERANCE


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
    assert [(c["quantity"], c["path"]) for c in r["agreement"]] == [
        ("policy log-prob", "harness"), ("policy log-prob", "rows"), ("gradient norm", "rows"),
        ("gradient norm", "harness"), ("loss", "rows"), ("loss", "harness")]
    assert all(c["ok"] and 0 <= c["diff"] <= c["tolerance"] for c in r["agreement"])
    checks = {c["quantity"]: c for c in r["agreement"]}
    assert checks["policy log-prob"]["tolerance"] == agree.LOGP_TOLERANCE
    assert checks["loss"]["where"].endswith("the worst of steps 1-3")
    # The shared-prompt path runs each prompt once: fewer positions than the two rows.
    run = {p: r["paths"][p]["tokens_run_per_step"] for p in paths.PATHS}
    assert run["naive"] == run["rows"] == r["tokens_per_step"] > run["harness"]
    assert r["share_prompt_speedup"] > 0
    for p in paths.PATHS:
        assert r["losses"][p][0] == pytest.approx(LN2, abs=1e-6)  # policy = reference
        assert LN2 - r["losses"][p][2] > agree.LOSS_TOLERANCE
        assert r["paths"][p]["tokens_per_s"] > 0 and r["paths"][p]["step_s"] > 0
    assert r["steps"] == 1 and r["warmup"] == 2 and r["cache_build_s"] == 0
    assert r["n_params"] > 6_000_000  # the 50k x 128 embedding is there
    assert report["matmul_flops"] > 0 and report["machine"]["cores"] >= 1
    out = capsys.readouterr().out
    assert "tiny-live-mean: paths agree: harness policy log-prob" in out
    assert "tiny-live-mean: prompt shared / two rows: " in out


def test_cli_refuses_too_few_steps_for_the_guard(capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--cases", "tiny-live-sum", "--steps", "1", "--warmup", "1"])
    assert exc.value.code == 2 and "at least 1 measured step and 3 in all" in capsys.readouterr().err


def test_peak_rss_child_counts_only_itself():
    """The parent holds 2 GiB of touched ballast while the children run: a child that counted its
    parent's memory (ru_maxrss survives fork and exec) would report more than the ballast. The naive
    path's extra is at least its one [B, T-1, V] fp32 log-softmax (16 × 94 × 50,257 × 4 B = 302 MB),
    which the harness path never builds."""
    case = cases.CASES["tiny-live-mean"]
    cfg = cases.run_config(case)
    ballast = torch.ones(2**29)  # 2 GiB of fp32, every page written
    naive = memory.peak_rss_child(case, cfg, "naive", 1)
    harness = memory.peak_rss_child(case, cfg, "harness", 1)
    held = ballast.numel() * 4
    del ballast
    assert harness < held and naive < held, (harness, naive)
    log_softmax = 16 * 94 * 50_257 * 4
    assert naive - harness >= log_softmax, (naive, harness)


def test_child_gets_the_parents_config(monkeypatch):
    """A bench child's job carries the parent's resolved run config (here with a β the seed
    experiment does not have) and the child reads it back equal, without the experiment YAML."""
    case = cases.CASES["tiny-cache-sum"]
    cfg = cases.run_config(case)
    cfg.dpo.beta = 0.37
    sent = {}

    def fake_run(cmd, input, **kwargs):
        sent["cmd"], sent["job"] = cmd, input
        return subprocess.CompletedProcess(cmd, 0, stdout='{"peak_rss": 5}\n', stderr="")

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    assert memory.peak_rss_child(case, cfg, "harness", 2) == 5.0
    assert sent["cmd"][1:] == ["-m", "harness.bench", "--child"]
    monkeypatch.setattr(cases, "SEED_EXPERIMENT", cases.ROOT / "no-such.yaml")
    assert memory.read_job(sent["job"]) == (case, cfg, "harness", 2)


def test_profile_prints_both_paths():
    text = measure.profile_case(cases.CASES["tiny-live-mean"], rows=5)
    assert "tiny-live-mean / harness" in text and "tiny-live-mean / naive" in text
    assert "aten::" in text  # real profiler rows


# ----------------------------------------------------------------------------- bf16 by CPU, TRL


def _cpu_flags(monkeypatch, tmp_path, flags: str):
    """/proc/cpuinfo with these flags (the harness reads a file once per path)."""
    path = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(hdevice, "CPUINFO", path)


def test_bf16_cases_skipped_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    """On an AVX2-only CPU a bf16 case is skipped with the reason (unless --force-bf16), an fp32
    case is not; with AMX (or AVX512-BF16) the bf16 case runs."""
    bf16, fp32 = cases.CASES["tiny-live-mean-bf16"], cases.CASES["tiny-live-mean"]
    _cpu_flags(monkeypatch, tmp_path, "fpu sse2 avx avx2 fma")
    reason = cases.available(bf16)
    isa = torch.backends.cpu.get_cpu_capability()
    assert reason.startswith(f"bf16 emulated on this CPU ({isa}): no AMX or AVX512-BF16")
    assert "--force-bf16" in reason
    assert cases.available(bf16, force_bf16=True) is None and cases.available(fp32) is None
    _cpu_flags(monkeypatch, tmp_path, "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    assert cases.available(bf16) is None
    _cpu_flags(monkeypatch, tmp_path, "avx2 avx512f avx512_bf16")
    assert cases.available(bf16) is None


def test_cli_skips_bf16_and_a_missing_trl_with_their_reasons(monkeypatch, tmp_path, capsys):
    """`--baseline trl` without trl installed and a bf16 case on an AVX2 CPU: both skipped,
    each with its reason (pip install -e '.[trl]'; bf16 emulated), recorded in the report
    with the CPU's capability; no case runs."""
    import importlib.util

    _cpu_flags(monkeypatch, tmp_path, "avx2 fma")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trl" else real_find_spec(name, *a))
    monkeypatch.setattr(cli, "padding_report", lambda: {
        "tokenizer": "t", "file_order": {"padding_fraction": 0.2},
        "length_grouped": {"padding_fraction": 0.05}})
    monkeypatch.setattr(cli, "bench_case", lambda *a: pytest.fail("a skipped case ran"))
    from harness.cli import main

    assert main(["bench", "--cases", "tiny-live-mean-bf16", "--baseline", "trl", "--no-memory",
                 "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert report["skipped"]["baseline trl"] == trl_path.TRL_MISSING
    assert "pip install -e '.[trl]'" in trl_path.TRL_MISSING
    assert report["skipped"]["tiny-live-mean-bf16"].startswith("bf16 emulated on this CPU")
    assert report["machine"]["capability"]["flags"] == [] and report["results"] == []
    err = capsys.readouterr().err
    assert "skip the trl baseline: trl is not installed: pip install -e '.[trl]'" in err


def test_trl_runs_only_the_cases_it_computes():
    """TRL's DPOTrainer sums log-probs over the completion, in fp32 here: mean, prompt-counting
    and bf16 cases get no trl row, each with the reason; the sum cases get one."""
    assert "takes the mean" in trl_path.mismatch(cases.CASES["tiny-live-mean"])
    assert "never counts prompt tokens" in trl_path.mismatch(cases.CASES["tiny-live-mean-unmasked"])
    assert "fp32" in trl_path.mismatch(dataclasses.replace(cases.CASES["tiny-live-sum"], bf16=True))
    assert all(trl_path.mismatch(cases.CASES[name]) is None for name in cases.TRL_CASES)


def test_trl_batches_compared_position_by_position():
    """The first-batch check counts the positions where TRL's collation differs from the
    harness's: none for the same rows, one for a changed token, every one for another width."""
    ids = torch.tensor([[5, 6, 7, 0], [5, 8, 0, 0]])
    attn = (torch.arange(4) < torch.tensor([[3], [2]])).long()
    loss = torch.tensor([[False, True, True, False], [False, True, False, False]])
    harness = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    trl = {"input_ids": ids.clone(), "attention_mask": attn.clone(), "completion_mask": loss.long()}
    assert trl_path.batch_differences(trl, harness) == 0
    trl["input_ids"][1, 1] = 9
    assert trl_path.batch_differences(trl, harness) == 1
    trl["completion_mask"][0, 1] = 0  # a completion token taken for prompt
    assert trl_path.batch_differences(trl, harness) == 2
    wider = {k: torch.nn.functional.pad(v, (0, 1)) for k, v in trl.items()}
    assert trl_path.batch_differences(wider, harness) == 10


@pytest.mark.skipif(trl_path.unavailable() is not None, reason=trl_path.TRL_MISSING)
def test_trl_path_computes_the_harness_step(tmp_path):
    """TRL's DPOTrainer on a tiny model (tiny-xs, the seed data's first two batches, live
    reference, sum): its first collated batch is the harness's, its per-sequence log-probs
    equal the harness's, and its loss after one update (step 2, which has left ln 2 by far more
    than the tolerance at this learning rate) equals the harness path's within 1e-5."""
    case = cases.CASES["tiny-live-sum"]
    cfg, tok, items = cases.load_items(case, 16)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-3})})
    torch.manual_seed(0)
    model = hmodels.build_tiny_model("tiny-xs", len(tok), 1024, tok.eos_token_id, tok.pad_token_id)
    bats = list(hdata.batches(items, list(range(16)), 8, tok.pad_token_id, True, drop_last=True))
    harness = paths.HarnessPath(model, cfg, bats)
    logps = harness.logps(bats[0][1])
    losses = [harness.step(*b)[0] for b in bats]
    tr = trl_path.trainer(case, copy.deepcopy(model), tok, cfg, items, 2, str(tmp_path))
    first = next(iter(tr.get_train_dataloader()))
    assert trl_path.batch_differences(first, bats[0][1]) == 0
    with torch.no_grad():
        trl_logps = torch.cat(tr.compute_ref_log_probs(tr.model, first))
    assert torch.allclose(trl_logps, logps, atol=1e-3, rtol=0)  # sums of ~100 tokens
    tr.train()
    assert tr.step_losses[0] == pytest.approx(LN2, abs=1e-6) and len(tr.step_times) == 2
    assert abs(losses[1] - LN2) > 100 * agree.LOSS_TOLERANCE
    assert tr.step_losses[1] == pytest.approx(losses[1], abs=agree.LOSS_TOLERANCE)


# ----------------------------------------------------------------------------- sampling speed


def test_until_eos_by_hand():
    assert gen.until_eos is generate.until_eos  # the sampler and the bench cut rows alike
    assert gen.until_eos([5, 3, 2, 0, 0], eos_id=2) == [5, 3, 2]
    assert gen.until_eos([5, 3, 4], eos_id=2) == [5, 3, 4]
    assert gen.until_eos([2, 2], eos_id=2) == [2]


def test_gen_times_both_samplers(tmp_path, monkeypatch, capsys):
    """`harness bench --gen` on tiny-s (2 prompts, 4 new tokens, 1 run): both samplers produce
    between 1 and 4 tokens per prompt, and the same tokens (both sample the model's own
    distribution with torch.multinomial from the same seed: a top-k or a temperature in either
    would differ); the ratio is harness over transformers tokens/s; the report and table hold it."""
    real = gen.bench_gen
    monkeypatch.setattr(cli, "bench_gen", lambda names: real(["tiny-s"], 2, 4, 1))
    from harness.cli import main

    assert main(["bench", "--gen", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("bench-gen-*.json")).read_text())
    [r] = report["generation"]
    for name in ("harness", "transformers"):
        assert 2 <= r[name]["tokens"] <= 8 and r[name]["seconds"] > 0
        assert r[name]["tokens_per_s"] == pytest.approx(r[name]["tokens"] / r[name]["seconds"])
    assert r["ratio"] == pytest.approx(r["harness"]["tokens_per_s"] / r["transformers"]["tokens_per_s"])
    assert r["same_samples"] is True
    assert "tiny-s" in capsys.readouterr().out
