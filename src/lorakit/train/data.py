"""Training data: read a file, find its layout, tokenize, split, pack or truncate, batch.

Layouts (field names are options of TrainConfig, shown here with their defaults):
    {"text": ...}                               causal LM, loss on every token
    {"prompt": ..., "completion": ...}          causal LM, loss on the completion only
    {"messages": [{"role", "content"}, ...]}    chat rendered by the tokenizer's chat template,
                                                loss on the assistant turns (chat_loss="assistant")
    {"text": ..., "label": ...}                 sequence classification
Files: .jsonl (one JSON object a line), .json (a list of objects), .csv (header row), .txt (documents split
on blank lines, or one per line when the file has no blank line).

Every example ends in EOS (causal LM) so the model learns to stop. The eval split is drawn from the records
before packing, so no eval text leaks into training blocks. Truncation is never silent: it is counted and
reported in ``DataStats``.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

IGNORE_INDEX = -100
"""Label value that the loss skips (prompt tokens, padding)."""


@dataclass
class Example:
    """One tokenized example: token ids and either per-token labels (causal LM) or a class index."""

    input_ids: list[int]
    labels: list[int] | int


@dataclass
class DataStats:
    """What tokenization did to one file: counts a user should see before trusting a run."""

    source: str
    kind: str = ""
    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    tokens_dropped: int = 0
    dropped_no_target: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        line = (f"{self.source}: {self.kind}, {self.records:,} records -> {self.examples:,} sequences, "
                f"{self.tokens:,} tokens ({self.trained_tokens:,} with loss)")
        if self.truncated:
            fix = "raise --seq-len" if self.kind == "classification" else "raise --seq-len or use --packing"
            line += f"; TRUNCATED {self.truncated:,} examples ({self.tokens_dropped:,} tokens dropped): {fix}"
        if self.dropped_no_target:
            line += f"; {self.dropped_no_target:,} examples dropped (nothing left to learn after truncation)"
        return line


@dataclass
class DataBundle:
    """The tokenized train and eval sets plus what is needed to interpret them."""

    train: list[Example]
    eval: list[Example]
    kind: str
    label_names: list[str] | None = None
    stats: list[DataStats] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ reading
def read_records(path: str | Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The file's records as dicts (.txt gives {"text": document})."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise DataError(f"data path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".txt", ".text", ".md"):
        raise DataError(f"data file {str(path)!r}: unknown type {suffix!r}; use .jsonl, .json, .csv or .txt")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace")
        if notes is not None:
            notes.append(f"{path.name} is not valid UTF-8 (first bad byte at offset {err.start}); "
                         "undecodable bytes were replaced by U+FFFD")
    text = text.removeprefix("\ufeff")
    if suffix in (".jsonl", ".ndjson"):
        records = _parse_jsonl(text, path)
    elif suffix == ".json":
        records = _parse_json(text, path)
    elif suffix == ".csv":
        records = _parse_csv(text, path)
    else:
        records = [{"text": doc} for doc in _split_documents(text)]
    if not records:
        raise DataError(f"data file {str(path)!r} is empty: no records")
    return records


def _parse_jsonl(text: str, path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path.name} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            found = type(record).__name__
            raise DataError(f"{path.name} line {number}: expected a JSON object, found {found}")
        records.append(record)
    return records


def _parse_json(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as err:
        raise DataError(f"{path.name}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path.name}: expected a JSON list of objects (or use .jsonl, one object a line)")
    return data


def _parse_csv(text: str, path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        records = [dict(row) for row in reader]
    except csv.Error as err:
        raise DataError(f"{path.name} line {reader.line_num}: malformed CSV ({err})") from None
    if reader.fieldnames is None:
        raise DataError(f"data file {str(path)!r} is empty: no header row")
    if any(None in row for row in records):
        bad = next(i for i, row in enumerate(records, 2) if None in row)
        raise DataError(
            f"{path.name} line {bad}: more values than the {len(reader.fieldnames)} header columns"
        )
    return records


def _split_documents(text: str) -> list[str]:
    lines = text.splitlines()
    if any(not line.strip() for line in lines):
        docs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line)
            elif current:
                docs.append("\n".join(current))
                current = []
        return docs
    return [line for line in lines if line.strip()]


# ------------------------------------------------------------------------------------------ layout
def detect_kind(records: list[dict], cfg, task: str, source: str) -> str:
    """'classification', 'chat', 'prompt-completion' or 'text', checked on every record."""
    keys = list(records[0])
    columns = ", ".join(repr(k) for k in keys) or "none"
    if task == "classification":
        for col in (cfg.text_column, cfg.label_column):
            if col not in records[0]:
                raise DataError(
                    f"{source}: no column {col!r} (columns: {columns}); set --text-column / --label-column"
                )
        kind, needed = "classification", (cfg.text_column, cfg.label_column)
    elif cfg.messages_column in records[0]:
        kind, needed = "chat", (cfg.messages_column,)
    elif cfg.prompt_column in records[0] and cfg.completion_column in records[0]:
        kind, needed = "prompt-completion", (cfg.prompt_column, cfg.completion_column)
    elif cfg.text_column in records[0]:
        kind, needed = "text", (cfg.text_column,)
    else:
        raise DataError(
            f"{source}: no column {cfg.text_column!r} (nor {cfg.prompt_column!r}+{cfg.completion_column!r}, "
            f"nor {cfg.messages_column!r}); columns: {columns}. Name yours with --text-column, "
            "--prompt-column, --completion-column or --messages-column"
        )
    for number, record in enumerate(records, 1):
        for col in needed:
            if col not in record:
                raise DataError(f"{source} record {number}: no {col!r} (the first record has it)")
            value = record[col]
            if col == cfg.messages_column and kind == "chat":
                _check_messages(value, source, number)
            elif col != cfg.label_column and not isinstance(value, str):
                raise DataError(
                    f"{source} record {number}: {col!r} must be a string, got {type(value).__name__}"
                )
    return kind


def _check_messages(messages: Any, source: str, number: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source} record {number}: 'messages' must be a non-empty list of {{role, content}}")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(
                f"{source} record {number}: each message needs string 'role' and 'content', got {m!r}"
            )


# ------------------------------------------------------------------------------------------ tokenize
def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_causal(record: dict, kind: str, tokenizer, cfg, stats: DataStats) -> Example | None:
    """One record -> Example with labels (IGNORE_INDEX where no loss), before truncation."""
    if kind == "text":
        text = record[cfg.text_column]
        if not text.strip():
            return None
        ids = _with_eos(tokenizer, _ids(tokenizer, text, True))
        return Example(ids, list(ids))
    if kind == "prompt-completion":
        prompt = _ids(tokenizer, record[cfg.prompt_column], True)
        if (
            prompt
            and tokenizer.eos_token_id is not None
            and prompt[-1] == tokenizer.eos_token_id
            and len(prompt) > 1
        ):
            prompt = prompt[:-1]  # a tokenizer that appends EOS: the prompt does not end the text
        completion = _with_eos(tokenizer, _ids(tokenizer, record[cfg.completion_column], False))
        return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    return _encode_chat(record[cfg.messages_column], tokenizer, cfg, stats)


def _encode_chat(messages: list[dict], tokenizer, cfg, stats: DataStats) -> Example:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{stats.source} holds chat 'messages' but the tokenizer has no chat_template; "
            "add one to tokenizer_config.json or convert the data to prompt/completion"
        )

    def render(msgs, gen=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    enc = tokenizer(
        full,
        add_special_tokens=False,
        return_offsets_mapping=cfg.chat_loss == "assistant" and getattr(tokenizer, "is_fast", False),
    )
    ids = list(enc["input_ids"])
    if cfg.chat_loss == "all":
        return Example(ids, list(ids))
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, upto = render(messages[:i], gen=True) if i else "", render(messages[: i + 1])
        if not (upto.startswith(prefix) and full.startswith(upto)):
            spans = None
            break
        spans.append((len(prefix), len(upto)))
    if spans is None or "offset_mapping" not in enc:
        if "chat template is not prefix-stable" not in " ".join(stats.notes):
            stats.notes.append(
                "chat template is not prefix-stable (or the tokenizer is not a fast one): "
                "loss on every token of those chats"
            )
        return Example(ids, list(ids))
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, enc["offset_mapping"])
    ]
    return Example(ids, labels)


def label_mapping(values: Sequence[Any], model_label2id: dict[str, int] | None, source: str) -> list[str]:
    """Class names in id order. Integer labels keep their value; strings use the model's label2id when it
    names them all, otherwise sorted order."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) or all(
        isinstance(v, str) and v.strip().lstrip("-").isdigit() for v in values
    ):
        ints = sorted({int(v) for v in values})
        if ints[0] < 0:
            raise DataError(f"{source}: integer labels must be >= 0, found {ints[0]}")
        return [str(i) for i in range(ints[-1] + 1)]
    if not all(isinstance(v, str) for v in values):
        bad = next(v for v in values if not isinstance(v, (str, int)) or isinstance(v, bool))
        raise DataError(f"{source}: labels must be integers or strings, found {bad!r}")
    names = sorted({v.strip() for v in values})
    if model_label2id and all(n in model_label2id for n in names):
        inv = {i: n for n, i in model_label2id.items()}
        return [inv[i] for i in range(len(inv))]
    return names


