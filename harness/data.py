"""Preference data: records from files, URLs or the hub → pairs → splits → token ids → batches.

A `Pair` is one prompt (templates applied, ending exactly where the response begins) with a
chosen and a rejected response. Prompt and responses are tokenized separately and concatenated,
so the first counted token is the first response token for any tokenizer (no character counting,
no fixed offsets). Bad rows are `DataError`s naming the file, the row and the field.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
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
    scores: tuple[float, float] | None = None  # (score_chosen, score_rejected) where records have them


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


def _split_rows(splits: dict, spec: str, where: str, field: str) -> list[dict]:
    """The rows of a saved DatasetDict that a split spec names: a split, or slices of splits as
    `datasets` reads them (train[:10%], train[100:200], train+test). `datasets` clamps a slice
    past the end to the end; here it is an error, so a typo cannot silently shorten the data."""
    datasets = _datasets()
    have = {name: len(ds) for name, ds in splits.items()}
    try:
        spec_ = datasets.ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as err:
        raise DataError(f"{where}: {field} {spec!r} is not a split `datasets` can read ({err}); "
                        f"give a split name ({', '.join(have)}) or a slice such as train[:10%] "
                        "or train[100:200]") from None
    for part in getattr(spec_, "_relative_instructions", []):
        if part.splitname not in have:
            raise DataError(f"{where}: no split {part.splitname!r} ({field} {spec!r}); has "
                            f"{list(have)}")
        n = have[part.splitname]
        for bound in (part.from_, part.to):
            if part.unit == "abs" and bound is not None and not -n <= bound <= n:
                raise DataError(f"{where}: {field} {spec!r}: row {bound} is out of range for split "
                                f"{part.splitname!r}, which has {n} rows. Give a slice within "
                                f"[{-n}:{n}], or a percentage such as {part.splitname}[:10%]")
    try:
        ranges = spec_.to_absolute(have)
    except ValueError as err:
        raise DataError(f"{where}: {field} {spec!r}: {err}") from None
    return [dict(r) for a in ranges for r in splits[a.splitname].select(range(a.from_, a.to))]


HUB_ONLY = ("hub_config", "hub_data_dir", "revision")  # DataConfig fields only a hub name uses


def _read(source: str, split: str, cfg: DataConfig, field: str, split_field: str
          ) -> tuple[list[dict], str]:
    """(records, where): `where` names the source, and its split for a DatasetDict or the hub,
    so that an error's row number can be found."""
    path = Path(source).expanduser()
    local = datafiles.is_url(source) or path.exists() or _looks_local(source)
    hub_set = [f"data.{k}" for k in HUB_ONLY if getattr(cfg, k) is not None]
    if local and hub_set and field == "data.source":
        raise DataError(f"{', '.join(hub_set)}: set for a hub dataset, but data.source {source} is "
                        "a local file, folder or URL. Remove them, or give the hub dataset's name")
    if datafiles.is_url(source):
        return _read_file(datafiles.locate(source, cfg.sha256, cfg.cache_dir)), source
    if path.is_dir():
        ds = _datasets().load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict
            return _split_rows(ds, split, str(path), split_field), f"{path} [split {split}]"
        return [dict(r) for r in ds], str(path)
    if path.is_file():
        return _read_file(path), source
    if local:
        raise DataError(
            f"{field}: no such file {source} (looked for {path.absolute()}; a relative path in an "
            "experiment file is read against the file's folder, then the current directory). Give "
            "the path of an existing file, or the file's URL with data.sha256 to find it by name in "
            f"${datafiles.DATA_ENV} or ../shared/data, else download it")
    # A hub dataset name: for users with hub access (not reachable here); `datasets` slices the split.
    records = _datasets().load_dataset(source, name=cfg.hub_config, data_dir=cfg.hub_data_dir,
                                       revision=cfg.revision, split=split)
    return [dict(r) for r in records], f"{source} [split {split}]"


def load_records(source: str, cfg: DataConfig, field: str = "data.source") -> list[dict]:
    """Raw records from a file, a `datasets` directory, a URL's file (harness.datafiles: found
    by name locally or downloaded, checked against data.sha256) or the hub (data.hub_split)."""
    return _read(source, cfg.hub_split, cfg, field, "data.hub_split")[0]


# ----------------------------------------------------------------------------- records → pairs


@dataclass(frozen=True)
class _Rows:
    """Where records come from and what the file calls each field, for error messages."""
    where: str
    columns: dict[str, str]

    def at(self, i: int) -> str:
        return f"{self.where}: row {i} (0-based)"

    def name(self, key: str) -> str:
        """The field as the file names it: 'question' (data.columns.prompt), or 'prompt'."""
        return f"{self.columns[key]!r} (data.columns.{key})" if key in self.columns else repr(key)


