"""Where a run's time goes: every phase in summary.json, the phases a run went through non-zero
and the others zero, and together no more than the run's wall time."""

import pytest

from harness import phases
from harness.train import train
from tests.runs import quick_config


def test_phases_account_for_a_run(seed_data, tmp_path):
    cfg = quick_config(seed_data, tmp_path, **{"dpo.reference": "cache", "gen_eval.enabled": True,
                                               "dpo.reference_cache_dir": str(tmp_path / "cache"),
                                               "gen_eval.n_prompts": 2, "gen_eval.max_new_tokens": 4,
                                               "train.save_model": False})
    s = train(cfg, run_dir=tmp_path / "run")
    spent = {name: s[f"perf/phase/{name}_s"] for name in phases.NAMES}
    assert all(spent[n] > 0 for n in ("setup", "reference", "train", "eval", "gen")), spent
    assert spent["sft"] == spent["pairs"] == 0  # file data: no SFT stage, no sampled pairs
    assert sum(spent.values()) <= s["wall_s"] + 0.01


def test_a_phase_outside_a_run_is_not_recorded_and_names_are_checked():
    with phases.phase("train"):
        pass  # no run collecting: nothing to record, no error
    with phases.timing() as spent:
        with phases.phase("gen"):
            pass
    assert set(spent) == set(phases.NAMES) and spent["gen"] >= 0
    with pytest.raises(ValueError, match="unknown phase 'warmup'"):
        with phases.phase("warmup"):
            pass