def encode_classification(record: dict, tokenizer, cfg, names: list[str]) -> Example:
    ids = _ids(tokenizer, record[cfg.text_column], True)
    value = record[cfg.label_column]
    label = int(value) if names == [str(i) for i in range(len(names))] else names.index(str(value).strip())
    return Example(ids, label)


# ------------------------------------------------------------------------------------------ shaping
def split_records(records: list, fraction: float, seed: int, source: str) -> tuple[list, list]:
    """(train in file order, eval in shuffled order): a seeded draw of round(n * fraction) records (>= 1)."""
    if fraction <= 0:
        return records, []
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise DataError(
            f"{source} has {len(records)} record(s): too few to hold out an eval split; "
            "add data, give --eval-data, or set --eval-fraction 0"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    # eval in shuffled order, so that --eval-batches reads a random sample even of a file sorted by label
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:n_eval]]


def truncate(
    examples: list[Example], seq_len: int, stats: DataStats, keep_last: bool = False
) -> list[Example]:
    """Cut each example to seq_len tokens, counting what is lost; drop examples left with no target."""
    out = []
    for ex in examples:
        if len(ex.input_ids) > seq_len:
            stats.truncated += 1
            stats.tokens_dropped += len(ex.input_ids) - seq_len
            if keep_last:  # a classifier keeps its closing [SEP]
                ex = Example(ex.input_ids[: seq_len - 1] + ex.input_ids[-1:], ex.labels)
            else:
                ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        if isinstance(ex.labels, list) and all(t == IGNORE_INDEX for t in ex.labels[1:]):
            stats.dropped_no_target += 1
            continue
        out.append(ex)
    return out


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples and cut the stream into seq_len blocks (the last one may be shorter)."""
    ids = [t for ex in examples for t in ex.input_ids]
    labels = [t for ex in examples for t in ex.labels]
    return [Example(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


def tokenize_records(
    records: list[dict], kind: str, tokenizer, cfg, stats: DataStats, label_names: list[str] | None = None
) -> list[Example]:
    stats.kind, stats.records = kind, len(records)
    if kind == "classification":
        examples = [encode_classification(r, tokenizer, cfg, label_names) for r in records]
        examples = truncate(examples, cfg.seq_len, stats, keep_last=True)
    else:
        examples = [e for r in records if (e := encode_causal(r, kind, tokenizer, cfg, stats)) is not None]
        examples = pack(examples, cfg.seq_len) if cfg.packing else truncate(examples, cfg.seq_len, stats)
    stats.examples = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.trained_tokens = sum(
        len(e.input_ids) if isinstance(e.labels, int) else sum(t != IGNORE_INDEX for t in e.labels[1:])
        for e in examples
    )
    if not examples:
        raise DataError(
            f"{stats.source}: no usable examples after tokenization "
            f"({stats.records} records, {stats.dropped_no_target} with nothing left to learn)"
        )
    return examples


def build_data(cfg, tokenizer, task: str, model_label2id: dict[str, int] | None = None) -> DataBundle:
    """Read cfg.data (and cfg.eval_data), split, tokenize, pack/truncate: the sets the loop trains on."""
    notes: list[str] = []
    records = read_records(cfg.data, notes)
    source = Path(cfg.data).name
    kind = detect_kind(records, cfg, task, source)
    if cfg.eval_data:
        eval_records = read_records(cfg.eval_data, notes)
        eval_source = Path(cfg.eval_data).name
        if detect_kind(eval_records, cfg, task, eval_source) != kind:
            raise DataError(f"{eval_source} and {source} have different layouts; use one for both")
        train_records = records
    else:
        eval_source = f"{source} (held-out {cfg.eval_fraction:g})"
        train_records, eval_records = split_records(records, cfg.eval_fraction, cfg.seed, source)
    if kind == "classification" and cfg.packing:
        raise DataError("--packing applies to causal-LM data, not to classification")
    names = None
    if kind == "classification":
        names = label_mapping(
            [r[cfg.label_column] for r in train_records + eval_records], model_label2id, source
        )
    train_stats = DataStats(source=source, notes=notes)
    train = tokenize_records(train_records, kind, tokenizer, cfg, train_stats, names)
    stats = [train_stats]
    evals: list[Example] = []
    if eval_records:
        eval_stats = DataStats(source=eval_source)
        evals = tokenize_records(eval_records, kind, tokenizer, cfg, eval_stats, names)
        stats.append(eval_stats)
    return DataBundle(train=train, eval=evals, kind=kind, label_names=names, stats=stats)


def synthetic_data(
    vocab_size: int, seq_len: int, n_train: int, n_eval: int, seed: int, pattern: int = 16
) -> DataBundle:
    """Token rows that repeat a random ``pattern``-token motif: learnable (copying), needs no tokenizer.

    Used to benchmark random-weight preset models (``--model-config``) where no tokenizer exists.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_train + n_eval):
        motif = torch.randint(0, vocab_size, (pattern,), generator=gen)
        ids = motif.repeat(seq_len // pattern + 1)[:seq_len].tolist()
        rows.append(Example(ids, list(ids)))
    stat = DataStats(
        source="synthetic",
        kind="synthetic copy task",
        records=len(rows),
        examples=len(rows),
        tokens=len(rows) * seq_len,
        trained_tokens=len(rows) * (seq_len - 1),
    )
    return DataBundle(train=rows[:n_train], eval=rows[n_train:], kind="text", stats=[stat])


# ------------------------------------------------------------------------------------------ batching
def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class EpochSampler:
    """Micro-batches of example indices, a fresh seeded permutation each epoch.

    Its whole state is (epoch, position): saved in a checkpoint, it replays the same order after a resume.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(self.n, generator=gen).tolist()
            else:
                self._order = list(range(self.n))
        return self._order

    def next_batch(self) -> list[int]:
        if self.position >= self.n:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        batch = self._permutation()[self.position : self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


__all__ = [
    "IGNORE_INDEX",
    "DataBundle",
    "DataStats",
    "EpochSampler",
    "Example",
    "build_data",
    "collate",
    "detect_kind",
    "pack",
    "read_records",
    "split_records",
    "synthetic_data",
    "truncate",
]
