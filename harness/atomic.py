"""Safe writes across processes: atomic writes of a file or a directory, and a cross-process file
lock. Every run file (harness.rundir, harness.tracking, harness.checkpoint) and every cache entry
(harness.cache) is written through here.

A write goes to a unique temporary sibling (`.<name>.*.tmp`), is fsynced, then renamed: a reader
sees the whole file or directory or none, also after a crash or with parallel writers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STALE_TMP_S = 3600  # a temporary older than this was left by a writer that died

# ----------------------------------------------------------------------------- locking


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created) across processes on this machine: workers that need
    the same entry make it once; the others wait, then read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, at worst duplicate work (writes stay atomic)
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale(folder: Path, max_age_s: float = STALE_TMP_S) -> int:
    """Remove temporaries (`.<name>.*.tmp`) that dead writers left in `folder`; returns how many.
    Fresh ones belong to writers still at work and are left alone."""
    removed = 0
    now = time.time()
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
                removed += 1
        except OSError:
            continue  # another process cleaned it first
    return removed


def atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a unique temporary sibling of `path`, fsync it, rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write text or bytes so that readers never see half a file."""
    if isinstance(data, str):
        return atomic_file(path, lambda tmp: tmp.write_text(data, encoding="utf-8"))
    return atomic_file(path, lambda tmp: tmp.write_bytes(data))


def _jsonable(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else str(x)


def atomic_json(path: Path, obj: Any, indent: int | None = 2) -> Path:
    """JSON (sorted keys, numpy/torch scalars as numbers) written atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=_jsonable)
    return atomic_write(path, text + "\n")


def atomic_dir(target: Path, save: Callable[[Path], None]) -> Path:
    """Call `save(tmp)` on a temporary sibling directory, then rename it to `target`. When another
    process got there first its (identical) copy is kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        save(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        with contextlib.suppress(OSError):  # another process won the race
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(target.parent)
    return target
