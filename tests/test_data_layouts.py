"""Preference data in the layouts of public datasets (tests/fixtures/data/README.md names each):
HH-RLHF transcripts with an implicit prompt, Stack Exchange columns mapped by data.columns,
UltraFeedback's string prompt beside conversations with scores and `*_prefs` splits, Orca's
system field; hub arguments, split slices and score-gap filtering; bad records in each layout
are one paragraph naming file, row and field, exit code 2; `harness data` on the seed data."""

import json

import pytest
import yaml

from harness import data as hdata
from harness import prepare
from harness.cli import main
from harness.config import ConfigError, DataConfig, build_config, load_config, load_experiment
from harness.data import DataError, Pair
from harness.models import train_tokenizer
from tests.conftest import ROOT, SMOKE

FIXTURES = ROOT / "tests" / "fixtures" / "data"
HH = FIXTURES / "hh_rlhf.jsonl"  # Anthropic/hh-rlhf
SE = FIXTURES / "stack_exchange_paired.jsonl"  # lvwerra/stack-exchange-paired
UF_TRAIN = FIXTURES / "ultrafeedback_train_prefs.jsonl"  # HuggingFaceH4/ultrafeedback_binarized
UF_TEST = FIXTURES / "ultrafeedback_test_prefs.jsonl"
ORCA = FIXTURES / "orca_dpo_pairs.jsonl"  # Intel/orca_dpo_pairs
SE_COLUMNS = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
ALL = (1.0, 0.0, 0.0)  # every record trains


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chat_tok():
    """A small tokenizer with the harness's chat template: <|role|>\\ncontent\\n per message."""
    return train_tokenizer(["hello there, how are you", "Name three primary colors."], 300)


@pytest.fixture
def ultrafeedback_dir(tmp_path):
    """A saved DatasetDict with UltraFeedback binarized's split names, from the two fixtures."""
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ultrafeedback"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows(UF_TRAIN)),
                          "test_prefs": datasets.Dataset.from_list(rows(UF_TEST))}).save_to_disk(str(path))
    return path


# ----------------------------------------------------------------------------- each layout by hand


def test_hh_rlhf_prompt_ends_at_the_last_shared_assistant_tag():
    """Whole transcripts as strings: the prompt keeps the last assistant tag both share, the
    responses follow it. Row 1's answers both open with "I think": a character-level common
    prefix would have cut inside them, the turn boundary keeps them whole."""
    pairs = hdata.load_pairs(DataConfig(source=str(HH), split=ALL))["train"]
    assert pairs[0] == Pair("\n\nHuman: What is a good name for a goldfish?\n\nAssistant:",
                            " How about Bubbles?", " Fish do not need names.")
    assert pairs[1].prompt == ("\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure. What kind?"
                               "\n\nHuman: Rye bread.\n\nAssistant:")
    assert (pairs[1].chosen, pairs[1].rejected) == (" I think a sourdough starter helps.",
                                                    " I think you should buy it.")


def test_stack_exchange_columns_are_mapped():
    """data.columns maps prompt/chosen/rejected to question/response_j/response_k."""
    pairs = hdata.load_pairs(DataConfig(source=str(SE), columns=SE_COLUMNS, split=ALL))["train"]
    assert pairs[1] == Pair("What does `git stash` do?", "It shelves your uncommitted changes.",
                            "It deletes them.")


def test_ultrafeedback_string_prompt_beside_conversations_with_prefs_splits(ultrafeedback_dir, chat_tok):
    """A string prompt beside whole conversations renders the conversation's own user turn once;
    hub_split/test_split name the DatasetDict's train_prefs/test_prefs; scores are kept."""
    cfg = DataConfig(source=str(ultrafeedback_dir), format="messages", hub_split="train_prefs",
                     test_split="test_prefs")
    splits = hdata.load_pairs(cfg, chat_tok)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [4, 0, 2]
    assert splits["train"][0] == Pair("<|user|>\nName three primary colors.\n<|assistant|>\n",
                                      "Red, yellow and blue.\n", "Green.\n", scores=(9.0, 2.0))
    assert splits["test"][0].chosen == "Rome.\n" and splits["test"][0].scores == (10.0, 4.0)
    from_file = hdata.load_pairs(cfg.model_copy(update={"source": str(UF_TRAIN), "test_split": None,
                                                        "split": ALL}), chat_tok)["train"]
    assert from_file == splits["train"]  # the same records as a JSONL file


