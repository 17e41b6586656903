"""Library progress bars (harness/quiet.py): transformers' and huggingface_hub's tqdm bars are off
where nobody watches them (stderr not a terminal, a sweep worker) and on at a terminal, while
the harness's own bars stay; the command line and sweep workers turn them off."""

import os
import sys

import pytest
import yaml
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from harness import quiet
from harness.quiet import quiet_libraries

BARS = ("Loading weights", "Writing model shards")  # transformers' bars, by their names


@pytest.fixture(autouse=True)
def _bars_on(monkeypatch):
    """Each test starts with the libraries' bars on and HF_HUB_DISABLE_PROGRESS_BARS unset (an
    earlier test's CLI call may have set both), and leaves them as it found them."""
    was = hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv(quiet.ENV, raising=False)
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _save_and_load(path) -> None:
    """A tiny GPT-2 written with save_pretrained and read back with from_pretrained."""
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, bos_token_id=0,
                        eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    GPT2LMHeadModel.from_pretrained(path)


class _Terminal:
    """sys.stderr as seen on a terminal."""

    def __init__(self, stream):
        self.stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_bars_off_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """With stderr captured (not a terminal), saving and loading a model writes transformers'
    bars until quiet_libraries() is called and none after; the harness's own tqdm bar still
    draws, and child processes inherit HF_HUB_DISABLE_PROGRESS_BARS=1."""
    assert not sys.stderr.isatty()
    _save_and_load(tmp_path / "before")
    before = capsys.readouterr().err
    assert all(bar in before for bar in BARS), before  # what the test would miss

    quiet_libraries()
    assert not hf_logging.is_progress_bar_enabled()
    assert os.environ[quiet.ENV] == "1"
    _save_and_load(tmp_path / "after")
    for _ in tqdm(range(3), desc="dpo", unit="step"):  # train.py's bar
        pass
    after = capsys.readouterr().err
    assert not any(bar in after for bar in BARS), after
    assert "dpo: 100%" in after and "3/3" in after


def test_bars_stay_on_a_terminal_unless_forced(monkeypatch, tmp_path, capsys):
    """At a terminal quiet_libraries() leaves the bars on; force=True (a sweep worker) turns them
    off; HF_HUB_DISABLE_PROGRESS_BARS=0 set by the user keeps them even then."""
    monkeypatch.setattr(sys, "stderr", _Terminal(sys.stderr))
    quiet_libraries()
    assert hf_logging.is_progress_bar_enabled() and quiet.ENV not in os.environ
    monkeypatch.setenv(quiet.ENV, "0")
    quiet_libraries(force=True)
    assert hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv(quiet.ENV)
    quiet_libraries(force=True)
    assert not hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize("entry", ["harness.cli", "harness.bench.cli"])
def test_command_lines_call_it(entry, capsys):
    """`harness ...` and `python -m harness.bench` (the bench's children) turn the bars off
    before doing anything, here on captured stderr."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(entry).main(["--help"])
    assert not hf_logging.is_progress_bar_enabled()


def test_sweep_worker_log_has_no_library_bars(tmp_path, seed_data):
    """A spawned sweep worker (the live view's: output to workers.log) whose run trains an SFT
    checkpoint, writing it with save_pretrained and reading it back with from_pretrained: its
    log holds the SFT's line and no transformers bar. The parent's environment has no
    HF_HUB_DISABLE_PROGRESS_BARS, so the worker's own call is what turns them off."""
    from harness.sweep.supervise import _run_workers

    raw = {
        "name": "q",
        "data": {"source": str(seed_data), "limit": 40, "max_length": 128},
        "model": {"name": "tiny-xs"},
        "sft": {"enabled": True, "steps": 2, "batch_size": 4, "warmup_steps": 0, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "eval_every": 4, "eval_batches": 1,
                  "save_model": False, "test_at_end": False},
        "tracking": {"results_dir": str(tmp_path / "results"), "progress": False},
        "sweep": {"grid": {"dpo.beta": [0.1]}, "trials": 1, "pruner": {"type": "none"}},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    log = tmp_path / "workers.log"
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _run_workers(path, None, url, tmp_path / "results", [None], log)
    text = log.read_text()
    assert "sft: loss" in text, text  # the checkpoint was written and read back in the worker
    assert not any(bar in text for bar in BARS), text
