"""Data: every format and source, the seed split, URL download with sha256, bad rows, the exact
prompt/response boundary for two tokenizers, collate masks, and the length/identity policies."""

import hashlib
import http.server
import json
import threading

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from harness import data as hdata
from harness.config import DataConfig
from harness.data import DataError, Pair, TokenizedPair

PAIRS = [
    {"prompt": f"Question {i}:\n\n", "chosen": f"Kind answer {i}.", "rejected": f"Rude answer {i}!"}
    for i in range(20)
]


def cfg(source, **kw):
    return DataConfig(source=str(source), **kw)


# ----------------------------------------------------------------------------- formats and sources


def test_seed_file_split_is_935_55_110_in_file_order(seed_data):
    """The seed notebook's split: train first, then the 110 test pairs, then the last 55 for validation."""
    splits = hdata.load_pairs(cfg(seed_data))
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [935, 55, 110]
    records = json.loads(seed_data.read_text())
    assert splits["validation"][-1].chosen == records[-1]["chosen"]
    assert splits["validation"][0].chosen == records[1045]["chosen"]
    assert splits["test"][0].chosen == records[935]["chosen"]
    p = splits["train"][0]
    assert p.prompt == hdata.format_alpaca_prompt(records[0]["instruction"], records[0]["input"])
    assert p.prompt.endswith("\n\n### Response:\n") and "### Input:\nfreind --> friend" in p.prompt
    no_input = next(i for i, r in enumerate(records) if not r["input"])
    assert "### Input" not in splits["train"][no_input].prompt


def test_jsonl_parquet_and_datasets_dir_give_the_same_pairs(tmp_path):
    """prompt/chosen/rejected from JSONL, Parquet and a `datasets` saved directory are identical."""
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n\n")
    parquet = tmp_path / "p.parquet"
    pd.DataFrame(PAIRS).to_parquet(parquet)
    datasets = pytest.importorskip("datasets")
    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(ds_dir))
    want = [Pair(**r) for r in PAIRS]
    for source in (jsonl, parquet, ds_dir):
        got = hdata.load_pairs(cfg(source, split=(1.0, 0.0, 0.0)))["train"]
        assert got == want, source


def test_given_split_files(tmp_path):
    """validation_source / test_source replace the fractions; the whole source trains."""
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in PAIRS))
    v = tmp_path / "v.jsonl"
    v.write_text(json.dumps(PAIRS[0]))
    splits = hdata.load_pairs(cfg(f, validation_source=str(v)))
    assert len(splits["train"]) == 20 and len(splits["validation"]) == 1 and splits["test"] == []


class _Server:
    """A local HTTP server on 127.0.0.1 counting the requests it answers."""

    def __init__(self, root):
        self.hits = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def do_GET(self):  # noqa: N802
                outer.hits += 1
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_url_downloaded_once_and_verified(tmp_path):
    """A URL is fetched once into the cache; a wrong sha256 fails and leaves no file; none is an error."""
    served = tmp_path / "srv"
    served.mkdir()
    body = json.dumps(PAIRS).encode()
    (served / "pairs.json").write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    server = _Server(served)
    cache = tmp_path / "cache"
    try:
        url = f"{server.url}/pairs.json"
        for _ in range(2):
            pairs = hdata.load_pairs(cfg(url, sha256=digest, cache_dir=str(cache), split=(1.0, 0, 0)))
            assert len(pairs["train"]) == 20
        assert server.hits == 1
        bad_cache = tmp_path / "bad"
        with pytest.raises(DataError, match="sha256 mismatch"):
            hdata.load_pairs(cfg(url, sha256="0" * 64, cache_dir=str(bad_cache)))
        assert not any(bad_cache.iterdir())
        with pytest.raises(DataError, match="data.sha256 is required"):
            hdata.load_pairs(cfg(url, cache_dir=str(cache)))
    finally:
        server.close()


@pytest.mark.parametrize(
    "row,needle",
    [
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be text, got int"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, needle):
    """A bad row stops loading with the file, the 0-based row number and the field."""
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [PAIRS[0], PAIRS[1], row]))
    with pytest.raises(DataError) as err:
        hdata.load_pairs(cfg(f))
    assert str(f) in str(err.value) and "row 2" in str(err.value) and needle in str(err.value)


def test_unknown_format_and_missing_file(tmp_path):
    """Records of no known layout, and a path that does not exist, are clear errors."""
    f = tmp_path / "odd.json"
    f.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match="cannot tell the format"):
        hdata.load_pairs(cfg(f))
    with pytest.raises(DataError, match="no such file"):
        hdata.load_pairs(cfg(tmp_path / "missing.json"))


def test_messages_both_layouts(tmp_path):
    """Chat records render through the tokenizer's template; both TRL layouts give the same pair."""
    from harness.models import train_tokenizer

    tok = train_tokenizer(["hello there, how are you", "fine thanks"], 300)
    user = [{"role": "user", "content": "How are you?"}]
    good = [{"role": "assistant", "content": "Very well, thank you."}]
    bad = [{"role": "assistant", "content": "None of your business."}]
    explicit = {"prompt": user, "chosen": good, "rejected": bad}
    implicit = {"chosen": user + good, "rejected": user + bad}
    a = hdata.records_to_pairs([explicit], "auto", "mem", tok)[0]
    b = hdata.records_to_pairs([implicit], "messages", "mem", tok)[0]
    assert a == b
    assert a.prompt.endswith("<|assistant|>\n") and "How are you?" in a.prompt
    assert a.chosen.startswith("Very well")
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        hdata.records_to_pairs([explicit], "messages", "mem", tok)