def test_orca_system_is_prepended_or_rendered_by_the_template(chat_tok):
    """Orca's `system` beside `question`: before the prompt with a blank line for plain formats
    (an empty system adds nothing), a system message through the chat template for messages."""
    cfg = DataConfig(source=str(ORCA), columns={"prompt": "question"}, split=ALL)
    plain = hdata.load_pairs(cfg)["train"]
    assert plain[0] == Pair("You are an AI assistant. Answer briefly.\n\nIs the sun a star?",
                            "Yes, the sun is a star.", "No, it is a planet.")
    assert plain[1].prompt == "What is 3 times 4?"
    chat = hdata.load_pairs(cfg.model_copy(update={"format": "messages"}), chat_tok)["train"]
    assert chat[0] == Pair("<|system|>\nYou are an AI assistant. Answer briefly.\n<|user|>\n"
                           "Is the sun a star?\n<|assistant|>\n", "Yes, the sun is a star.\n",
                           "No, it is a planet.\n")


@pytest.mark.parametrize("source,extra", [
    (HH, {}), (SE, {"columns": SE_COLUMNS}), (UF_TRAIN, {"format": "messages"}),
    (ORCA, {"columns": {"prompt": "question"}}),
])
def test_identical_responses_are_dropped_and_counted_in_every_layout(chat_tok, source, extra):
    """Each fixture's one pair whose chosen equals its rejected loads, then is dropped and
    counted as dropped_identical when tokenized, as for the seed's layouts."""
    pairs = hdata.load_pairs(DataConfig(source=str(source), split=ALL, **extra), chat_tok)["train"]
    _, counts = hdata.tokenize_pairs(pairs, chat_tok, max_length=256)
    assert counts["pairs/dropped_identical"] == 1
    assert counts["pairs/kept"] == len(rows(source)) - 1


def test_chat_records_need_format_messages_and_a_chat_tokenizer():
    """Chat records under format auto (loaded before any tokenizer) ask for format messages, and
    format messages with a tiny model's tokenizer (trained on the pairs, so after them) asks for
    model.tokenizer, instead of failing later with a message about something else."""
    with pytest.raises(DataError, match="the records are chat messages; set data.format: messages"):
        hdata.load_pairs(DataConfig(source=str(UF_TRAIN), split=ALL))
    cfg = build_config({"model": {"name": "tiny-xs"}, "data": {"source": str(UF_TRAIN), "format": "messages"}})
    with pytest.raises(ConfigError, match="Set model.tokenizer to a chat tokenizer"):
        prepare.preview(cfg)


# ----------------------------------------------------------------------------- hub arguments, slices


def test_hub_arguments_passed_to_the_loader(monkeypatch):
    """hub_config, hub_data_dir, revision and a sliced split reach datasets.load_dataset, and
    test_split reads another split of the same dataset; nothing touches the network."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, **kw):
        calls.append((path, kw))
        return datasets.Dataset.from_list(rows(HH))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(source="Anthropic/hh-rlhf", hub_config="default", hub_data_dir="harmless-base",
                     revision="09be8c5", hub_split="train[:10%]", test_split="test")
    splits = hdata.load_pairs(cfg)
    assert calls == [(src, {"name": "default", "data_dir": "harmless-base", "revision": "09be8c5",
                            "split": split}) for src, split in (("Anthropic/hh-rlhf", "train[:10%]"),
                                                                 ("Anthropic/hh-rlhf", "test"))]
    assert len(splits["train"]) == 3 and len(splits["test"]) == 3


def test_saved_dataset_dict_slices_as_datasets_reads_them(ultrafeedback_dir):
    """train_prefs[1:3], a percentage and a sum of splits select those rows of a saved
    DatasetDict; validation_split may slice the same split apart from hub_split's slice."""
    cfg = DataConfig(source=str(ultrafeedback_dir), format="prompt", columns={"chosen": "prompt",
                                                                              "rejected": "prompt_id"})
    def prompts(**kw):
        return [p.prompt for p in hdata.load_pairs(cfg.model_copy(update=kw))["train"]]

    assert prompts(hub_split="train_prefs[1:3]", split=ALL) == ["Translate 'cat' to French.", "What is 2 + 2?"]
    assert len(prompts(hub_split="train_prefs[:50%]", split=ALL)) == 2
    assert len(prompts(hub_split="train_prefs+test_prefs", split=ALL)) == 6
    splits = hdata.load_pairs(cfg.model_copy(update={"hub_split": "train_prefs[:3]",
                                                     "validation_split": "train_prefs[3:]"}))
    assert [p.prompt for p in splits["validation"]] == ["Give a synonym for happy."]


def test_given_split_that_is_the_training_split_or_hub_fields_on_a_file_are_refused(ultrafeedback_dir):
    """A validation split equal to the training one would evaluate on training pairs; hub-only
    fields on a local file do nothing. Both are errors naming the field."""
    with pytest.raises(DataError, match="data.validation_split: the validation pairs would be the training"):
        hdata.load_pairs(DataConfig(source=str(ultrafeedback_dir), hub_split="train_prefs",
                                    validation_split="train_prefs"))
    with pytest.raises(DataError, match="data.revision: set for a hub dataset"):
        hdata.load_pairs(DataConfig(source=str(HH), revision="main"))


