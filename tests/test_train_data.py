"""lorakit.train.data and lorakit.train.config: layouts, masking, chat templates, split, packing, truncation,
sampler state, TOML + flag precedence. Tokenizer only (no model): fast."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from helpers_train import make_tokenizer, sentences, write_jsonl

from lorakit.errors import ConfigError, DataError
from lorakit.train.config import TrainConfig, field_docs
from lorakit.train.data import (
    IGNORE_INDEX,
    EpochSampler,
    build_data,
    collate,
    read_records,
    split_records,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def cls_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("cls_tok"), classifier=True)


def cfg(data, **kw) -> TrainConfig:
    base = {"model": "unused", "data": str(data), "seq_len": 64, "eval_fraction": 0.0}
    return TrainConfig(**(base | kw)).validate()


def decode_labeled(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_text_jsonl_gets_eos_and_full_labels(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sees a book ."}, {"text": "a dog ."}])
    data = build_data(cfg(path), tok, "causal-lm")
    assert data.kind == "text" and len(data.train) == 2 and data.eval == []
    ex = data.train[0]
    assert ex.input_ids == tok("the cat sees a book .")["input_ids"] + [tok.eos_token_id]
    assert ex.labels == ex.input_ids
    assert data.stats[0].tokens == 7 + 4 and data.stats[0].trained_tokens == 6 + 3  # no loss on token 0


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "question the cat sees", "completion": "the ball ."}]
    )
    ex = build_data(cfg(path), tok, "causal-lm").train[0]
    n_prompt = len(tok("question the cat sees")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert decode_labeled(tok, ex) == "the ball . </s>"


def test_chat_loss_on_assistant_turns_only(tmp_path, tok):
    chat = [
        {"role": "system", "content": "answer yes or no"},
        {"role": "user", "content": "is it red ?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "is it green ?"},
        {"role": "assistant", "content": "no it is red"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    ex = build_data(cfg(path), tok, "causal-lm").train[0]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert ex.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert decode_labeled(tok, ex).split() == ["yes", "</s>", "no", "it", "is", "red", "</s>"]
    everything = build_data(cfg(path, chat_loss="all"), tok, "causal-lm").train[0]
    assert everything.labels == everything.input_ids


def test_chat_without_template_is_a_clear_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        build_data(cfg(path), bare, "causal-lm")


def test_csv_classification_with_named_columns_and_string_labels(tmp_path, cls_tok):
    path = tmp_path / "d.csv"
    path.write_text("sentence,y\nthe cat was good .,pos\na dog was bad .,neg\nthe bird was nice .,pos\n")
    data = build_data(cfg(path, text_column="sentence", label_column="y"), cls_tok, "classification")
    assert data.kind == "classification" and data.label_names == ["neg", "pos"]
    assert [ex.labels for ex in data.train] == [1, 0, 1]
    assert (
        data.train[0].input_ids[0] == cls_tok.cls_token_id
        and data.train[0].input_ids[-1] == cls_tok.sep_token_id
    )


def test_integer_labels_keep_their_values(tmp_path, cls_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 2}, {"text": "bad", "label": 0}])
    data = build_data(cfg(path), cls_tok, "classification")
    assert data.label_names == ["0", "1", "2"] and [e.labels for e in data.train] == [2, 0]


@pytest.mark.parametrize("option,value", [("text_column", "body"), ("label_column", "target")])
def test_missing_column_names_it_and_lists_columns(tmp_path, cls_tok, option, value):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nthe cat was good .,1\n")
    with pytest.raises(DataError, match=rf"no column '{value}' \(columns: 'text', 'label'\)"):
        build_data(cfg(path, **{option: value}), cls_tok, "classification")


def test_txt_splits_documents_on_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("the cat sees\na book .\n\n\nthe dog .\n")
    assert read_records(path) == [{"text": "the cat sees\na book ."}, {"text": "the dog ."}]
    lines = tmp_path / "lines.txt"
    lines.write_text("one .\ntwo .\n")
    assert read_records(lines) == [{"text": "one ."}, {"text": "two ."}]


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"text": "a"}\n{"text": \n', "line 2: not valid JSON"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
    ],
)
def test_bad_jsonl(tmp_path, tok, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        build_data(cfg(path), tok, "causal-lm")


def test_missing_file_and_unknown_type(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        build_data(cfg(tmp_path / "nope.jsonl"), tok, "causal-lm")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unknown type '.parquet'"):
        build_data(cfg(tmp_path / "d.parquet"), tok, "causal-lm")


def test_invalid_utf8_is_read_with_a_note(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_bytes(b"the cat \xff sees .\n")
    data = build_data(cfg(path), tok, "causal-lm")
    assert any("not valid UTF-8" in n for n in data.stats[0].notes)


def test_split_is_seeded_disjoint_and_complete():
    records = [{"i": i} for i in range(50)]
    train, held = split_records(records, 0.2, seed=3, source="x")
    assert len(held) == 10 and len(train) == 40
    assert sorted(r["i"] for r in train + held) == list(range(50))
    assert split_records(records, 0.2, seed=3, source="x") == (train, held)
    assert split_records(records, 0.2, seed=4, source="x")[1] != held
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # file order: the sampler shuffles
    assert [r["i"] for r in held] != sorted(r["i"] for r in held)  # shuffled: --eval-batches samples fairly
    with pytest.raises(DataError, match="too few"):
        split_records([{"i": 0}], 0.5, seed=0, source="x")


def test_truncation_is_counted(tmp_path, tok):
    texts = [" ".join(["the cat sees a book ."] * 3), "a dog ."]  # 18 + eos = 19 tokens, and 3 + eos
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    data = build_data(cfg(path, seq_len=8), tok, "causal-lm")
    stats = data.stats[0]
    assert (stats.truncated, stats.tokens_dropped) == (1, 11)
    assert [len(e.input_ids) for e in data.train] == [8, 4]
    assert "TRUNCATED 1 examples (11 tokens dropped)" in stats.describe()


def test_prompt_longer_than_seq_len_is_dropped_and_counted(tmp_path, tok):
    rows = [
        {"prompt": "the cat sees a book . the dog", "completion": "yes"},
        {"prompt": "is it", "completion": "no"},
    ]
    data = build_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows), seq_len=5), tok, "causal-lm")
    assert len(data.train) == 1 and data.stats[0].dropped_no_target == 1


def test_packing_keeps_every_token_in_full_blocks(tmp_path, tok):
    rows = [{"text": s} for s in sentences(30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = build_data(cfg(path, seq_len=64), tok, "causal-lm")
    packed = build_data(cfg(path, seq_len=16, packing=True), tok, "causal-lm")
    stream = [t for e in plain.train for t in e.input_ids]
    assert [t for e in packed.train for t in e.input_ids] == stream
    assert all(len(e.input_ids) == 16 for e in packed.train[:-1]) and packed.stats[0].truncated == 0
    assert all(e.labels == e.input_ids for e in packed.train)


def test_packing_is_refused_for_classification(tmp_path, cls_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 1}])
    with pytest.raises(DataError, match="packing"):
        build_data(cfg(path, packing=True), cls_tok, "classification")


def test_collate_pads_right_and_masks_labels():
    from lorakit.train.data import Example

    batch = collate([Example([5, 6, 7], [5, 6, 7]), Example([8], [IGNORE_INDEX])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX] * 3]
    assert collate([Example([1], 3), Example([2, 2], 0)], 0)["labels"].tolist() == [3, 0]


def test_sampler_replays_after_state_restore():
    sampler = EpochSampler(10, 3, seed=7)
    first = [sampler.next_batch() for _ in range(9)]  # crosses two epoch boundaries
    epoch0 = sorted(i for b in first[:4] for i in b)
    assert epoch0 == list(range(10))
    assert first[:4] != first[4:8]  # a new permutation each epoch
    replay = EpochSampler(10, 3, seed=7)
    for _ in range(5):
        replay.next_batch()
    state = replay.state_dict()
    resumed = EpochSampler(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(4)] == first[5:9]


# ------------------------------------------------------------------------------------------ TrainConfig
def test_toml_then_flags_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "m"\ndata = "d.jsonl"\nlr = 1e-3\nbatch_size = 8\npacking = true\n')
    c = TrainConfig.load(path, {"lr": 5e-4})
    assert (c.lr, c.batch_size, c.packing, c.r) == (5e-4, 8, True, 8)
    again = tmp_path / "again.toml"
    again.write_text(c.to_toml())
    assert TrainConfig.load(again) == c


@pytest.mark.parametrize(
    "text,message",
    [
        ('model = "m"\nlr = "abc"\n', "lr must be a number, got 'abc'"),
        ('model = "m"\nlrr = 1\n', "unknown setting 'lrr'"),
        ('model = "m"\nbatch_size = 0\n', "batch_size must be >= 1"),
        ('model = "m"\nmethod = "dora"\n', "method must be one of"),
        ('model = "m"\npacking = "yes"\n', "packing must be true or false"),
        ('model = "m"\nlr = \n', "not valid TOML"),
        ('data = "d"\n', "no model"),
    ],
)
def test_bad_config_values(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(path)


def test_every_field_is_documented():
    docs = field_docs(TrainConfig)
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not docs.get(f.name)]
    assert missing == []


def test_resolved_config_is_json_serialisable():
    c = TrainConfig(model="m", data="d").validate()
    assert json.loads(json.dumps(c.to_dict()))["lr"] == c.lr
    assert c.targets() == "all-linear"
    assert dataclasses.replace(c, target_modules="q_proj, v_proj").targets() == ["q_proj", "v_proj"]
