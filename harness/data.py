"""Preference data: records from files, URLs or the hub → pairs → splits → token ids → batches.

A `Pair` is one prompt (templates applied, ending exactly where the response begins) with a
chosen and a rejected response. Prompt and responses are tokenized separately and concatenated,
so the first counted token is the first response token for any tokenizer (no character counting,
no fixed offsets). Bad rows are `DataError`s naming the file, the row and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import datafiles
from harness.config import DataConfig
from harness.errors import DataError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_alpaca_prompt(instruction: str, input: str) -> str:  # noqa: A002 - the seed's field name
    """The seed notebook's template, with the response header that precedes every response."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]  # response tokens only (eos appended when add_eos)
    rejected_ids: tuple[int, ...]


def pair_length(p: TokenizedPair) -> int:
    """Width a pair needs in a batch: prompt + the longer of its two responses."""
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


# ----------------------------------------------------------------------------- sources


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or Path(source).suffix in (".json", ".jsonl", ".parquet")
            or os.sep in source and Path(source).expanduser().exists())


def _decoded(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is an error naming its offset and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is dropped
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: not UTF-8 text: byte {err.start} (0x{raw[err.start]:02x}, line {line}) "
                        f"cannot be decoded ({err.reason}). Save the file as UTF-8, e.g. "
                        "`iconv -f latin1 -t utf-8 IN > OUT`") from None


def _read_jsonl(path: Path) -> list:
    rows = []
    for i, line in enumerate(_decoded(path).splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {i + 1} is not valid JSON ({err.msg}, column {err.colno}). "
                            "Each line of a .jsonl file holds one JSON record: fix or remove that "
                            "line") from None
    return rows


def _read_json(path: Path) -> list:
    try:
        data = json.loads(_decoded(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}. "
                        "Fix the file there (a data file is a JSON list of records, or a .jsonl "
                        "file of one record per line)") from None
    if isinstance(data, dict):
        lists = [(k, v) for k, v in data.items() if isinstance(v, list)]
        keys = ", ".join(repr(k) for k in list(data)[:6]) + (", ..." if len(data) > 6 else "")
        hint = (f" Its key {lists[0][0]!r} holds a list of {len(lists[0][1])} item(s): make that list "
                "the whole file" if len(lists) == 1 else " Write the records as a list [{...}, {...}]")
        raise DataError(f"{path}: the top level is a JSON object (keys {keys}), not a list of "
                        f"records.{hint}")
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level is a JSON {type(data).__name__}, not a list of "
                        "records. Write the records as a list [{...}, {...}]")
    return data


def _read_file(path: Path) -> list:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    return _read_json(path)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading a `datasets` directory or hub dataset needs "
                        "`pip install dpo-harness[datasets]`") from None
    return datasets


def load_records(source: str, cfg: DataConfig, field: str = "data.source") -> list[dict]:
    """Raw records from a file, a `datasets` directory, a URL's file (harness.datafiles: found
    by name locally or downloaded, checked against data.sha256) or the hub."""
    if datafiles.is_url(source):
        return _read_file(datafiles.locate(source, cfg.sha256, cfg.cache_dir))
    path = Path(source).expanduser()
    if path.is_dir():
        ds = _datasets().load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict
            if cfg.hub_split not in ds:
                raise DataError(f"{path}: no split {cfg.hub_split!r} (data.hub_split); has {list(ds)}")
            ds = ds[cfg.hub_split]
        return [dict(r) for r in ds]
    if path.is_file():
        return _read_file(path)
    if _looks_local(source):
        raise DataError(
            f"{field}: no such file {source} (looked for {path.absolute()}; a relative path in an "
            "experiment file is read against the file's folder, then the current directory). Give "
            "the path of an existing file, or the file's URL with data.sha256 to find it by name in "
            f"${datafiles.DATA_ENV} or ../shared/data, else download it")
    # A hub dataset name: kept for users with hub access; not reachable here.
    return [dict(r) for r in _datasets().load_dataset(source, split=cfg.hub_split)]


# ----------------------------------------------------------------------------- records → pairs


