"""The sweep's view while it runs: the time-left estimate worked out by hand, the live table
rendered from made-up rows, the plain lines over a real tiny sweep (one per finished run, the count
reaching the total, the best per cell equal to the storage's), and the workers' output going to
workers.log under the live view."""

import io
import re

import optuna
import pytest

from harness.cli import build_parser
from harness.sweep import run_sweep, view
from harness.sweep.storage import open_storage
from harness.sweep.view import CellView, Run, Snapshot, eta, plain_line, render_live
from tests.test_sweep import SEARCH, experiment


def test_eta_by_hand():
    """4 finished runs of 10 s, 6 left, 2 workers: 3 rounds of 10 s = 30 s. With 5 left the last
    run has a round to itself (still 30 s); 1 left takes one run's time whatever the workers."""
    assert eta([10.0] * 4, 6, 2) == 30.0
    assert eta([10.0] * 4, 5, 2) == 30.0
    assert eta([10.0, 20.0], 1, 4) == 15.0  # mean 15 s, one round
    assert eta([8.0], 3, 1) == 24.0
    assert eta([10.0] * 4, 0, 2) == 0.0
    assert eta([], 6, 2) is None  # nothing finished yet: no estimate
    with pytest.raises(ValueError, match="workers 0 must be >= 1"):
        eta([10.0], 1, 0)


def test_durations_read_as_people_do():
    assert [view.clock(45), view.clock(192), view.clock(3900)] == ["45s", "3m12s", "1h05m"]
    assert [view.rough(s) for s in (40, 540, 569, 3900)] == ["40s", "9m", "9m", "1h05m"]


def _snapshot(durations):
    """Two cells of 3 planned runs (2 trials + 1 seed rerun) and a failed third one."""
    runs = [Run(f"s#{i}", "beta=0.1", f"trial-00{i}", r, float(i), d, True)
            for i, (r, d) in enumerate(zip(["0.6611", "pruned"], durations[:2], strict=False))]
    runs += [Run("s2#0", "beta=0.5", "trial-000", "0.6123", 5.0,
                 durations[2] if len(durations) > 2 else None, True)]
    cells = [CellView("beta=0.1", 2, 3, 0.6611, ["w1 seed1 12s"]),
             CellView("beta=0.5", 1, 3, 0.6123, ["w0 trial-001 3s"]),
             CellView("beta=1.0", 3, 3, None, [], "2 trials in a row failed; last: boom")]
    return Snapshot(cells, runs)


def _text(renderable) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    console.print(renderable)
    return console.export_text(styles=False)


def test_live_table_shows_counts_cells_best_and_time_left():
    """6 of 9 runs settled (the failed cell's 3 count: they will not run); 3 finished runs of
    10 s, 3 left on 2 workers: ceil(3/2) = 2 rounds of 10 s = ~20s left."""
    text = _text(render_live(_snapshot([10.0, 10.0, 10.0]), "t", 192.0, 2, "results/t/workers.log"))
    assert "study t" in text and "6/9 runs" in text and "3m12s elapsed, ~20s left" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│ beta=")}
    assert rows["beta=0.1"] == ["2/3", "0.6611", "trial-001 pruned", "w1 seed1 12s"]
    assert rows["beta=0.5"] == ["1/3", "0.6123", "trial-000 0.6123", "w0 trial-001 3s"]
    assert rows["beta=1.0"][:3] == ["3/3", "-", ""]
    assert rows["beta=1.0"][3].startswith("failed: 2 trials in a row failed")
    assert "worker output: results/t/workers.log" in text
    assert re.search(r"beta=0\.5\s+trial-000\s+0\.6123\s+10s", text)  # the last finished runs


def test_live_table_says_estimating_until_a_run_has_timed():
    """Read-back runs carry no duration: no estimate from them."""
    text = _text(render_live(_snapshot([None, None, None]), "t", 5.0, 1))
    assert "5s elapsed, estimating" in text and "left" not in text
    assert "worker output" not in text  # no log: the workers write to the terminal


