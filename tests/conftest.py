"""Shared test set-up: offline everything, caches in a temporary folder, the seed data file."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"  # names the seed data by URL and sha256

# No hub, no wandb server: set before any test imports transformers or wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tokenizers, downloads and reference log-probs go to a per-session folder."""
    os.environ["DPO_HARNESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))


@pytest.fixture(scope="session")
def seed_data(_isolated_cache) -> Path:
    """The seed data file, looked up as a run looks it up (harness.datafiles): by name in
    $DPO_HARNESS_DATA or ../shared/data, else downloaded; once per session. Without either, the
    tests that need it are skipped with the reason."""
    from harness.config import load_config
    from harness.datafiles import locate
    from harness.errors import DataFileMissing

    data = load_config(SMOKE).data
    try:
        return locate(data.source, data.sha256)
    except DataFileMissing as err:
        pytest.skip("seed data not found in $DPO_HARNESS_DATA or ../shared/data and not "
                    f"downloadable: {err.reason}")