def _text(record: Any, i: int, key: str, where: str, optional: bool = False) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: row {i} (0-based): expected an object, got {type(record).__name__}. "
                        "Each record is a JSON object with the pair's fields")
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise DataError(f"{where}: row {i} (0-based): missing field {key!r}. Add it to that record "
                        "or remove the record")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: row {i} (0-based): field {key!r} must be text, got "
                        f"{type(value).__name__}. Make it a string in that record")
    if not optional and not value.strip():
        raise DataError(f"{where}: row {i} (0-based): field {key!r} is empty. Fill it in or remove "
                        "the record")
    return value


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(m, dict) and "role" in m for m in v)


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, dict):
        if "instruction" in record:
            return "alpaca"
        if _is_messages(record.get("chosen")) or _is_messages(record.get("prompt")):
            return "messages"
        if isinstance(record.get("prompt"), str):
            return "prompt"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: row 0: cannot tell the format from fields {keys}; set data.format "
                    "(alpaca: instruction/input/chosen/rejected; prompt: prompt/chosen/rejected; "
                    "messages: chat lists)")


def _render_messages(r: dict, i: int, where: str, tokenizer) -> Pair:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the messages format needs a tokenizer with a chat template; "
                        "this tokenizer has none")
    for key in ("chosen", "rejected"):
        if not _is_messages(r.get(key)):
            raise DataError(f"{where}: row {i} (0-based): field {key!r} must be a list of messages")
    if "prompt" in r:
        if not _is_messages(r["prompt"]):
            raise DataError(f"{where}: row {i} (0-based): field 'prompt' must be a list of messages")
        prompt, chosen, rejected = r["prompt"], r["chosen"], r["rejected"]
    else:  # full conversations sharing a prefix; the last message is the answer
        prompt, chosen, rejected = r["chosen"][:-1], r["chosen"][-1:], r["rejected"][-1:]
        if r["rejected"][:-1] != prompt:
            raise DataError(f"{where}: row {i} (0-based): chosen and rejected do not share a prompt")
    for key, msgs in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        for m in msgs:
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise DataError(f"{where}: row {i} (0-based): field {key!r}: a message has empty "
                                "or non-text content")
    render = tokenizer.apply_chat_template
    head = render(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        full = render(prompt + answer, tokenize=False)
        if not full.startswith(head):
            raise DataError(f"{where}: row {i} (0-based): field {key!r}: the chat template does not "
                            "extend the rendered prompt, so the response cannot be separated")
        out.append(full[len(head):])
    return Pair(head, out[0], out[1])


def records_to_pairs(records: list[dict], fmt: str, where: str, tokenizer=None) -> list[Pair]:
    if not records:
        raise DataError(f"{where}: no records. Give a file with at least one preference record")
    if fmt == "auto":
        fmt = detect_format(records[0], where)
    pairs = []
    for i, r in enumerate(records):
        if fmt == "alpaca":
            prompt = format_alpaca_prompt(_text(r, i, "instruction", where),
                                          _text(r, i, "input", where, optional=True))
            pairs.append(Pair(prompt, _text(r, i, "chosen", where), _text(r, i, "rejected", where)))
        elif fmt == "prompt":
            pairs.append(Pair(_text(r, i, "prompt", where), _text(r, i, "chosen", where),
                              _text(r, i, "rejected", where)))
        elif fmt == "messages":
            pairs.append(_render_messages(r, i, where, tokenizer))
        else:
            raise DataError(f"data.format: unknown format {fmt!r}; valid: auto, alpaca, prompt, messages")
    return pairs


def split_records(records: list, fractions: tuple[float, float, float]) -> dict[str, list]:
    """In file order, exactly as the seed notebook: train, then test, then validation."""
    n = len(records)
    n_train = int(n * fractions[0])
    n_test = int(n * fractions[2])
    return {"train": records[:n_train], "validation": records[n_train + n_test:],
            "test": records[n_train:n_train + n_test]}


def load_pairs(cfg: DataConfig, tokenizer=None) -> dict[str, list[Pair]]:
    """Pairs per split (`train`, `validation`, `test`)."""
    records = load_records(cfg.source, cfg)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    pairs = records_to_pairs(records, cfg.format, cfg.source, tokenizer)
    if cfg.validation_source or cfg.test_source:
        out = {"train": pairs, "validation": [], "test": []}
        for split, src in (("validation", cfg.validation_source), ("test", cfg.test_source)):
            if src:
                records = load_records(src, cfg, field=f"data.{split}_source")
                out[split] = records_to_pairs(records, cfg.format, src, tokenizer)
        return out
    out = split_records(pairs, cfg.split)
    if not out["train"]:
        raise DataError(f"{cfg.source}: {len(pairs)} record(s) leave no training pair with data.split "
                        f"{list(cfg.split)}. Use a file with more records, a larger data.limit, or a "
                        "larger first data.split fraction")
    return out


def iter_texts(pairs: list[Pair]) -> Iterator[str]:
    for p in pairs:
        yield p.prompt
        yield p.chosen
        yield p.rejected


# ----------------------------------------------------------------------------- tokens


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int, too_long: str = "truncate",
                   add_eos: bool = True, prompt_special_tokens: bool = True
                   ) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Token ids with an exact prompt/response boundary, and counts of what the policies did."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError("data.add_eos: the tokenizer has no eos token")
    counts = {"pairs/total": len(pairs), "pairs/kept": 0, "pairs/truncated": 0,
              "pairs/dropped_too_long": 0, "pairs/dropped_identical": 0}
    out = []
    for p in pairs:
        if p.chosen == p.rejected:
            counts["pairs/dropped_identical"] += 1
            continue
        prompt = tuple(tokenizer(p.prompt, add_special_tokens=prompt_special_tokens)["input_ids"])
        responses = []
        for text in (p.chosen, p.rejected):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            responses.append(tuple(ids + [eos] if add_eos else ids))
        room = max_length - len(prompt)
        if max(len(r) for r in responses) > room:
            if too_long == "drop" or room < 1:
                counts["pairs/dropped_too_long"] += 1
                continue
            responses = [r[:room] for r in responses]
            counts["pairs/truncated"] += 1
        out.append(TokenizedPair(prompt, responses[0], responses[1]))
    counts["pairs/kept"] = len(out)
    return out, counts


