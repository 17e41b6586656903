"""Bad input on the command line: one paragraph on stderr saying what is wrong, where and what to
do, exit code 2, no traceback, no finished run, and nothing trained. `--traceback` raises
instead, and an error that is not bad input (a bug) keeps its traceback."""

import json
import os
import subprocess
import sys

import pytest

from harness import datafiles
from harness.cli import main
from harness.errors import DataError
from tests.conftest import ROOT, SMOKE

RECORDS = [{"instruction": f"Say {i} politely.", "input": "", "chosen": f"Please, {i}.",
            "rejected": f"{i}, now!"} for i in range(12)]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wins over the config; nothing to set up


def train_argv(tmp_path, *sets: str) -> list[str]:
    base = [f"tracking.results_dir={tmp_path / 'results'}", "tracking.progress=false",
            "model.name=tiny-xs", "train.max_steps=1"]
    return ["train", str(SMOKE)] + [a for s in (*base, *sets) for a in ("--set", s)]


def bad_input(capsys, tmp_path, *sets: str) -> str:
    """Run `harness train` with the overrides; check the common promises; return the paragraph."""
    code = main(train_argv(tmp_path, *sets))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one paragraph, nothing else
    for summary in (tmp_path / "results").rglob("summary.json"):
        assert json.loads(summary.read_text())["status"] != "finished"
    return lines[0]


