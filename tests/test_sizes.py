"""experiments/sizes.yaml, the model-size axis on real checkpoints, offline: its grid as a GPU user
runs it, the plan of its real shapes (config only, no weights), and the whole sweep end to end on
random-init models of those shapes scaled down."""

import json

import pandas as pd
import torch
import yaml

from harness import plan
from harness.config import load_experiment
from harness.models import train_tokenizer
from harness.sweep.supervise import run_sweep
from tests.runs import ROOT

SIZES = ROOT / "experiments" / "sizes.yaml"
# SmolLM2-Instruct's published shapes (config.json of each hub id)
SHAPES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(hidden_size=576, intermediate_size=1536,
                                                num_hidden_layers=30, num_attention_heads=9,
                                                num_key_value_heads=3),
    "HuggingFaceTB/SmolLM2-360M-Instruct": dict(hidden_size=960, intermediate_size=2560,
                                                num_hidden_layers=32, num_attention_heads=15,
                                                num_key_value_heads=5),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": dict(hidden_size=2048, intermediate_size=8192,
                                                num_hidden_layers=24, num_attention_heads=32,
                                                num_key_value_heads=32),
}


def _llama_dir(path, shape: dict, vocab: int, tokenizer=None, weights: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, **shape)
    path.mkdir(parents=True)
    if weights:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        config.save_pretrained(path)
    return str(path)


def _seed_texts(seed_data) -> list[str]:
    records = json.loads(seed_data.read_text())
    return [r[k] for r in records for k in ("instruction", "input", "chosen", "rejected") if r.get(k)]


def _with_models(tmp_path, names: dict[str, str], seed_data, **extra) -> str:
    raw = yaml.safe_load(SIZES.read_text())
    text = json.dumps(raw)
    for hub, local in names.items():
        text = text.replace(hub, local)
    raw = json.loads(text)
    raw["data"]["source"] = str(seed_data)
    for dotted, value in extra.items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    out = tmp_path / "sizes.yaml"
    out.write_text(yaml.safe_dump(raw))
    return str(out)


def test_sizes_grid_trains_the_small_models_fully_and_the_largest_with_lora():
    """The experiment as a GPU user runs it: 3 sizes x 2 betas, hub ids, LoRA r 16 on the 1.7B
    model only, its learning-rate range an adapter's."""
    exp = load_experiment(SIZES)
    cells = {dict(c.values)["model.name"]: dict(c.values)["model.lora.r"] for c in exp.cells}
    assert cells == {"HuggingFaceTB/SmolLM2-135M-Instruct": 0, "HuggingFaceTB/SmolLM2-360M-Instruct": 0,
                     "HuggingFaceTB/SmolLM2-1.7B-Instruct": 16}
    assert len(exp.cells) == 6
    lora_cell = next(c for c in exp.cells if dict(c.values)["model.lora.r"] == 16)
    assert exp.space(lora_cell)["train.lr"].low >= 5e-5


def test_plan_of_the_real_shapes_puts_the_lora_cell_where_full_training_would_not_fit(tmp_path, seed_data):
    """From the published configs alone (no weights): in bf16 on a 24 GB GPU every cell of the
    study fits, while training the 1.7B model's every weight would not."""
    dirs = {hub: _llama_dir(tmp_path / hub.split("/")[-1], shape, 49152)
            for hub, shape in SHAPES.items()}
    exp = _with_models(tmp_path, dirs, seed_data, **{"model.tokenizer": None})
    # a byte-level BPE of 8k tokens on the seed texts: about as many tokens a pair as SmolLM2's own
    tok = train_tokenizer(_seed_texts(seed_data), 8192)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    cuda = torch.device("cuda")
    plans = {label: plan.plan_run(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"tokenizer": str(tok_dir)})}), cuda, 24e9)
        for label, cfg in plan.runs_of(exp, {"train.precision": "bf16"})}
    peaks = {k.split("-")[-2]: round(p.peak / 1e9, 1) for k, p in plans.items()}
    assert len(plans) == 6 and all(p.fits for p in plans.values()), peaks
    big = next(p for k, p in plans.items() if "1.7B" in k)
    assert 1.6e9 < big.n_params < 1.8e9 and big.n_trainable < 0.02 * big.n_params
    _, cfg = next((k, c) for k, c in plan.runs_of(exp, {"train.precision": "bf16"}) if "1.7B" in k)
    full = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "tokenizer": str(tok_dir), "lora": cfg.model.lora.model_copy(update={"r": 0})})})
    assert not plan.plan_run(full, cuda, 24e9).fits


def test_sizes_sweep_runs_end_to_end_on_scaled_down_shapes(tmp_path, seed_data, capfd):
    """The whole study, offline, on random-init models of the three shapes scaled down (4 layers,
    1/8 of the width, a 512-token vocabulary): every cell finishes, the 1.7B-shaped cell trains
    LoRA adapters only, wandb takes every run (its tags shortened to 64 characters), and
    summary.csv has a row per cell."""
    tok = train_tokenizer(_seed_texts(seed_data), 512)
    dirs = {}
    for hub, shape in SHAPES.items():
        small = {k: max(1, v // 8) if k != "num_hidden_layers" else 2 for k, v in shape.items()}
        small["hidden_size"] = small["num_attention_heads"] * 8
        small["num_key_value_heads"] = min(small["num_key_value_heads"], small["num_attention_heads"])
        while small["num_attention_heads"] % small["num_key_value_heads"]:
            small["num_key_value_heads"] -= 1
        dirs[hub] = _llama_dir(tmp_path / hub.split("/")[-1], small, len(tok), tok, weights=True)
    exp = _with_models(tmp_path, dirs, seed_data, **{
        "data.limit": 80, "data.max_length": 128, "train.max_steps": 2, "train.eval_every": 8,
        "train.eval_batches": 1, "train.batch_size": 4, "train.precision": "fp32",
        "tracking.results_dir": str(tmp_path / "results"), "sweep.trials": 1, "sweep.seeds": 1})
    df = pd.read_csv(run_sweep(exp))
    assert "wandb init failed" not in capfd.readouterr().err
    assert len(df) == 6 and (df["trials"] == 1).all()
    runs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "sizes").glob("runs/*/*/summary.json")]
    assert len(runs) == 6 and all(r["status"] == "finished" for r in runs)
    lora = [r for r in runs if "1.7B" in r["model_source"]]
    assert len(lora) == 2 and all(0 < r["n_trainable"] < r["n_params"] for r in lora)
    assert all(r["n_trainable"] == r["n_params"] for r in runs if "1.7B" not in r["model_source"])