# ----------------------------------------------------------------------------- preference strength


def test_min_score_gap_filters_train_only_and_counts_the_drops(tmp_path, ultrafeedback_dir, chat_tok):
    """UltraFeedback train gaps 7, 0.5, 0 (identical), 5: min_score_gap 1 keeps 2 pairs, drops
    1 by gap and 1 as identical; the test split (gaps 6, 0.5) keeps both, so every cell of a
    sweep over the gap is evaluated on the same pairs."""
    tok_dir = tmp_path / "tok"
    chat_tok.save_pretrained(tok_dir)
    cfg = build_config({"model": {"name": "tiny-xs", "tokenizer": str(tok_dir)},
                        "data": {"source": str(ultrafeedback_dir), "format": "messages",
                                 "hub_split": "train_prefs", "test_split": "test_prefs",
                                 "min_score_gap": 1.0}})
    counts = prepare.preview(cfg).counts
    assert (counts["data/train/kept"], counts["data/train/dropped_score_gap"],
            counts["data/train/dropped_identical"]) == (2, 1, 1)
    assert (counts["data/test/kept"], counts["data/test/dropped_score_gap"]) == (2, 0)


def test_min_score_gap_is_a_sweep_axis(tmp_path):
    """A study sweeping data.min_score_gap (all pairs against clear ones) validates, each cell's
    run config carries its gap, and a negative gap is refused naming the grid's field."""
    def study(values):
        path = tmp_path / "gap.yaml"
        path.write_text(yaml.safe_dump({"name": "gap", "sweep": {"grid": {"data.min_score_gap": values}}}))
        return path

    exp = load_experiment(study([None, 2.0]))
    assert [exp.run_config(c, {}, 0, "r", []).data.min_score_gap for c in exp.cells] == [None, 2.0]
    with pytest.raises(Exception, match=r"sweep.grid.data.min_score_gap\[0\]"):
        load_experiment(study([-1.0]))


# ----------------------------------------------------------------------------- bad records, exit 2


def _bad_cases(tmp_path, ultrafeedback_dir):
    """(data overrides, text the paragraph must hold) for one bad record per new layout."""
    hh = rows(HH)
    hh[1]["rejected"] = "\n\nHuman: Something else entirely.\n\nAssistant: No."
    se = rows(SE)
    del se[2]["response_k"]
    uf = rows(UF_TRAIN)
    uf[3]["score_rejected"] = "high"
    hh_f = write_jsonl(tmp_path / "hh.jsonl", hh)
    se_f = write_jsonl(tmp_path / "se.jsonl", se)
    uf_f = write_jsonl(tmp_path / "uf.jsonl", uf)
    mapped = ",".join(f"{k}: {v}" for k, v in SE_COLUMNS.items())
    return {
        "no shared prefix": ([f"data.source={hh_f}"],
                             f"{hh_f}: row 1 (0-based): fields 'chosen' and 'rejected' share no prefix"),
        "mapped column missing": ([f"data.source={se_f}", f"data.columns={{{mapped}}}"],
                                  f"{se_f}: row 2 (0-based): missing field 'response_k' (data.columns.rejected)"),
        "score not a number": ([f"data.source={uf_f}", "data.format=prompt",
                                "data.columns={chosen: prompt, rejected: prompt_id}"],
                               f"{uf_f}: row 3 (0-based): field 'score_rejected' must be a finite number, "
                               "got 'high'"),
        "slice out of range": ([f"data.source={ultrafeedback_dir}", "data.hub_split=train_prefs[2:50]"],
                               f"{ultrafeedback_dir}: data.hub_split 'train_prefs[2:50]': row 50 is out "
                               "of range for split 'train_prefs', which has 4 rows"),
    }


@pytest.mark.parametrize("case", ["no shared prefix", "mapped column missing", "score not a number",
                                  "slice out of range"])
