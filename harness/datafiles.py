"""Data files named by their public URL and sha256, found locally by file name or downloaded once.

    path = locate(url, sha256)   # a local copy of the file, its sha256 checked

Where the file is looked for, in order (a local path in data.source is read as it is instead):

1. `$DPO_HARNESS_DATA/<file name>`, when that variable is set;
2. `../shared/data/<file name>` beside the repository, then beside the current directory;
3. the cache (`<cache root>/data`, or data.cache_dir): downloaded there once, atomically and under
   a lock, so parallel workers fetch it once and a cut-off download leaves nothing behind.

A file found by name is checked against the sha256 as a download is; a mismatch is an error
naming the file, the URL, the expected and the actual digest.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

from harness import atomic, cache
from harness.errors import DataError, DataFileMissing

DATA_ENV = "DPO_HARNESS_DATA"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
URL_SCHEMES = ("http://", "https://", "file://")
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
TIMEOUT_S = 60  # per network read of a download


def is_url(source: str) -> bool:
    return source.startswith(URL_SCHEMES)


def file_name(url: str) -> str:
    """The last segment of the URL's path: the name the file is looked up by."""
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
    if not name:
        raise DataError(f"data.source: the URL {url} names no file; it must end in the file's name "
                        "(e.g. .../instruction-data-with-preference.json)")
    return name


def data_dirs() -> list[tuple[str, Path]]:
    """(label, folder) of the local data folders, in lookup order, without repeats."""
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser().absolute()))
    dirs.append(("../shared/data of the repository", SHARED))
    dirs.append(("../shared/data of the current directory", Path.cwd().parent / "shared" / "data"))
    seen, out = set(), []
    for label, d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            out.append((label, d))
    return out


def checked_digest(sha256: str | None, url: str) -> str:
    """data.sha256 in lower case; missing or malformed is an error."""
    if not sha256:
        raise DataError(f"data.sha256 is required for a URL source ({url}): add the file's sha256 "
                        "hex digest (`sha256sum FILE` prints it), so that every copy is checked")
    if not HEX64.fullmatch(sha256):
        raise DataError(f"data.sha256: {sha256!r} is not a sha256 hex digest (64 characters 0-9, "
                        f"a-f) for {url}; `sha256sum FILE` prints the right one")
    return sha256.lower()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: Path, sha256: str, url: str) -> Path:
    """`path` when its content has the sha256, else an error naming both digests."""
    actual = sha256_of(path)
    if actual != sha256:
        raise DataError(f"{path}: sha256 mismatch for {url}: expected {sha256}, found {actual}. "
                        "This is not the file that data.sha256 names: replace it with the file "
                        "from the URL, or remove it so that the URL is downloaded")
    return path


def find_local(url: str, sha256: str) -> Path | None:
    """The first local data folder's file of the URL's name, checked; None when none has it."""
    name = file_name(url)
    for _, folder in data_dirs():
        if (folder / name).is_file():
            return verified(folder / name, sha256, url)
    return None


def _fetch(url: str, sha256: str, tmp: Path) -> None:
    digest = hashlib.sha256()
    with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        raise DataError(f"{url}: sha256 mismatch: expected {sha256}, downloaded {digest.hexdigest()}. "
                        "The file at the URL is not the one data.sha256 names: check both (nothing "
                        "was kept)")


def download(url: str, sha256: str, cache_dir: str | None = None) -> Path:
    """The URL's file in the cache, fetched once and checked; a cached copy that fails the check
    (a disk fault) is fetched again with a warning."""
    key = f"{sha256[:16]}-{file_name(url)}"
    path = cache.entry("data", key, root=cache_dir)
    with atomic.file_lock(cache.entry("locks", f"data-{key}", ".lock")):
        got, _ = cache.read_or_rebuild(path, lambda p: verified(p, sha256, url),
                                       lambda: atomic.atomic_file(path, lambda tmp: _fetch(url, sha256, tmp)))
    return got


def locate(url: str, sha256: str | None, cache_dir: str | None = None) -> Path:
    """A checked local copy of the file at `url`: found by name in a data folder, else downloaded."""
    sha256 = checked_digest(sha256, url)
    local = find_local(url, sha256)
    if local is not None:
        return local
    try:
        return download(url, sha256, cache_dir)
    except (OSError, http.client.HTTPException) as err:
        reason = f"{type(err).__name__}: {err}"
        places = "; ".join(f"{label}: {folder}" for label, folder in data_dirs())
        unset = "" if os.environ.get(DATA_ENV) else f" (${DATA_ENV} is not set)"
        raise DataFileMissing(
            f"{url}: {file_name(url)} is in no local data folder ({places}){unset}, and the download "
            f"failed ({reason}). Put the file in one of those folders (or point ${DATA_ENV} at the "
            "folder that holds it), give its local path in data.source, or run once with network "
            "access",
            reason) from None
