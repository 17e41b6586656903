"""Configuration: every experiment file validates; bad values are errors naming file and field;
a study's grid may be a list of grids whose cells are the union of their products."""

from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, RunConfig, load_config, load_experiment

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
        ("dpo:\n  loss: kto\n", "valid: apo_zero, dpop, hinge, ipo, robust, sft, sigmoid, simpo"),
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


# ----------------------------------------------------------------------------- lists of grids

LR = {"type": "log_float", "low": 1.0e-5, "high": 1.0e-4}


def study(tmp_path, **sweep) -> Path:
    """A study file: summed, prompt-masked log-probs in the base (as the DPO paper) and `sweep`."""
    raw = {"name": "s", "dpo": {"reduction": "sum", "mask_prompt": True}, "sweep": sweep}
    return write(tmp_path, yaml.safe_dump(raw, sort_keys=False))


def test_a_list_of_grids_is_the_union_of_their_products(tmp_path):
    """Three grids give 1 + 2 + 1 cells, in order, with ids `axis=value,...`; the ipo grid is valid
    only with its own masking axis (ipo refuses the base's summed log-probs), and its cell's runs
    get that masking."""
    exp = load_experiment(study(tmp_path, grid=[
        {"dpo.loss": ["sft"]},
        {"dpo.loss": ["sigmoid"], "dpo.beta": [0.1, 0.5]},
        {"dpo.loss": ["ipo"], "masking": ["masked-mean"], "dpo.beta": [0.2]},
    ]))
    assert [c.id for c in exp.cells] == ["loss=sft", "loss=sigmoid,beta=0.1", "loss=sigmoid,beta=0.5",
                                         "loss=ipo,masking=masked-mean,beta=0.2"]
    ipo = exp.run_config(exp.cells[3], {}, 0, "r", [])
    assert (ipo.dpo.loss, ipo.dpo.reduction, ipo.dpo.beta) == ("ipo", "mean", 0.2)
    assert exp.run_config(exp.cells[0], {}, 0, "r", []).dpo.reduction == "sum"
    with pytest.raises(ConfigError, match=r"(?s)sweep.grid\[0\].dpo.loss\[0\].*set dpo.reduction: mean"):
        load_experiment(study(tmp_path, grid=[{"dpo.loss": ["ipo"]}]))


def test_a_single_grid_is_one_product(tmp_path):
    """A mapping (not a list) stays one grid: the product of its axes, 2 x 2 cells."""
    exp = load_experiment(study(tmp_path, grid={"dpo.beta": [0.1, 0.5],
                                                "masking": ["masked-sum", "masked-mean"]}))
    assert exp.spec.grids == [exp.spec.grid]
    assert [c.id for c in exp.cells] == [
        "beta=0.1,masking=masked-sum", "beta=0.1,masking=masked-mean",
        "beta=0.5,masking=masked-sum", "beta=0.5,masking=masked-mean"]


@pytest.mark.parametrize(
    "grid,needle",
    [
        ([{"dpo.beta": [0.1, 0.5]}, {"dpo.beta": [0.5]}],
         "sweep.grid[1]: cell beta=0.5 duplicates cell beta=0.5 of sweep.grid[0] (the same id)"),
        ([{"dpo.loss": ["sigmoid"], "dpo.beta": [0.1]}, {"dpo.beta": [0.1], "dpo.loss": ["sigmoid"]}],
         "sweep.grid[1]: cell beta=0.1,loss=sigmoid duplicates cell loss=sigmoid,beta=0.1 of "
         "sweep.grid[0] (the same values)"),
        ({"dpo.beta": [0.1, 0.1]}, "sweep.grid: cell beta=0.1 duplicates cell beta=0.1 of sweep.grid"),
        ([{"dpo.beta": [0.1]}, {"dpo.beta": [-1]}], "sweep.grid[1].dpo.beta[0]"),
        ([{"dpo.beta": [0.1]}, {"masking": ["masked-median"]}], "sweep.grid[1].masking[0]"),
        ([{"dpo.beta": [0.1]}, {"dpo.beta": []}], "sweep.grid.1.dpo.beta: List should have at least 1"),
        ([], "sweep.grid: List should have at least 1 item"),
    ],
)
def test_bad_grids_name_the_grid(tmp_path, grid, needle):
    """A cell that appears twice (same id, or the same values under another axis order) names
    both grids; a bad value or an empty axis names its grid's index; an empty list is refused."""
    path = study(tmp_path, grid=grid)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_search_by_on_a_list_of_grids(tmp_path):
    """search_by may name an axis of any grid and a value any grid gives it: the sft cell gets its
    own learning-rate range, the others keep `search`'s; an axis or value of no grid is refused."""
    wide = {"type": "log_float", "low": 1.0e-4, "high": 1.0e-2}
    grid = [{"dpo.loss": ["sft"]}, {"dpo.beta": [0.1, 0.5]}]
    exp = load_experiment(study(tmp_path, grid=grid, search={"train.lr": LR},
                                search_by={"dpo.loss": {"sft": {"train.lr": wide}}}))
    assert [exp.space(c)["train.lr"].high for c in exp.cells] == [1.0e-2, 1.0e-4, 1.0e-4]
    for search_by, needle in [
        ({"masking": {"masked-sum": {"train.lr": wide}}}, "sweep.search_by.masking: not a grid axis "
                                                          "(grid: dpo.loss, dpo.beta)"),
        ({"dpo.loss": {"ipo": {"train.lr": wide}}}, "sweep.search_by.dpo.loss.ipo: not a value"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            load_experiment(study(tmp_path, grid=grid, search={"train.lr": LR}, search_by=search_by))