def write(tmp_path, name: str, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_missing_data_file_names_the_path(capsys, tmp_path):
    """A local data.source that is not there: the path, and what to give instead."""
    missing = tmp_path / "nope.json"
    msg = bad_input(capsys, tmp_path, f"data.source={missing}")
    assert f"data.source: no such file {missing}" in msg
    assert "Give the path of an existing file" in msg


def test_url_in_no_data_folder_and_not_downloadable_names_the_places(capsys, tmp_path, monkeypatch):
    """A URL whose file is in no data folder and cannot be fetched: every place looked in."""
    for d in ("env", "shared", "work/here"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.setenv("DPO_HARNESS_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(datafiles, "SHARED", tmp_path / "shared")
    monkeypatch.chdir(tmp_path / "work" / "here")
    url = (tmp_path / "gone" / "pairs.json").as_uri()
    msg = bad_input(capsys, tmp_path, f"data.source={url}", "data.sha256=" + "ab" * 32)
    assert url in msg and "the download failed" in msg
    for place in (tmp_path / "env", tmp_path / "shared", tmp_path / "work" / "shared" / "data"):
        assert str(place) in msg
    assert "give its local path in data.source" in msg


def test_json_object_instead_of_a_list(capsys, tmp_path):
    """Before: 'a tiny model needs texts to train its tokenizer on'. Now the file and its key."""
    f = write(tmp_path, "obj.json", json.dumps({"train": RECORDS[:1], "name": "x"}))
    msg = bad_input(capsys, tmp_path, f"data.source={f}")
    assert f"{f}: the top level is a JSON object (keys 'train', 'name'), not a list" in msg
    assert "key 'train' holds a list of 1 item(s): make that list the whole file" in msg


def test_non_utf8_file_names_the_byte_offset_and_line(capsys, tmp_path):
    """Before: a bare UnicodeDecodeError. Now the file, the byte offset and its line."""
    text = json.dumps(RECORDS, indent=1).encode()
    at = text.index(b"Please, 3")
    f = write(tmp_path, "latin1.json", text[:at] + b"\xe9" + text[at + 1:])
    msg = bad_input(capsys, tmp_path, f"data.source={f}")
    line = text[:at].count(b"\n") + 1
    assert f"{f}: not UTF-8 text: byte {at} (0xe9, line {line})" in msg and line > 1
    assert "Save the file as UTF-8" in msg


@pytest.mark.parametrize("name,content,where", [
    ("broken.json", '[\n{"prompt": "a",\n "chosen": }\n]', "not valid JSON at line 3, column 12"),
    ("broken.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a",\n',
     "line 2 is not valid JSON"),
])
def test_invalid_json_names_file_and_line(capsys, tmp_path, name, content, where):
    """Broken JSON and JSONL: the file and the line (and column) where parsing stopped."""
    f = write(tmp_path, name, content)
    msg = bad_input(capsys, tmp_path, f"data.source={f}")
    assert f"{f}: {where}" in msg and "fix" in msg.lower()


def test_record_missing_a_field_names_file_and_row(capsys, tmp_path):
    """A record without `chosen`: the file, the 0-based row and the field."""
    rows = [dict(r) for r in RECORDS]
    del rows[1]["chosen"]
    f = write(tmp_path, "rows.json", json.dumps(rows))
    msg = bad_input(capsys, tmp_path, f"data.source={f}")
    assert f"{f}: row 1 (0-based): missing field 'chosen'" in msg
    assert "Add it to that record or remove the record" in msg


def test_unknown_model_name_offline(capsys, tmp_path, monkeypatch):
    """A model name that is no tiny model, path or reachable hub id: what model.name takes offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = write(tmp_path, "ok.json", json.dumps(RECORDS))
    msg = bad_input(capsys, tmp_path, f"data.source={f}", "model.name=tiny-xxs")
    assert "model.name: could not load 'tiny-xxs'" in msg and "did you mean 'tiny-xs'?" in msg
    assert "Offline, model.name takes a tiny model (tiny-xs, tiny-s, tiny-m, tiny-l)" in msg


def test_missing_gguf_file(capsys, tmp_path):
    """Before: a late OSError from transformers. Now the missing file and the GGUF files beside it."""
    f = write(tmp_path, "ok.json", json.dumps(RECORDS))
    write(tmp_path, "other.gguf", b"")
    gguf = tmp_path / "model.gguf"
    msg = bad_input(capsys, tmp_path, f"data.source={f}", f"model.name={gguf}")
    assert f"model.name: no GGUF file {gguf}; {tmp_path} holds other.gguf" in msg
    assert "Give the path of an existing .gguf file" in msg


@pytest.mark.parametrize("override,needle", [
    ("dpo.betta=0.2", "invalid configuration; dpo.betta: unknown key"),
    ("train.lr=fast", "train.lr"),
])
def test_bad_override_names_the_file_and_field(capsys, tmp_path, override, needle):
    """A bad --set: the experiment file and the field, and where fields are documented."""
    msg = bad_input(capsys, tmp_path, override)
    assert f"{SMOKE}: " in msg and needle in msg
    assert "documented in harness/config/run.py" in msg
    assert not (tmp_path / "results").exists()  # refused before a run directory exists


def test_traceback_flag_raises_the_error_itself(tmp_path):
    """`--traceback`, before or after the subcommand, lets the error propagate with its trace."""
    f = write(tmp_path, "obj.json", json.dumps({"a": 1}))
    with pytest.raises(DataError, match="top level is a JSON object"):
        main(["--traceback", *train_argv(tmp_path, f"data.source={f}")])
    with pytest.raises(DataError, match="top level is a JSON object"):
        main([*train_argv(tmp_path, f"data.source={f}"), "--traceback"])


def test_a_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """Only bad input is turned into a paragraph: any other exception propagates."""
    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("harness.data.load_pairs", broken)
    f = write(tmp_path, "ok.json", json.dumps(RECORDS))
    with pytest.raises(RuntimeError, match="a bug"):
        main(train_argv(tmp_path, f"data.source={f}"))


def test_shell_sees_one_paragraph_and_exit_2(tmp_path):
    """The real command line: nothing but the paragraph on stderr."""
    rows = [dict(r) for r in RECORDS]
    rows[4]["rejected"] = ""
    f = write(tmp_path, "rows.jsonl", "\n".join(json.dumps(r) for r in rows))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "harness", *train_argv(tmp_path, f"data.source={f}")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr == f"error: {f}: row 4 (0-based): field 'rejected' is empty. Fill it in or " \
                         "remove the record\n"


@pytest.mark.parametrize("command", ["sweep", "replicate"])
def test_a_study_refuses_torchrun(capsys, monkeypatch, command):
    """`harness sweep` and `harness replicate` start their own workers: under torchrun each is
    refused before anything runs, naming itself and what to do."""
    from harness import distributed

    monkeypatch.setattr(distributed, "launched", lambda: True)
    assert main([command, str(ROOT / "experiments" / "default.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"harness {command} runs its own worker processes: start it without torchrun" in err