def _mapped(records: list, columns: dict[str, str]) -> list:
    """Records with the file's columns renamed to the harness's fields (data.columns); a field
    mapped elsewhere no longer reads the file's column of the same name."""
    if not columns:
        return records
    return [{**{k: v for k, v in r.items() if k not in columns},
             **{key: r[col] for key, col in columns.items() if col in r}} if isinstance(r, dict) else r
            for r in records]


def _text(record: Any, i: int, key: str, rows: _Rows | str, optional: bool = False) -> str:
    rows = rows if isinstance(rows, _Rows) else _Rows(rows, {})
    name = rows.name(key)
    if not isinstance(record, dict):
        raise DataError(f"{rows.at(i)}: expected an object, got {type(record).__name__}. "
                        "Each record is a JSON object with the pair's fields")
    if key not in record or record[key] is None:
        if optional:
            return ""
        fields = f" (the record's fields: {', '.join(map(str, record))})" if key in rows.columns else ""
        raise DataError(f"{rows.at(i)}: missing field {name}{fields}. Add it to that record or "
                        "remove the record")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{rows.at(i)}: field {name} must be text, got {type(value).__name__}. "
                        "Make it a string in that record")
    if not optional and not value.strip():
        raise DataError(f"{rows.at(i)}: field {name} is empty. Fill it in or remove the record")
    return value


def _with_system(prompt: str, system: str) -> str:
    """Plain formats: a system text goes before the prompt, a blank line between."""
    return f"{system}\n\n{prompt}" if system.strip() else prompt


def _scores(r: dict, i: int, rows: _Rows, required: bool) -> tuple[float, float] | None:
    """(score_chosen, score_rejected) when the record has them; both numbers, or an error."""
    keys = ("score_chosen", "score_rejected")
    if not required and all(r.get(k) is None for k in keys):
        return None
    out = []
    for key in keys:
        v = r.get(key)
        if v is None:
            why = "data.min_score_gap needs both scores" if required else "the other score is there"
            raise DataError(f"{rows.at(i)}: missing field {rows.name(key)} ({why}). Add it to that "
                            "record, map the file's column with data.columns, or remove the record")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise DataError(f"{rows.at(i)}: field {rows.name(key)} must be a finite number, got "
                            f"{v!r}. Fix that record's score or remove the record")
        out.append(float(v))
    return out[0], out[1]


def _alpaca(r: dict, i: int, rows: _Rows, tokenizer, cfg: DataConfig) -> Pair:
    prompt = format_alpaca_prompt(_text(r, i, "instruction", rows), _text(r, i, "input", rows, optional=True))
    return Pair(_with_system(prompt, _text(r, i, "system", rows, optional=True)),
                _text(r, i, "chosen", rows), _text(r, i, "rejected", rows))


def _prompt(r: dict, i: int, rows: _Rows, tokenizer, cfg: DataConfig) -> Pair:
    return Pair(_with_system(_text(r, i, "prompt", rows), _text(r, i, "system", rows, optional=True)),
                _text(r, i, "chosen", rows), _text(r, i, "rejected", rows))


def _transcript(r: dict, i: int, rows: _Rows, tokenizer, cfg: DataConfig) -> Pair:
    """Whole dialogues as strings (HH-RLHF): the prompt runs to the end of the last assistant tag
    that both texts share (TRL's implicit prompt, cut at a turn rather than at the first differing
    character, so answers that open alike stay whole); the responses are what follows."""
    chosen, rejected = _text(r, i, "chosen", rows), _text(r, i, "rejected", rows)
    shared = len(os.path.commonprefix([chosen, rejected]))
    tag = cfg.assistant_tag
    cut = chosen.rfind(tag, 0, shared)
    if cut < 0:
        raise DataError(f"{rows.at(i)}: fields {rows.name('chosen')} and {rows.name('rejected')} "
                        f"share no prefix that ends in an assistant turn ({tag!r}, data.assistant_tag; "
                        f"they share {shared} character(s)), so the prompt cannot be found. Give the "
                        "prompt in its own field (data.columns.prompt), set data.assistant_tag, or "
                        "remove the record")
    end = cut + len(tag)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[end:].strip():
            raise DataError(f"{rows.at(i)}: field {rows.name(key)} has no response after its last "
                            f"shared {tag!r}. Complete the answer or remove the record")
    return Pair(_with_system(chosen[:end], _text(r, i, "system", rows, optional=True)),
                chosen[end:], rejected[end:])


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(m, dict) and "role" in m for m in v)