Batch = dict[str, torch.Tensor]


def batches(items: list[TokenizedPair], order: list[int], batch_size: int, pad_id: int,
            mask_prompt: bool, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, Batch]]:
    """(pair indices [B], collated batch) in the given order."""
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield torch.tensor(idx), collate([items[i] for i in idx], pad_id, mask_prompt)


def length_grouped(order: list[int], items: list[TokenizedPair], batch_size: int,
                   generator: torch.Generator, chunk_batches: int = 16) -> list[int]:
    """`order` regrouped so that each batch holds pairs of similar length (less padding): sorted
    by length within chunks of `chunk_batches` batches, then the batches shuffled (seeded). Every
    pair still appears once; a partial batch stays last, so `drop_last` drops the same count."""
    lengths = [pair_length(p) for p in items]
    size = batch_size * chunk_batches
    full, partial = [], []
    for s in range(0, len(order), size):
        chunk = sorted(order[s : s + size], key=lambda i: lengths[i])
        for k in range(0, len(chunk), batch_size):
            (full if len(chunk[k : k + batch_size]) == batch_size else partial).append(chunk[k : k + batch_size])
    perm = torch.randperm(len(full), generator=generator).tolist()
    return [i for b in perm for i in full[b]] + [i for b in partial for i in b]


def collate(batch: list[TokenizedPair], pad_id: int, mask_prompt: bool) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected, right-padded to the longest.

    input_ids [2B, T] long; attention_mask [2B, T] long; loss_mask [2B, T] bool (True where the
    token at that position counts: response always, prompt only when not masked, never position 0
    nor padding); prompt_lens [2B] long.
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in batch] + [(p.prompt_ids, p.rejected_ids) for p in batch]
    T = max(len(a) + len(b) for a, b in rows)
    n = len(rows)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    attention = torch.zeros((n, T), dtype=torch.long)
    loss_mask = torch.zeros((n, T), dtype=torch.bool)
    prompt_lens = torch.zeros(n, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        L, P = len(prompt) + len(response), len(prompt)
        input_ids[i, :L] = torch.tensor(prompt + response, dtype=torch.long)
        attention[i, :L] = 1
        loss_mask[i, (1 if not mask_prompt else P):L] = True
        loss_mask[i, 0] = False
        prompt_lens[i] = P
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "prompt_lens": prompt_lens}


def sft_texts(cfg: DataConfig, field: str, tokenizer=None) -> list[str]:
    """Prompt + response texts of the train split for an SFT stage: the `chosen` response, or
    any other record field (the seed's `output`: the reference answer)."""
    if field == "chosen":
        return [p.prompt + p.chosen for p in load_pairs(cfg, tokenizer)["train"]]
    records = load_records(cfg.source, cfg)[: cfg.limit]
    where = cfg.source
    for i, r in enumerate(records):
        _text(r, i, field, where)  # a missing or empty field is an error naming the row
    swapped = [{**r, "chosen": r[field], "rejected": r[field]} for r in records]
    pairs = records_to_pairs(swapped, cfg.format, where, tokenizer)
    return [p.prompt + p.chosen for p in split_records(pairs, cfg.split)["train"]]
