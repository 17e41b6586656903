"""Precision is part of the experiment: $DPO_HARNESS_PRECISION overrides `auto` for a process,
every run records what it computed in and what the machine does natively, a study keeps one
precision wherever it is continued, and analysis never pools bf16 with fp32 runs. Also: the
samples' reference is the frozen start (the SFT checkpoint), not the base model."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from harness import device as hd
from harness import models as hm
from harness.sweep.estimate import estimate as _estimate
from harness.train import train
from tests.runs import quick_config
from tests.test_models import AMX_FLAGS, AVX2_FLAGS, _cpuinfo


def test_the_variable_overrides_auto_only(monkeypatch, tmp_path):
    """DPO_HARNESS_PRECISION=bf16 makes `auto` bf16 on an AVX2 CPU, =fp32 makes it fp32 on an
    AMX one and on cuda; a config that names its precision keeps it; a wrong value is an error
    naming the variable; unset, `auto` is the machine's choice again."""
    cpu = torch.device("cpu")
    _cpuinfo(monkeypatch, tmp_path, AVX2_FLAGS)
    monkeypatch.setenv(hd.PRECISION_ENV, "bf16")
    assert hd.resolve_precision(cpu, "auto") == "bf16"
    assert hd.resolve_precision(cpu, "fp32") == "fp32"
    with hd.autocast(cpu, "auto"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    _cpuinfo(monkeypatch, tmp_path, AMX_FLAGS)
    monkeypatch.setenv(hd.PRECISION_ENV, " FP32 ")
    assert hd.resolve_precision(cpu, "auto") == "fp32"
    assert hd.resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hd.resolve_precision(torch.device("cuda"), "auto") == "fp32"
    monkeypatch.setenv(hd.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=r"\$DPO_HARNESS_PRECISION='fp16': expected one of fp32, bf16"):
        hd.resolve_precision(cpu, "auto")
    monkeypatch.delenv(hd.PRECISION_ENV)
    assert hd.resolve_precision(cpu, "auto") == "bf16"  # AMX flags


def test_the_record_says_what_computed_and_why(monkeypatch, tmp_path):
    """precision_record: the resolved precision, the setting, where the choice came from (config,
    env, auto), whether bf16 is native, and on a CPU its ISA and bf16 flags."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(hd.PRECISION_ENV, raising=False)
    _cpuinfo(monkeypatch, tmp_path, AVX2_FLAGS)
    r = hd.precision_record(cpu, "auto")
    assert (r["precision"], r["precision_setting"], r["precision_source"], r["bf16_native"]) == \
        ("fp32", "auto", "auto", False)
    assert r["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and r["cpu_bf16_flags"] is None
    assert hd.describe_precision(r) == f"fp32 (auto: bf16 emulated, {r['cpu_isa']})"
    assert hd.precision_record(cpu, "bf16")["precision_source"] == "config"
    _cpuinfo(monkeypatch, tmp_path, AMX_FLAGS)
    r = hd.precision_record(cpu, "auto")
    assert (r["precision"], r["bf16_native"]) == ("bf16", True) and "amx_bf16" in r["cpu_bf16_flags"]
    monkeypatch.setenv(hd.PRECISION_ENV, "fp32")
    assert hd.precision_record(cpu, "auto")["precision_source"] == "env"


def test_every_run_records_its_precision(seed_data, tmp_path, monkeypatch):
    """summary.json of a run says what it computed in, as configured and resolved, and the CPU's
    capability (the real one of this machine), finished or cut off."""
    monkeypatch.setenv(hd.PRECISION_ENV, "bf16")
    s = train(quick_config(seed_data, tmp_path, **{"train.max_steps": 2}), run_dir=tmp_path / "a")
    cap = hd.capability(torch.device("cpu"))
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    for summary in (s, on_disk):
        assert (summary["precision"], summary["precision_setting"], summary["precision_source"]) == \
            ("bf16", "auto", "env")
        assert summary["bf16_native"] == cap["bf16_native"] and summary["cpu_isa"] == cap["isa"]

    def stop(step, values):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(quick_config(seed_data, tmp_path, **{"train.precision": "fp32"}),
              run_dir=tmp_path / "b", on_eval=stop)
    cut = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert (cut["status"], cut["precision"], cut["precision_source"]) == ("interrupted", "fp32", "config")


def test_samples_reference_is_the_sft_checkpoint_when_the_reference_is_cached(seed_data, tmp_path,
                                                                              monkeypatch):
    """With an SFT stage, `dpo.reference: cache`, no generation metrics and samples asked for,
    the samples' "reference" column comes from the SFT checkpoint (the run's real reference),
    not from the configured base model."""
    from harness import samples
    from harness.reference import weights_digest
    from harness.sft import load_checkpoint

    seen = []
    real = samples.side_by_side

    def spy(policy, reference, *args, **kwargs):
        seen.append(weights_digest(reference))
        return real(policy, reference, *args, **kwargs)

    monkeypatch.setattr(samples, "side_by_side", spy)
    cfg = quick_config(seed_data, tmp_path, **{
        "sft.enabled": True, "sft.field": "output", "sft.steps": 3, "sft.batch_size": 4,
        "dpo.reference": "cache", "dpo.reference_cache_dir": str(tmp_path / "cache"),
        "gen_eval.enabled": False, "train.sample_validation": 1, "train.sample_test": 0,
        "train.sample_max_new_tokens": 4, "train.max_steps": 2, "train.save_model": False})
    s = train(cfg, run_dir=tmp_path / "r")
    sft = load_checkpoint(s["sft/checkpoint"])
    assert seen == [weights_digest(sft)]
    base, _ = hm.load_model(cfg.model, sft_tokenizer(tmp_path / "r"), cfg.data.max_length)
    assert weights_digest(base) != seen[0]  # the base model would have been the wrong one


def sft_tokenizer(run_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / "tokenizer")


# ----------------------------------------------------------------------------- a study's precision


def trial(value, precision):
    return SimpleNamespace(value=value, user_attrs={"run_dir": f"/r/{value}", "precision": precision})


def test_an_estimate_counts_only_runs_in_the_study_precision():
    """Reruns computed in another precision (or with none recorded: an older harness) are left
    out of the cell's estimate and counted in other_precision."""
    done = [trial(0.5, "bf16"), trial(0.7, "bf16"), trial(9.0, "fp32"), trial(8.0, None)]
    out = _estimate(trial(0.9, "bf16"), done, seeds=5, precision="bf16")
    assert (out["estimate_n"], out["other_precision"]) == (2, 2)
    assert out["objective_mean"] == pytest.approx(0.6) and out["run_dirs"] == "/r/0.5;/r/0.7"
    assert _estimate(trial(0.9, "bf16"), done, seeds=5)["estimate_n"] == 4  # no study precision


