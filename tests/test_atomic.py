"""harness/atomic.py: writes are atomic (nothing half-written, no temporary left behind, also when
the writer fails), a directory entry made by a racing process is kept, temporaries of dead writers
are cleaned, and the file lock serialises processes."""

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from harness import atomic


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "d" / "f.json"
    atomic.atomic_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_file(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}\n'  # the old content, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary left


def test_atomic_dir_keeps_the_first_copy(tmp_path):
    target = tmp_path / "entry"
    atomic.atomic_dir(target, lambda d: (d / "w.txt").write_text("first"))
    atomic.atomic_dir(target, lambda d: (d / "w.txt").write_text("second"))
    assert (target / "w.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def _hold(lock: str, log: str, tag: str) -> None:
    with atomic.file_lock(Path(lock)):
        with open(log, "a") as fh:
            fh.write(f"{tag}-in\n")
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write(f"{tag}-out\n")


def test_file_lock_serialises_processes(tmp_path):
    lock, log = tmp_path / "x.lock", tmp_path / "log"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hold, args=(str(lock), str(log), t)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    lines = log.read_text().split()
    assert len(lines) == 4
    assert lines[0][0] == lines[1][0] and lines[2][0] == lines[3][0]  # never interleaved


def test_stale_temporaries_are_cleaned_and_fresh_ones_kept(tmp_path):
    old, fresh = tmp_path / ".a.json.x1.tmp", tmp_path / ".b.json.x2.tmp"
    old.write_text("left by a dead writer")
    fresh.write_text("a writer at work")
    os.utime(old, (time.time() - 2 * atomic.STALE_TMP_S,) * 2)
    atomic.atomic_write(tmp_path / "c.json", "{}")
    assert not old.exists() and fresh.exists()
