"""Shared test set-up: offline everything, caches in a temporary folder, the seed data path."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_DATA = ROOT.parent / "shared" / "data" / "instruction-data-with-preference.json"

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


@pytest.fixture
def seed_data() -> Path:
    if not SEED_DATA.exists():
        pytest.skip(f"seed data not found at {SEED_DATA} (CI and developer machines have ../shared)")
    return SEED_DATA