def _as_messages(r: dict, i: int, key: str, rows: _Rows, role: str) -> list[dict]:
    """A field as chat messages: a list of messages, or a text as one message of `role`."""
    v = r.get(key)
    if _is_messages(v):
        return v
    if isinstance(v, str) and v.strip():
        return [{"role": role, "content": v}]
    what = "missing" if v is None else f"a {type(v).__name__}" if not isinstance(v, str) else "empty"
    raise DataError(f"{rows.at(i)}: field {rows.name(key)} must be a list of messages or a text, "
                    f"but is {what}. Fix that record or remove it")


def _render_messages(r: dict, i: int, rows: _Rows, tokenizer, cfg: DataConfig) -> Pair:
    """Chat records through the tokenizer's template. The prompt is the `prompt` field (messages,
    or a text: one user message), or, when chosen and rejected are whole conversations, the
    turns they share before their last message; UltraFeedback has both, and a string prompt
    beside conversations that already hold it is their first turn, not said twice."""
    if tokenizer is None:  # format auto found chat lists: the run loaded pairs before the tokenizer
        raise DataError(f"{rows.where}: the records are chat messages; set data.format: messages, "
                        "so that the tokenizer and its chat template are loaded first")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{rows.where}: the messages format needs a tokenizer with a chat template; "
                        "this tokenizer has none")
    chosen = _as_messages(r, i, "chosen", rows, "assistant")
    rejected = _as_messages(r, i, "rejected", rows, "assistant")
    conversations = len(chosen) > 1 or len(rejected) > 1
    if r.get("prompt") is None or (conversations and isinstance(r["prompt"], str)):
        prompt = chosen[:-1]
        if rejected[:-1] != prompt or not prompt:
            raise DataError(f"{rows.at(i)}: fields {rows.name('chosen')} and {rows.name('rejected')} "
                            "do not share a prompt (the turns before their last message). Give the "
                            "prompt in its own field or fix the record")
        chosen, rejected = chosen[-1:], rejected[-1:]
    else:
        prompt = _as_messages(r, i, "prompt", rows, "user")
    system = _text(r, i, "system", rows, optional=True)
    if system.strip() and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    for key, msgs in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        for m in msgs:
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise DataError(f"{rows.at(i)}: field {rows.name(key)}: a message has empty "
                                "or non-text content")
    render = tokenizer.apply_chat_template
    head = render(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        full = render(prompt + answer, tokenize=False)
        if not full.startswith(head):
            raise DataError(f"{rows.at(i)}: field {rows.name(key)}: the chat template does not "
                            "extend the rendered prompt, so the response cannot be separated")
        out.append(full[len(head):])
    return Pair(head, out[0], out[1])


# data.format → how a record becomes a pair.
FORMATS = {"alpaca": _alpaca, "prompt": _prompt, "transcript": _transcript, "messages": _render_messages}


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, dict):
        if "instruction" in record:
            return "alpaca"
        if _is_messages(record.get("chosen")) or _is_messages(record.get("prompt")):
            return "messages"
        if isinstance(record.get("prompt"), str):
            return "prompt"
        if record.get("prompt") is None and all(isinstance(record.get(k), str) for k in ("chosen", "rejected")):
            return "transcript"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: row 0: cannot tell the format from fields {keys}; set data.format "
                    "(alpaca: instruction/input/chosen/rejected; prompt: prompt/chosen/rejected; "
                    "transcript: chosen/rejected dialogues; messages: chat lists), and data.columns "
                    "for columns of other names")


def records_to_pairs(records: list[dict], fmt: str, where: str, tokenizer=None,
                     cfg: DataConfig | None = None) -> list[Pair]:
    """One pair per record, its columns renamed by data.columns; scores kept where present."""
    cfg = cfg or DataConfig()
    if not records:
        raise DataError(f"{where}: no records. Give a file with at least one preference record")
    records = _mapped(records, cfg.columns)
    rows = _Rows(where, cfg.columns)
    if fmt == "auto":
        fmt = detect_format(records[0], where)
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    pairs = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            _text(r, i, "chosen", rows)  # the error for a record that is no object
        pair = FORMATS[fmt](r, i, rows, tokenizer, cfg)
        scores = _scores(r, i, rows, required=cfg.min_score_gap is not None)
        pairs.append(replace(pair, scores=scores) if scores else pair)
    return pairs


def split_records(records: list, fractions: tuple[float, float, float]) -> dict[str, list]:
    """In file order, exactly as the seed notebook: train, then test, then validation."""
    n = len(records)
    n_train = int(n * fractions[0])
    n_test = int(n * fractions[2])
    return {"train": records[:n_train], "validation": records[n_train + n_test:],
            "test": records[n_train:n_train + n_test]}


