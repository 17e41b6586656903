"""Configuration: every experiment file validates; bad values are errors naming file and field."""

from pathlib import Path

import pytest

from harness.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_every_experiment_file_validates():
    """All experiments/**/*.yaml (recursively) load into a RunConfig."""
    files = sorted((ROOT / "experiments").rglob("*.yaml"))
    assert files, "no experiment files found"
    for f in files:
        assert isinstance(load_config(f), RunConfig), f


@pytest.mark.parametrize(
    "text,needle",
    [
        ("dpo:\n  betta: 0.1\n", "dpo.betta: unknown key"),
        ("dpo:\n  beta: -0.1\n", "dpo.beta"),
        ("dpo:\n  beta: 0\n", "beta must be > 0"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("dpo:\n  loss: kto\n", "valid: apo_zero, dpop, hinge, ipo, robust, sigmoid, simpo"),
        ("dpo:\n  reduction: median\n", "dpo.reduction"),
        ("data:\n  split: [0.5, 0.1, 0.1]\n", "data.split"),
        ("train:\n  batch_size: 0\n", "train.batch_size"),
        ("colour: blue\n", "colour: unknown key"),
    ],
)
def test_bad_values_name_file_and_field(tmp_path, text, needle):
    """Each mistake is reported with the file path and the dotted field."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_overrides_and_relative_paths(tmp_path):
    """--set values are typed like YAML; relative data paths resolve against the YAML's folder."""
    (tmp_path / "pairs.jsonl").write_text("")
    path = write(tmp_path, "data:\n  source: pairs.jsonl\n")
    cfg = load_config(path, {"dpo.beta": 0.3, "train.max_steps": 5, "dpo.mask_prompt": False})
    assert cfg.dpo.beta == 0.3 and cfg.train.max_steps == 5 and cfg.dpo.mask_prompt is False
    assert cfg.data.source == str(tmp_path / "pairs.jsonl")


def test_missing_file_and_bad_yaml(tmp_path):
    """A missing file or broken YAML is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "dpo: [beta: 0.1\n"))