@pytest.mark.slow
def test_a_study_keeps_its_precision_where_it_is_continued(seed_data, tmp_path, monkeypatch, capsys):
    """A study started where `auto` is fp32 and continued where it is bf16 keeps fp32: its later
    runs compute in fp32 (config.json and summary.json say so), the sweep says why, summary.csv
    names the precision; an experiment that asks for bf16 explicitly is refused, naming both."""
    import yaml

    from harness.sweep import run_sweep
    from harness.sweep.study import PrecisionMismatch
    from tests.test_sweep import experiment

    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = experiment(tmp_path, seed_data, {"grid": {"dpo.beta": [0.1, 0.5]}, "trials": 1, "seeds": 1})
    storage = str(tmp_path / "journal.log")
    monkeypatch.setenv(hd.PRECISION_ENV, "fp32")
    raw = yaml.safe_load(path.read_text())
    raw["sweep"]["grid"]["dpo.beta"] = [0.1]  # the first machine runs one cell
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(raw))
    run_sweep(first, storage=storage)

    monkeypatch.setenv(hd.PRECISION_ENV, "bf16")
    capsys.readouterr()
    out = run_sweep(path, storage=storage)
    assert "study t computes in fp32 (the precision of its first runs): its runs keep fp32 here, " \
           "where $DPO_HARNESS_PRECISION=bf16 would pick bf16" in capsys.readouterr().err
    runs = sorted((tmp_path / "results" / "t" / "runs").glob("*/*/summary.json"))
    assert len(runs) == 2
    for summary in runs:
        assert json.loads(summary.read_text())["precision"] == "fp32"
        assert json.loads((summary.parent / "config.json").read_text())["train"]["precision"] == "fp32"
    table = pd.read_csv(out)
    assert list(table["precision"]) == ["fp32", "fp32"] and list(table["estimate_n"]) == [1, 1]

    raw["sweep"]["grid"]["dpo.beta"] = [0.1, 0.5]
    raw["train"]["precision"] = "bf16"
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(yaml.safe_dump(raw))
    with pytest.raises(PrecisionMismatch, match=r"study t computes in fp32 .* asks train.precision: bf16"):
        run_sweep(explicit, storage=storage)


# ----------------------------------------------------------------------------- analysis


def test_analysis_never_pools_precisions(tmp_path):
    """One cell whose runs came from a bf16 and an fp32 machine: the results table has a row per
    precision (n 2 each, never one row of 4), the findings compare β only within a precision
    and open with what the runs computed in."""
    from analysis.findings import findings
    from analysis.table import results_table
    from tests.test_analysis import _write_study

    results = tmp_path / "results"
    (results / "p").mkdir(parents=True)
    _write_study(results, "p", {
        "lo": ({}, [(1.0, 0.50), (1.0, 0.52), (1.0, 0.30), (1.0, 0.32)], set()),
        "hi": ({"beta": 0.5}, [(1.0, 0.40), (1.0, 0.42), (1.0, 0.40), (1.0, 0.42)], set())})
    for summary in results.rglob("summary.json"):
        s = json.loads(summary.read_text())
        bf16 = summary.parent.name in ("seed1", "seed2")
        s.update({"precision": "bf16" if bf16 else "fp32", "bf16_native": bf16, "device": "cpu",
                  "cpu_isa": "AVX512" if bf16 else "AVX2"})
        summary.write_text(json.dumps(s))
    table = results_table(results)
    assert list(table["precision"]) == ["bf16", "fp32", "bf16", "fp32"]
    assert list(table["n"]) == [2, 2, 2, 2]
    assert list(table["objective mean"]) == pytest.approx([0.51, 0.31, 0.41, 0.41])
    text = findings(results)
    assert "Precision: bf16 (4 runs; cpu AVX512, native bf16); fp32 (4 runs; cpu AVX2, bf16 " \
           "emulated) (each precision compared only with itself)" in text
    beta = [line for line in text.splitlines() if " − β " in line]
    assert len(beta) == 2 and any("bf16" in b for b in beta) and any("fp32" in b for b in beta)
    # Pooled, β 0.1 would be 0.41 against 0.41; apart, bf16 says β 0.1 is better, fp32 the other.
    assert any("bf16" in b and "β 0.1 is better" in b for b in beta)
    assert any("fp32" in b and "β 0.5 is better" in b for b in beta)