# ----------------------------------------------------------------------------- tokens


def _bpe(texts, vocab, merges=True):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merges)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


CORPUS = [f"Instruction {i}\n\n### Response:\nAnswer {i} is here.\n\n" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizers_pair():
    """Two different tokenizers: one whose merges cross the prompt/response boundary (no
    pre-tokenizer split, so "\\n\\n" and the text around it merge), one with regex splitting."""
    return {"merging": _bpe(CORPUS, 400, merges=True), "splitting": _bpe(CORPUS, 300, merges=False)}


def test_merging_tokenizer_really_merges_across_the_boundary(tokenizers_pair):
    """The first tokenizer gives different tokens for prompt+response jointly than separately:
    counting prompt tokens in the joint encoding would put the boundary in the wrong place."""
    tok = tokenizers_pair["merging"]
    prompt, response = "Instruction 7\n\n### Response:\n", "Answer 7 is here.\n\n"
    joint = tok(prompt + response)["input_ids"]
    separate = tok(prompt)["input_ids"] + tok(response)["input_ids"]
    assert joint != separate
    n_prompt = len(tok(prompt)["input_ids"])
    assert tok.decode(joint[:n_prompt]) != prompt  # a fixed prompt-length offset would be wrong


@pytest.mark.parametrize("which", ["merging", "splitting"])
def test_boundary_is_exact_for_any_tokenizer(tokenizers_pair, which):
    """The first counted token is the first response token: decode(prompt ids) is the prompt,
    decode(response ids) the response, and loss_mask starts exactly at len(prompt_ids)."""
    tok = tokenizers_pair[which]
    pairs = [Pair("Instruction 7\n\n### Response:\n", "Answer 7 is here.", "Answer 8 is there."),
             Pair("Instruction 12\n\n### Response:\n", "\n\nAnswer 12.", "No.")]
    items, counts = hdata.tokenize_pairs(pairs, tok, max_length=64)
    assert counts["pairs/kept"] == 2
    for p, t in zip(pairs, items, strict=True):
        assert tok.decode(t.prompt_ids) == p.prompt
        assert tok.decode(t.chosen_ids[:-1]) == p.chosen and t.chosen_ids[-1] == tok.eos_token_id
        assert tok.decode(t.rejected_ids[:-1]) == p.rejected
    batch = hdata.collate(items, tok.pad_token_id, mask_prompt=True)
    for row in range(4):
        t = items[row % 2]
        first = int(batch["loss_mask"][row].nonzero()[0])
        assert first == len(t.prompt_ids)
        response = t.chosen_ids if row < 2 else t.rejected_ids
        assert batch["input_ids"][row, first].item() == response[0]


def test_collate_by_hand():
    """Shapes, right padding, and loss_mask with the prompt masked and included."""
    items = [TokenizedPair((5, 6), (7, 8, 9), (10,)), TokenizedPair((5,), (11,), (12, 13))]
    b = hdata.collate(items, pad_id=0, mask_prompt=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 11, 0, 0, 0], [5, 6, 10, 0, 0], [5, 12, 13, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    F, T = False, True
    assert b["loss_mask"].tolist() == [[F, F, T, T, T], [F, T, F, F, F], [F, F, T, F, F], [F, T, T, F, F]]
    assert b["prompt_lens"].tolist() == [2, 1, 2, 1]
    full = hdata.collate(items, pad_id=0, mask_prompt=False)["loss_mask"]
    # The prompt counts except position 0, which has nothing before it to predict it.
    assert full.tolist() == [[F, T, T, T, T], [F, T, F, F, F], [F, T, T, F, F], [F, T, T, F, F]]
    assert full.dtype == torch.bool


def test_identical_and_too_long_pairs_policies(tokenizers_pair):
    """Identical pairs are dropped; long ones truncated to max_length or dropped; all counted."""
    tok = tokenizers_pair["splitting"]
    long = "Answer " * 40
    pairs = [Pair("Instruction 1\n\n", "same", "same"), Pair("Instruction 2\n\n", long, "short"),
             Pair("Instruction 3\n\n", "fine", "also fine")]
    kept, c = hdata.tokenize_pairs(pairs, tok, max_length=24, too_long="truncate")
    assert c == {"pairs/total": 3, "pairs/kept": 2, "pairs/truncated": 1, "pairs/dropped_too_long": 0,
                 "pairs/dropped_identical": 1, "pairs/dropped_score_gap": 0}
    assert len(kept[0].prompt_ids) + len(kept[0].chosen_ids) == 24
    assert len(kept[0].prompt_ids) + len(kept[0].rejected_ids) <= 24
    kept, c = hdata.tokenize_pairs(pairs, tok, max_length=24, too_long="drop")
    assert c["pairs/dropped_too_long"] == 1 and c["pairs/kept"] == 1