def test_plain_line_counts_its_own_run_in_the_estimate():
    """3 runs of 10 s finished, 2 workers, 9 planned. Line 5: 4 left, 2 rounds = ~20s; line 7:
    2 left, one round = ~10s (the snapshot's count, 6, would leave 3: ~20s)."""
    snap = _snapshot([10.0, 10.0, 10.0])
    first = snap.finished[0]
    assert plain_line(first, 5, snap, 192.0, 2) == \
        "[5/9] beta=0.1 trial-000 0.6611 (best 0.6611) | 3m12s elapsed, ~20s left"
    assert plain_line(snap.finished[2], 7, snap, 200.0, 2) == \
        "[7/9] beta=0.5 trial-000 0.6123 (best 0.6123) | 3m20s elapsed, ~10s left"


def test_view_modes():
    """auto is live on a terminal, plain otherwise; the command line takes the four names."""
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert view.pick("auto", Stream(True)) == "live" and view.pick("auto", Stream(False)) == "plain"
    assert view.pick("off", Stream(True)) == "off"
    with pytest.raises(ValueError, match="expected one of auto, live, plain, off"):
        view.pick("fancy")
    assert build_parser().parse_args(["sweep", "x.yaml"]).view == "auto"
    assert build_parser().parse_args(["sweep", "x.yaml", "--view", "plain"]).view == "plain"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "x.yaml", "--view", "fancy"])


LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) (\S+) (\S+) \(best (\S+)\) \| \S+ elapsed, ")


def test_plain_view_has_a_line_per_finished_run(tmp_path, seed_data, capsys, monkeypatch):
    """2 cells x (2 trials + 1 seed rerun), one worker in this process: one line per run (each
    run folder once), the count never goes back and ends at 6/6, each line's result is its
    trial's value, and the best shown last per cell is the storage's best."""
    monkeypatch.setattr("harness.sweep.view.POLL_S", 0.5)
    sweep = {"grid": {"dpo.beta": [0.1, 0.5]}, "trials": 2, "seeds": 2, "search": SEARCH,
             "pruner": {"type": "none"}}
    run_sweep(experiment(tmp_path, seed_data, sweep), view="plain")
    lines = [m.groups() for m in map(LINE.match, capsys.readouterr().err.splitlines()) if m]
    assert len(lines) == 6
    counts = [int(n) for n, *_ in lines]
    assert counts == sorted(counts) and counts[-1] == 6 and {t for _, t, *_ in lines} == {"6"}
    runs = tmp_path / "results" / "t" / "runs"
    assert sorted(f"{c}/{r}" for _, _, c, r, _, _ in lines) == sorted(
        f"{p.parent.parent.name}/{p.parent.name}" for p in runs.glob("*/*/summary.json"))
    storage = open_storage(f"sqlite:///{tmp_path / 'results' / 't' / 'optuna.db'}", heartbeat=False)
    for cell in ("beta=0.1", "beta=0.5"):
        search = optuna.load_study(study_name=f"t/{cell}", storage=storage)
        values = {f"trial-{t.user_attrs['slot']:03d}": f"{t.value:.4g}" for t in search.trials}
        mine = [(r, v, b) for _, _, c, r, v, b in lines if c == cell]
        assert all(v == values[r] for r, v, _ in mine if r.startswith("trial-"))
        assert mine[-1][2] == f"{search.best_value:.4g}"


def test_live_view_sends_worker_output_to_the_log(tmp_path, seed_data, capfd):
    """With the live view the one worker runs as a spawned process whose output lands in
    results/<study>/workers.log, not on the terminal; the sweep ends with a problem (a cell
    fails its checks), so the log's last lines are printed after the table."""
    from harness.sweep import SweepIncomplete

    sweep = {"grid": {"train.batch_size": [4, 500]}, "trials": 1, "search": SEARCH,
             "pruner": {"type": "none"}}
    with pytest.raises(SweepIncomplete, match="batch_size=500: failed"):
        run_sweep(experiment(tmp_path, seed_data, sweep), view="live")
    out, err = capfd.readouterr()
    log = tmp_path / "results" / "t" / "workers.log"
    written = log.read_text()
    assert re.search(r"\[\d+\] search batch_size=4 slot 0", written)
    shown_before_tail, _, tail = err.partition(f"last lines of {log}:")
    assert f"worker output: {log}" in shown_before_tail
    assert "2/2 runs" in shown_before_tail  # the last frame: 1 run + the failed cell's 1
    assert "] search " not in shown_before_tail + out  # nothing from the worker on the terminal
    assert "search batch_size=4 slot 0" in tail
