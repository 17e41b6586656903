"""harness/cache.py: keys change with every part that determines an entry, writes are atomic
(nothing half-written, no temporary left behind, also when the writer fails), a directory entry
made by a racing process is kept, and the file lock serialises processes."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from harness import cache


def test_key_is_deterministic_and_sensitive_to_every_part():
    a = cache.Key("bpe", {"v": 512, "w": [1, 2]}).texts(["x", "y"]).hex()
    assert a == cache.Key("bpe", {"w": [1, 2], "v": 512}).texts(["x", "y"]).hex()  # key order
    assert len(a) == cache.KEY_CHARS
    others = [cache.Key("bpe", {"v": 513, "w": [1, 2]}).texts(["x", "y"]),
              cache.Key("bpe", {"v": 512, "w": [1, 2]}).texts(["x", "z"]),
              cache.Key("bpe", {"v": 512, "w": [1, 2]}).texts(["xy"]),
              cache.Key(b"bpe", {"v": 512, "w": [2, 1]}).texts(["x", "y"])]
    assert len({a, *(k.hex() for k in others)}) == 5


def test_entry_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HARNESS_CACHE", str(tmp_path))
    assert cache.entry("sft", "abc") == tmp_path / "sft" / "abc"
    assert cache.entry("reference", cache.Key("k"), ".pt", root=tmp_path / "r").parent == tmp_path / "r"


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "d" / "f.json"
    cache.atomic_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.atomic_file(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}\n'  # the old content, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary left


def test_atomic_dir_keeps_the_first_copy(tmp_path):
    target = tmp_path / "entry"
    cache.atomic_dir(target, lambda d: (d / "w.txt").write_text("first"))
    cache.atomic_dir(target, lambda d: (d / "w.txt").write_text("second"))
    assert (target / "w.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def _hold(lock: str, log: str, tag: str) -> None:
    with cache.file_lock(Path(lock)):
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
