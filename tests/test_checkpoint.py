"""Run checkpoints and resuming: a run cut off after a checkpoint and re-run on its directory
writes exactly the metrics of an uninterrupted run; a finished directory is refused, a changed
config starts over, and the checkpoint is removed at the end unless kept."""

import json

import pytest
import torch

from harness.train import train
from tests.precision import PRECISIONS
from tests.runs import quick_config, read_metrics, without_perf

# 6 steps of 4 pairs: train rows at steps 3 and 6 (so the train-metric window is part-full at a
# checkpoint), validation with generation metrics at steps 0, 3 and 6 (every 12 pairs),
# checkpoints every 8 pairs: steps 2 and 4 (never the last step).
RESUMABLE = {"train.log_every": 3, "train.checkpoint_every": 8, "train.save_model": False,
             "gen_eval.enabled": True, "gen_eval.n_prompts": 2, "gen_eval.max_new_tokens": 6}


class Hook:
    """An eval hook that records the steps it is called at and raises KeyboardInterrupt (a
    user's Ctrl-C) at validation of step `stop`."""

    def __init__(self, stop: int | None = None):
        self.stop, self.steps = stop, []

    def __call__(self, step: int, values: dict) -> None:
        self.steps.append(step)
        if step == self.stop:
            raise KeyboardInterrupt


def summary_of(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def uncut(tmp_path_factory, seed_data):
    """One uninterrupted run with checkpoints on per precision (the reference the resumed run
    must equal), made when first asked for."""
    made = {}

    def get(precision: str = "fp32"):
        if precision not in made:
            tmp = tmp_path_factory.mktemp(f"finished-{precision}")
            run_dir = tmp / "a"
            cfg = quick_config(seed_data, tmp, **RESUMABLE, **{"train.precision": precision})
            made[precision] = run_dir, train(cfg, run_dir=run_dir)
        return made[precision]

    return get


@pytest.fixture
def finished(uncut):
    return uncut("fp32")


# A resumed run repeats the same operations on the same shapes: bit for bit in either precision.
@pytest.mark.parametrize("precision", PRECISIONS)
def test_resumed_run_writes_the_uninterrupted_metrics_exactly(uncut, seed_data, tmp_path, capsys,
                                                              precision):
    """Cut off by KeyboardInterrupt at step 6 (after the step-4 checkpoint, and after rows of steps
    5-6 were written) and re-run on its directory with only tracking.tags changed, a run resumes
    from step 4: its metrics.jsonl equals the uninterrupted run's row for row and bit for bit
    (perf/* aside), generation metrics included; the eval hook is called again, only for steps
    after the checkpoint; the summary records resumed_from_step; the checkpoint (one, step 4,
    holding the loop's counters, window and data position) is kept with keep_checkpoint, while
    the uninterrupted run's checkpoint was deleted at its end by default."""
    ref_dir, ref = uncut(precision)
    assert not (ref_dir / "checkpoint").exists()
    assert ref["resumed_from_step"] is None and ref["precision"] == precision

    run_dir = tmp_path / "b"
    cfg = quick_config(seed_data, tmp_path, **RESUMABLE, **{"train.keep_checkpoint": True,
                                                            "train.precision": precision})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir=run_dir, on_eval=Hook(stop=6))
    assert summary_of(run_dir)["status"] == "interrupted"
    assert [p.name for p in (run_dir / "checkpoint").iterdir()] == ["step-00000004"]
    state = json.loads((run_dir / "checkpoint" / "step-00000004" / "state.json").read_text())
    progress = state["progress"]
    assert (progress["step"], progress["seen"], progress["micro_batches"]) == (4, 16, 4)
    assert progress["window_pairs"] == 4 and progress["window"]  # step 4's pairs, not yet logged
    assert state["metrics_lines"] == 3  # validation 0, train 3, validation 3
    assert len(read_metrics(run_dir)) > 3

    capsys.readouterr()
    hook = Hook()
    again = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tags": ["again"]})})
    summary = train(again, run_dir=run_dir, on_eval=hook)
    assert "resuming from the checkpoint at step 4" in capsys.readouterr().err
    assert summary["status"] == "finished" and summary["resumed_from_step"] == 4
    assert hook.steps == [6]

    rows, ref_rows = without_perf(read_metrics(run_dir)), without_perf(read_metrics(ref_dir))
    assert rows == ref_rows
    assert [list(r) for r in rows] == [list(r) for r in ref_rows]  # the same key order too
    assert any("gen/kl" in r and r["step"] == 6 for r in rows)
    for key in ("train/loss", "eval/loss", "test/loss", "gen/kl", "examples_seen", "tokens_seen"):
        assert summary[key] == ref[key], key
    assert [p.name for p in (run_dir / "checkpoint").iterdir()] == ["step-00000004"]


