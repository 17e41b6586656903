"""Shared caches: the cache root, key hashing, and reading an entry back (or making it again).
Every cache of the harness (downloads, tokenizers, GGUF conversions, SFT checkpoints, pair sets,
reference log-probs) goes through here; entries are written and locked with harness.atomic.

An entry is named by a `Key` (sha256 over what determines its content), so a changed input is a
new entry and never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
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


# ----------------------------------------------------------------------------- reading


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
