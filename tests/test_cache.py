"""harness/cache.py: keys change with every part that determines an entry, entries live where
their kind says, and an unreadable entry is rebuilt, never trusted."""

from harness import atomic, cache


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


def test_an_unreadable_entry_is_rebuilt_with_a_warning(tmp_path, capsys):
    """A zero-length or torn entry (a crash, a disk fault) is not trusted: it is removed and made
    again; a whole one is read."""
    path = tmp_path / "e.json"
    path.write_text("")  # what a power loss can leave
    built = []

    def rebuild():
        built.append(1)
        atomic.atomic_write(path, '{"ok": 1}')
        return {"ok": 1}

    import json

    value, reused = cache.read_or_rebuild(path, lambda p: json.loads(p.read_text()), rebuild)
    assert value == {"ok": 1} and reused is False and built == [1]
    assert "unreadable" in capsys.readouterr().err
    value, reused = cache.read_or_rebuild(path, lambda p: json.loads(p.read_text()), rebuild)
    assert reused is True and built == [1]
