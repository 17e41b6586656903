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


def test_an_unreadable_entry_is_rebuilt_with_a_warning(tmp_path, capsys):
    """A zero-length or torn entry (a crash, a disk fault) is not trusted: it is removed and made
    again; a whole one is read."""
    path = tmp_path / "e.json"
    path.write_text("")  # what a power loss can leave
    built = []

    def rebuild():
        built.append(1)
        cache.atomic_write(path, '{"ok": 1}')
        return {"ok": 1}

    import json

    value, reused = cache.read_or_rebuild(path, lambda p: json.loads(p.read_text()), rebuild)
    assert value == {"ok": 1} and reused is False and built == [1]
    assert "unreadable" in capsys.readouterr().err
    value, reused = cache.read_or_rebuild(path, lambda p: json.loads(p.read_text()), rebuild)
    assert reused is True and built == [1]


def test_stale_temporaries_are_cleaned_and_fresh_ones_kept(tmp_path):
    import os

    old, fresh = tmp_path / ".a.json.x1.tmp", tmp_path / ".b.json.x2.tmp"
    old.write_text("left by a dead writer")
    fresh.write_text("a writer at work")
    os.utime(old, (time.time() - 2 * cache.STALE_TMP_S,) * 2)
    cache.atomic_write(tmp_path / "c.json", "{}")
    assert not old.exists() and fresh.exists()