def test_an_fsdp_run_in_one_process_resumes_from_its_dcp_checkpoint(uncut, seed_data, tmp_path):
    """train.distributed fsdp in one process (nothing to shard) writes the layout a torchrun FSDP
    run writes, a torch.distributed.checkpoint (sharded/, no weights.pt, no optimizer in
    training.pt), so the same config resumes on any number of ranks; cut off at step 6 and re-run,
    it loads the step-4 checkpoint and ends with the uninterrupted run's metrics exactly (in one
    process the strategy changes no number)."""
    ref_dir, _ = uncut("fp32")
    run_dir = tmp_path / "f"
    cfg = quick_config(seed_data, tmp_path, **RESUMABLE, **{"train.precision": "fp32",
                                                            "train.distributed": "fsdp"})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir=run_dir, on_eval=Hook(stop=6))
    (ckpt,) = (run_dir / "checkpoint").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["sharded", "state.json", "training.pt"]
    assert torch.load(ckpt / "training.pt", weights_only=True)["optimizer"] is None
    summary = train(cfg, run_dir=run_dir)
    assert summary["resumed_from_step"] == 4
    assert without_perf(read_metrics(run_dir)) == without_perf(read_metrics(ref_dir))


def test_finished_run_dir_is_refused(finished, seed_data):
    """A directory whose summary.json says `finished` refuses another run and is left as it was."""
    run_dir, _ = finished
    before = (run_dir / "metrics.jsonl").read_text()
    cfg = quick_config(seed_data, run_dir.parent, **RESUMABLE)
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        train(cfg, run_dir=run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert summary_of(run_dir)["status"] == "finished"


def test_changed_config_starts_over(finished, seed_data, tmp_path, capsys):
    """A cut-off run re-run on its directory with another config (dpo.beta) does not resume from
    the stale checkpoint: it says so, starts at step 0 with fresh metrics (the same rows as a
    whole run, no leftovers), records no resume, and leaves no checkpoint behind."""
    ref_dir, _ = finished
    run_dir = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(seed_data, tmp_path, **RESUMABLE), run_dir=run_dir, on_eval=Hook(stop=3))
    assert (run_dir / "checkpoint" / "step-00000002").exists()

    capsys.readouterr()
    cfg = quick_config(seed_data, tmp_path, **RESUMABLE, **{"dpo.beta": 0.2})
    summary = train(cfg, run_dir=run_dir)
    assert "starting over (the checkpoint was saved under another config)" in capsys.readouterr().err
    assert summary["status"] == "finished" and summary["resumed_from_step"] is None
    rows, ref_rows = read_metrics(run_dir), read_metrics(ref_dir)
    assert [(r["step"], sorted(r)) for r in rows] == [(r["step"], sorted(r)) for r in ref_rows]
    assert rows[1]["train/loss"] != ref_rows[1]["train/loss"]  # beta 0.2's own numbers
    assert not (run_dir / "checkpoint").exists()


def test_a_checkpoint_in_another_precision_starts_over(seed_data, tmp_path, capsys, monkeypatch):
    """The same config (train.precision auto) resolved to fp32 when the run was cut off and to
    bf16 when it is run again (another machine; here $DPO_HARNESS_PRECISION): the run does not
    continue fp32 weights in bf16; it says why, starts at step 0 and ends as a whole bf16 run."""
    cfg = quick_config(seed_data, tmp_path, **RESUMABLE)
    assert cfg.train.precision == "auto"
    monkeypatch.setenv("DPO_HARNESS_PRECISION", "fp32")
    run_dir = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir=run_dir, on_eval=Hook(stop=3))
    assert summary_of(run_dir)["precision"] == "fp32"
    assert (run_dir / "checkpoint" / "step-00000002").exists()

    capsys.readouterr()
    monkeypatch.setenv("DPO_HARNESS_PRECISION", "bf16")
    summary = train(cfg, run_dir=run_dir)
    err = capsys.readouterr().err
    assert "starting over (the checkpoint was computed in fp32, this run computes in bf16)" in err
    assert summary["resumed_from_step"] is None
    assert (summary["precision"], summary["precision_setting"], summary["precision_source"]) == \
        ("bf16", "auto", "env")
    whole = train(cfg, run_dir=tmp_path / "whole")
    assert without_perf(read_metrics(run_dir)) == without_perf(read_metrics(tmp_path / "whole"))
    assert whole["precision"] == "bf16"
