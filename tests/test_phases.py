"""Where a run's time goes: every phase in summary.json, the phases a run went through non-zero
and the others zero, and together no more than the run's wall time."""

import time

import pytest

from harness import phases
from harness.train import train
from tests.runs import quick_config

SLACK = 0.5  # seconds a loaded 2-core CI machine may add to a sleep; the lower bounds are exact


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
    with pytest.raises(ValueError, match="unknown phase 'warmup'"):
        with phases.phase("warmup"):
            pass


def test_phases_add_up_what_was_spent_and_setup_is_the_rest():
    """Known sleeps: each phase gets at least its own sleeps (summed over entries), phases it never
    entered stay exactly 0, and setup is the time outside every phase."""
    with phases.timing() as spent:
        time.sleep(0.03)  # setup
        with phases.phase("gen"):
            time.sleep(0.05)
        with phases.phase("eval"):
            time.sleep(0.02)
        with phases.phase("gen"):
            time.sleep(0.05)
    assert 0.10 <= spent["gen"] < 0.10 + SLACK, spent
    assert 0.02 <= spent["eval"] < 0.02 + SLACK, spent
    assert 0.03 <= spent["setup"] < 0.03 + SLACK, spent
    assert all(spent[n] == 0 for n in ("sft", "pairs", "reference", "train")), spent
    assert phases.summary_keys(spent)["perf/phase/gen_s"] == round(spent["gen"], 3)


def test_a_phase_that_raises_still_counts():
    with phases.timing() as spent:
        with pytest.raises(RuntimeError):
            with phases.phase("train"):
                time.sleep(0.02)
                raise RuntimeError("step failed")
    assert spent["train"] >= 0.02
