"""Shared caches and safe writes: the cache root, key hashing, a cross-process file lock, and atomic
writes of a file or a directory. Every cache of the harness (downloads, tokenizers, GGUF
conversions, SFT checkpoints, pair sets, reference log-probs) and every run file goes through here.

An entry is named by a `Key` (sha256 over what determines its content), so a changed input is a
new entry and never a stale hit. Writes go to a unique temporary sibling, are fsynced, then
renamed: a reader sees the whole entry or none, also after a crash or with parallel writers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

KEY_CHARS = 24  # hex characters of a key in an entry's name (96 bits)


def cache_root() -> Path:
    """$DPO_HARNESS_CACHE, or ~/.cache/dpo-harness."""
    return Path(os.environ.get("DPO_HARNESS_CACHE", "~/.cache/dpo-harness")).expanduser()


def entry(kind: str, key: Key | str, suffix: str = "", root: str | Path | None = None) -> Path:
    """<root or cache root>/<kind>/<key><suffix>: where one cache entry lives."""
    base = Path(root).expanduser() if root else cache_root() / kind
    name = key.hex() if isinstance(key, Key) else key
    return base / f"{name}{suffix}"


class Key:
    """sha256 over the parts that determine a cache entry.

    Strings and bytes are hashed as they are, anything else as canonical JSON; `texts` hashes a
    long list of strings one digest at a time.
    """

    def __init__(self, *parts: Any):
        self._h = hashlib.sha256()
        self.add(*parts)

    def add(self, *parts: Any) -> Key:
        for part in parts:
            if isinstance(part, bytes):
                self._h.update(part)
            elif isinstance(part, str):
                self._h.update(part.encode())
            else:
                self._h.update(json.dumps(part, sort_keys=True, default=str).encode())
        return self

    def texts(self, texts: Iterable[str]) -> Key:
        for t in texts:
            self._h.update(hashlib.sha256(t.encode()).digest())
        return self

    def hex(self, chars: int = KEY_CHARS) -> str:
        return self._h.hexdigest()[:chars]


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


STALE_TMP_S = 3600  # a temporary older than this was left by a writer that died


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


def read_or_rebuild(path: Path, read: Callable[[Path], Any], rebuild: Callable[[], Any]) -> tuple[Any, bool]:
    """(entry, reused): `read(path)` when the entry is there and whole; when it is missing, or
    unreadable (torn by a crash, emptied by a disk fault), it is removed, with a warning in the
    second case, and `rebuild()` makes it again."""
    if Path(path).exists():
        try:
            return read(path), True
        except Exception as err:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
            print(f"warning: cache entry {path} is unreadable ({type(err).__name__}: {err}); "
                  "computing it again", file=sys.stderr)
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
    return rebuild(), False


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
