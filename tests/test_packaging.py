"""Packaging: pyproject's lower bounds cover every library feature the code relies on, the installed
versions satisfy them, and each feature is called here, so a too-old install fails with a message
that names the package, the feature and the version that brought it."""

import importlib.metadata
import pickle
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# package -> (first version with the feature, the feature, where the code uses it)
FEATURES = {
    "torch": ("2.6", "torch.load weights-only by default", "harness/reference.py"),
    "transformers": ("4.56", "from_pretrained(dtype=...)", "harness/models.py, harness/sft.py"),
    "wandb": ("0.19.9", 'wandb.init(reinit="finish_previous")', "harness/tracking.py"),
    "optuna": ("4.9", "RetryHeartbeatStaleTrialCallback / heartbeat_stale_trial_callback",
               "harness/sweep/storage.py"),
}


def dependencies() -> dict[str, Requirement]:
    """pyproject.toml's [project] dependencies by package name (the installed metadata's on
    Python 3.10, which has no tomllib)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        lines = importlib.metadata.requires("dpo-harness") or []
        reqs = [Requirement(x) for x in lines]
        return {r.name: r for r in reqs if r.marker is None}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def floor(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(lows) if lows else None


@pytest.mark.parametrize("package", sorted(FEATURES))
def test_pyproject_floor_covers_the_feature(package):
    """Each relied-on feature's first version is at most pyproject's lower bound."""
    needed, feature, where = FEATURES[package]
    req = dependencies()[package]
    assert floor(req) is not None and floor(req) >= Version(needed), (
        f"pyproject.toml has {req}, but {where} uses {feature}, which needs {package}>={needed}")


def test_installed_versions_satisfy_pyproject():
    """Every dependency in this environment is at least pyproject's lower bound."""
    too_old = []
    for name, req in dependencies().items():
        installed = importlib.metadata.version(name)
        if not req.specifier.contains(installed, prereleases=True):
            too_old.append(f"{name} {installed} (pyproject.toml: {req})")
    assert not too_old, "installed versions too old: " + ", ".join(too_old) + "; run `make install`"


def test_torch_load_refuses_arbitrary_pickles_by_default(tmp_path):
    """torch.load without weights_only (as the reference cache reads its file) loads tensors and
    refuses to unpickle arbitrary objects: the torch >= 2.6 default."""
    torch.save({"train": torch.zeros(2, 2)}, tmp_path / "ok.pt")
    assert torch.load(tmp_path / "ok.pt")["train"].shape == (2, 2)
    torch.save({"x": Path("anything")}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "bad.pt")


def test_from_pretrained_honours_dtype(tmp_path):
    """from_pretrained(dir, dtype=bf16) loads an fp32 checkpoint in bf16 (older transformers
    ignore `dtype` and load fp32)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1, n_head=1)
                    ).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16, (
        "transformers ignored dtype=: from_pretrained(dtype=...) needs transformers>=4.56")


def test_wandb_accepts_the_settings_the_tracker_passes():
    """wandb.Settings validates reinit="finish_previous" and the settings harness/tracking.py sets
    (older wandb takes reinit as a bool only)."""
    import wandb

    settings = wandb.Settings(reinit="finish_previous", console="off", silent=True,
                              x_disable_stats=True, x_disable_meta=True)
    assert settings.reinit == "finish_previous"


def test_optuna_storages_open_with_heartbeats(tmp_path):
    """The sweep's storages open as harness/sweep/storage.py builds them: SQLite with a heartbeat
    and RetryHeartbeatStaleTrialCallback, and a journal file; fail_stale_trials runs on a study."""
    import optuna

    from harness.sweep.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    assert isinstance(storage.heartbeat_stale_trial_callback,
                      optuna.storages.RetryHeartbeatStaleTrialCallback)
    study = optuna.create_study(storage=storage, study_name="s")
    optuna.storages.fail_stale_trials(study)
    journal = open_storage(str(tmp_path / "journal.log"))
    assert optuna.create_study(storage=journal, study_name="j").study_name == "j"