@pytest.mark.parametrize("command", ["data", "train"])
def test_bad_record_in_each_new_layout_is_one_paragraph_and_exit_2(capsys, tmp_path, ultrafeedback_dir,
                                                                   monkeypatch, case, command):
    """`harness data` and `harness train` on a bad record: exit 2, one paragraph naming file, row
    and field, no traceback; train leaves no finished summary, no data counts and no weights."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sets, needle = _bad_cases(tmp_path, ultrafeedback_dir)[case]
    capsys.readouterr()  # the fixture's own output
    results = tmp_path / "results"
    base = [f"tracking.results_dir={results}", "tracking.progress=false", "model.name=tiny-xs",
            "train.max_steps=1", "data.format=auto"]
    code = main([command, str(SMOKE), *[a for s in (*base, *sets) for a in ("--set", s)]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    for summary in results.rglob("summary.json"):
        assert json.loads(summary.read_text())["status"] != "finished"
    assert not list(results.rglob("data_counts.json")) and not list(results.rglob("*.safetensors"))


# ----------------------------------------------------------------------------- harness data


def test_harness_data_on_the_seed_shows_the_first_pair_and_935_55_110(capsys, seed_data, tmp_path):
    """The seed experiment's first pair as the notebook has it (prompt bracketed as masked, the
    responses counted, eos included) and its 935 / 55 / 110 split, 6 identical pairs dropped."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({**yaml.safe_load(SMOKE.read_text()),
                                   "model": {"name": "tiny-xs"}, "data": {"source": str(seed_data)}}))
    assert main(["data", str(exp)]) == 0
    out = capsys.readouterr().out
    record = json.loads(seed_data.read_text())[0]
    prompt = hdata.format_alpaca_prompt(record["instruction"], record["input"])
    shown = "\n".join(f"{'prompt' if k == 0 else '':<8} | {line}"
                      for k, line in enumerate(f"⟦{prompt}⟧".split("\n")))
    assert shown in out and "### Input:\nfreind --> friend" in prompt
    assert f"chosen   | {record['chosen']}" in out and f"rejected | {record['rejected']}" in out
    table = out[out.index("\npairs"):].split("\n")[2:5]
    assert [line.split()[:3] for line in table] == [["train", "935", "929"], ["validation", "55", "55"],
                                                   ["test", "110", "110"]]
    assert table[0].split()[-2:] == ["6", "0"]  # dropped identical, dropped by score gap
    assert main(["train", str(exp), "--dry-run"]) == 0  # the same, the tokenizer now reused
    assert capsys.readouterr().out.splitlines()[1:] == out.splitlines()[1:]


def test_harness_data_marks_only_position_0_when_the_prompt_counts():
    """With dpo.mask_prompt false the prompt's tokens count except the first (nothing predicts
    it): only that token is bracketed."""
    tok = train_tokenizer(["Question one?", "Yes."], 300)
    items, _ = hdata.tokenize_pairs([Pair("Question one?", "Yes.", "No.")], tok, 64, add_eos=False,
                                    prompt_special_tokens=False)
    first = tok.decode(items[0].prompt_ids[:1])
    shown = hdata.show_pair(items[0], tok, mask_prompt=False)
    assert shown.splitlines()[0] == f"prompt   | ⟦{first}⟧{tok.decode(items[0].prompt_ids[1:])}"
    masked = hdata.show_pair(items[0], tok, mask_prompt=True)
    assert masked.splitlines() == ["prompt   | ⟦Question one?⟧", "chosen   | Yes.", "rejected | No."]


def test_seed_experiment_loads_with_the_new_fields_at_their_defaults():
    """The experiments that name the seed data keep their meaning: no columns, no score filter."""
    d = load_config(ROOT / "experiments" / "seed_polite.yaml").data
    assert (d.columns, d.min_score_gap, d.hub_config, d.validation_split) == ({}, None, None, None)


def test_summary_json_counts_the_pairs_dropped_by_score_gap(tmp_path, monkeypatch):
    """A one-step run on 20 scored pairs whose gaps alternate 0.5 and 2: min_score_gap 1 trains
    on the 8 of its 17 train pairs with gap 2, and summary.json says 9 were dropped by the gap."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    f = write_jsonl(tmp_path / "scored.jsonl", [
        {"prompt": f"Question {i}?", "chosen": f"Kind answer {i}.", "rejected": f"Rude answer {i}!",
         "score_chosen": 5.0 + (2.0 if i % 2 else 0.5), "score_rejected": 5.0} for i in range(20)])
    run_dir = tmp_path / "run"
    sets = [f"data.source={f}", "data.format=auto", "data.min_score_gap=1", "model.name=tiny-xs",
            "train.max_steps=1", "train.batch_size=2", "tracking.progress=false",
            "train.save_model=false", "train.test_at_end=false"]
    assert main(["train", str(SMOKE), "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["data/train/total"], summary["data/train/dropped_score_gap"],
            summary["data/train/kept"]) == (17, 9, 8)
    assert summary["data/test/dropped_score_gap"] == 0


def test_readme_data_layouts_are_valid_configs():
    """Each one-line `data:` config in the README's "Data layouts" block validates as a
    DataConfig, so the documented layouts cannot drift from the fields."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("#### Data layouts"):]
    block = block[block.index("```yaml\n") + 8:block.index("```\n", block.index("```yaml"))]
    entries = [e for e in block.split("\n#") if "data:" in e]
    assert len(entries) == 7
    for entry in entries:
        body = entry[entry.index("data:"):]
        DataConfig(**yaml.safe_load(body)["data"])