def _source_pairs(cfg: DataConfig, tokenizer, source: str, split: str, field: str,
                  split_field: str, limit: int | None = None) -> list[Pair]:
    records, where = _read(source, split, cfg, field, split_field)
    return records_to_pairs(records[:limit], cfg.format, where, tokenizer, cfg)


def load_pairs(cfg: DataConfig, tokenizer=None) -> dict[str, list[Pair]]:
    """Pairs per split (`train`, `validation`, `test`): fractions of `source` in file order, or
    given sources / splits (validation_source, validation_split, test_...)."""
    given = {name: (src or cfg.source, split or cfg.hub_split)
             for name, src, split in (("validation", cfg.validation_source, cfg.validation_split),
                                      ("test", cfg.test_source, cfg.test_split)) if src or split}
    for name, source_split in given.items():
        if source_split == (cfg.source, cfg.hub_split):
            raise DataError(f"data.{name}_split: the {name} pairs would be the training pairs "
                            f"({cfg.source} [split {cfg.hub_split}]). Name another split or slice in "
                            f"data.{name}_split (e.g. test, or train[90%:] beside hub_split "
                            "train[:90%])")
    pairs = _source_pairs(cfg, tokenizer, cfg.source, cfg.hub_split, "data.source", "data.hub_split",
                          cfg.limit)
    if given:
        out = {"train": pairs, "validation": [], "test": []}
        for name, (src, split) in given.items():
            out[name] = _source_pairs(cfg, tokenizer, src, split, f"data.{name}_source",
                                      f"data.{name}_split")
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
                   add_eos: bool = True, prompt_special_tokens: bool = True,
                   min_score_gap: float | None = None) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Token ids with an exact prompt/response boundary, and counts of what the policies did:
    identical responses dropped, then pairs whose score gap is under `min_score_gap`, then the
    length policy."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError("data.add_eos: the tokenizer has no eos token")
    counts = {"pairs/total": len(pairs), "pairs/kept": 0, "pairs/truncated": 0,
              "pairs/dropped_too_long": 0, "pairs/dropped_identical": 0, "pairs/dropped_score_gap": 0}
    out = []
    for p in pairs:
        if p.chosen == p.rejected:
            counts["pairs/dropped_identical"] += 1
            continue
        if min_score_gap is not None:
            if p.scores is None:
                raise DataError("data.min_score_gap: these pairs carry no scores (score_chosen, "
                                "score_rejected); set it to null, or give records with scores")
            if p.scores[0] - p.scores[1] < min_score_gap:
                counts["pairs/dropped_score_gap"] += 1
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
    records, where = _read(cfg.source, cfg.hub_split, cfg, "data.source", "data.hub_split")
    records = _mapped(records[: cfg.limit], cfg.columns)
    rows = _Rows(where, cfg.columns)
    for i, r in enumerate(records):
        _text(r, i, field, rows)  # a missing or empty field is an error naming the row
    swapped = [{**r, "chosen": r[field], "rejected": r[field]} for r in records]
    plain = cfg.model_copy(update={"columns": {}, "min_score_gap": None})  # mapped above; no filter
    pairs = records_to_pairs(swapped, cfg.format, where, tokenizer, plain)
    return [p.prompt + p.chosen for p in split_records(pairs, cfg.split)["train"]]


# ----------------------------------------------------------------------------- a pair as the model sees it

MASKED = ("⟦", "⟧")  # brackets around tokens that do not count in a sequence log-prob


def _marked(ids: list[int], counted: list[bool], tokenizer) -> str:
    """The tokens decoded, each run of uncounted ones inside MASKED brackets."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or counted[k] != counted[start]:
            text = tokenizer.decode(ids[start:k], skip_special_tokens=False)
            out.append(text if counted[start] else f"{MASKED[0]}{text}{MASKED[1]}")
            start = k
    return "".join(out)


def show_pair(item: TokenizedPair, tokenizer, mask_prompt: bool) -> str:
    """prompt | chosen | rejected as the loss sees them (collate's loss_mask), one labelled block
    each, uncounted tokens bracketed."""
    batch = collate([item], tokenizer.pad_token_id or 0, mask_prompt)
    P = len(item.prompt_ids)
    parts = {"prompt": (0, 0, P), "chosen": (0, P, P + len(item.chosen_ids)),
             "rejected": (1, P, P + len(item.rejected_ids))}
    lines = []
    for label, (row, a, b) in parts.items():
        ids, counted = batch["input_ids"][row, a:b].tolist(), batch["loss_mask"][row, a:b].tolist()
        for k, line in enumerate(_marked(ids, counted, tokenizer).split("\n")):
            lines.append(f"{label if k == 0 else '':<8} | {line}")
    return "\n".join(lines)
