"""Data files by URL and sha256: the lookup order ($DPO_HARNESS_DATA, ../shared/data of the
repository, then of the current directory, then one download into the cache), the sha256 check of
every copy, and the errors when a copy is wrong or the file is nowhere."""

import hashlib
import json

import pytest

from harness import data as hdata
from harness import datafiles
from harness.config import DataConfig, load_config
from harness.errors import DataError, DataFileMissing
from tests.conftest import ROOT, SMOKE

NAME = "pairs.json"
BODY = json.dumps([{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}!"}
                   for i in range(10)]).encode()
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty data folders in place of the real ones, and a served copy behind a file:// URL."""
    dirs = {k: tmp_path / k for k in ("env", "shared", "work/shared/data", "served", "cache")}
    for d in dirs.values():
        d.mkdir(parents=True)
    (tmp_path / "work" / "project").mkdir()
    monkeypatch.setenv("DPO_HARNESS_DATA", str(dirs["env"]))
    monkeypatch.setattr(datafiles, "SHARED", dirs["shared"])
    monkeypatch.chdir(tmp_path / "work" / "project")  # its ../shared/data is work/shared/data
    (dirs["served"] / NAME).write_bytes(BODY)
    dirs["url"] = (dirs["served"] / NAME).as_uri()
    return dirs


def files_under(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_lookup_order_env_shared_cwd_then_one_download(places):
    """Each folder is used only when the ones before it lack the file; then the URL is fetched
    once into the cache, and the cached copy serves later calls even when the URL is gone."""
    copies = [places["env"] / NAME, places["shared"] / NAME, places["work/shared/data"] / NAME]
    for c in copies:
        c.write_bytes(BODY)
    for expected in copies:
        assert datafiles.locate(places["url"], SHA, str(places["cache"])) == expected
        expected.unlink()
    got = datafiles.locate(places["url"], SHA, str(places["cache"]))
    assert got.parent == places["cache"] and got.read_bytes() == BODY
    (places["served"] / NAME).unlink()
    assert datafiles.locate(places["url"], SHA, str(places["cache"])) == got


def test_without_the_variable_the_shared_folders_are_searched(places, monkeypatch):
    """$DPO_HARNESS_DATA unset: only the two ../shared/data folders are searched."""
    monkeypatch.delenv("DPO_HARNESS_DATA")
    assert [label for label, _ in datafiles.data_dirs()] == [
        "../shared/data of the repository", "../shared/data of the current directory"]


def test_explicit_local_path_is_read_as_it_is(places):
    """A local path in data.source wins over the folders and is not held to data.sha256."""
    own = places["served"].parent / "own.json"
    own.write_bytes(BODY[:-1] + b', {"prompt": "x", "chosen": "y", "rejected": "z"}]')
    (places["env"] / NAME).write_bytes(BODY)
    pairs = hdata.load_pairs(DataConfig(source=str(own), sha256="0" * 64, split=(1.0, 0.0, 0.0)))
    assert len(pairs["train"]) == 11


def test_copy_found_by_name_is_checked(places):
    """A file of the right name with other content is an error naming it, the URL and both hashes."""
    wrong = b"[]"
    (places["env"] / NAME).write_bytes(wrong)
    with pytest.raises(DataError) as err:
        datafiles.locate(places["url"], SHA, str(places["cache"]))
    msg = str(err.value)
    assert str(places["env"] / NAME) in msg and places["url"] in msg
    assert SHA in msg and hashlib.sha256(wrong).hexdigest() in msg and "sha256 mismatch" in msg
    assert files_under(places["cache"]) == []  # nothing was downloaded past the wrong copy


def test_download_with_wrong_sha_names_url_and_hashes_and_keeps_nothing(places):
    """A download whose sha256 differs: URL, expected and actual digest; no entry, no temporary."""
    bad = "ab" * 32
    with pytest.raises(DataError) as err:
        datafiles.locate(places["url"], bad, str(places["cache"]))
    msg = str(err.value)
    assert places["url"] in msg and f"expected {bad}" in msg and f"downloaded {SHA}" in msg
    assert files_under(places["cache"]) == []  # no entry and no temporary


def test_damaged_cached_copy_is_fetched_again(places, capsys):
    """A cached download that no longer has its sha256 is fetched again, with a warning."""
    first = datafiles.locate(places["url"], SHA, str(places["cache"]))
    first.write_bytes(b"damaged")
    again = datafiles.locate(places["url"], SHA, str(places["cache"]))
    assert again == first and again.read_bytes() == BODY
    assert "unreadable" in capsys.readouterr().err


def test_nowhere_and_not_downloadable_names_every_place(places):
    """No copy and no download: every folder looked in and the download's failure."""
    (places["served"] / NAME).unlink()
    with pytest.raises(DataFileMissing) as err:
        datafiles.locate(places["url"], SHA, str(places["cache"]))
    msg = str(err.value)
    for folder in ("env", "shared", "work/shared/data"):
        assert str(places[folder]) in msg
    assert "No such file" in err.value.reason and err.value.reason in msg
    assert "give its local path in data.source" in msg


@pytest.mark.parametrize("sha,needle", [(None, "data.sha256 is required"),
                                        ("abc", "is not a sha256 hex digest")])
def test_url_needs_a_well_formed_sha256(places, sha, needle):
    """A URL without data.sha256, or with one that is not 64 hex characters, is refused."""
    with pytest.raises(DataError, match=needle):
        datafiles.locate(places["url"], sha, str(places["cache"]))


def test_url_must_end_in_a_file_name():
    """The file is looked up by the URL's last segment, so the URL must have one."""
    with pytest.raises(DataError, match="names no file"):
        datafiles.locate("https://example.org/data/", "0" * 64)


def test_experiments_name_the_seed_data_by_url_and_the_local_copy_matches(seed_data):
    """Every experiment on the seed data names the same URL and sha256, and the copy the tests
    found (by the same lookup) has that sha256."""
    smoke = load_config(SMOKE).data
    assert smoke.source.startswith("https://") and datafiles.file_name(smoke.source) == seed_data.name
    for name in ("seed_polite", "seed_polite_quick", "seed_polite_gpu"):
        data = load_config(ROOT / "experiments" / f"{name}.yaml").data
        assert (data.source, data.sha256) == (smoke.source, smoke.sha256), name
    assert datafiles.sha256_of(seed_data) == smoke.sha256
