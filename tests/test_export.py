"""A finished run is a Hugging Face model directory: a fresh process loads it with
from_pretrained (weights, tokenizer, chat template) and generates; its card names the run."""

import json
import subprocess
import sys

from harness.train import train
from tests.runs import quick_config

LOAD_AND_GENERATE = """
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d).eval()
text = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                               add_generation_prompt=True)
ids = tok(text, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"new_tokens": out.shape[1] - ids.shape[1], "dtype": str(model.dtype),
                  "logit": model(ids).logits[0, -1, :3].tolist()}))
"""


def _load_in_fresh_process(model_dir) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(model_dir)], capture_output=True,
                         text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_saved_run_loads_with_from_pretrained_in_a_fresh_process_and_generates(seed_data, tmp_path):
    """train.save_model: <run>/model holds config, safetensors, tokenizer with its chat template and
    a model card; a new process loads it with Auto*.from_pretrained, generates 5 tokens, and its
    logits are the trained policy's (not the untrained start's)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = quick_config(seed_data, tmp_path, **{"train.save_model": True, "train.max_steps": 3,
                                               "train.precision": "fp32", "train.lr": 1e-2})
    summary = train(cfg, run_dir=tmp_path / "run")
    d = tmp_path / "run" / "model"
    assert summary["model_dir"] == str(d)
    card = (d / "README.md").read_text()
    assert "base_model: tiny-xs" in card and "beta 0.1" in card and "| eval/loss |" in card
    got = _load_in_fresh_process(d)
    assert got["new_tokens"] == 5 and got["dtype"] == "torch.float32"
    # The same logits in this process: the directory holds the trained weights.
    from harness.prepare import prepare
    from harness.train import start_model

    model = AutoModelForCausalLM.from_pretrained(d).eval()
    start, _ = start_model(cfg, prepare(cfg, torch.device("cpu"), lambda *a: None), "cpu")
    ids = torch.tensor([[5, 6, 7]])
    assert not torch.allclose(model(ids).logits, start(ids).logits)


def test_lora_run_merged_export_loads_without_peft_in_a_fresh_process(seed_data, tmp_path):
    """A LoRA run's <run>/model/merged is a plain transformers directory with its tokenizer: a
    fresh process loads and generates from it."""
    cfg = quick_config(seed_data, tmp_path, **{"train.save_model": True, "train.max_steps": 2,
                                               "model.lora.r": 4, "train.precision": "fp32"})
    train(cfg, run_dir=tmp_path / "run")
    d = tmp_path / "run" / "model"
    assert json.loads((d / "adapter_config.json").read_text())["r"] == 4
    assert "library_name: peft" in (d / "README.md").read_text()
    assert _load_in_fresh_process(d / "merged")["new_tokens"] == 5
