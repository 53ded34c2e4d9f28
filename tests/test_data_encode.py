"""Encoding with the real Gemma tokenizer: label masks, max_length policies, the disk cache, statistics."""

import os

import pytest
from helpers import CharTemplate

from zhtune.data import DatasetSplit, encode_rows, format_statistics
from zhtune.data import encode as encode_module
from zhtune.errors import UserError
from zhtune.templates import IGNORE_INDEX, get_template


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoTokenizer

    from zhtune.models.embedded import embedded_model_dir
    return get_template("gemma", AutoTokenizer.from_pretrained(embedded_model_dir()))


def conversation(i: int = 0, turns: int = 2) -> dict:
    messages = [{"role": "system", "content": "回答要简短。"}]
    for t in range(turns):
        messages += [{"role": "user", "content": f"第{t}个问题：{i}加{t}等于多少？"},
                     {"role": "assistant", "content": f"{i}加{t}等于{i + t}。"}]
    return {"messages": messages}


def trained_text(template, encoded) -> str:
    return template.tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_labels_cover_exactly_the_assistant_turns(gemma, tmp_path):
    encoded = encode_rows([conversation(3)], gemma, max_length=512, cache_dir=tmp_path).items[0]
    assert encoded.input_ids == gemma.encode(conversation(3)["messages"]).input_ids
    assert trained_text(gemma, encoded) == "3加0等于3。<end_of_turn>3加1等于4。<end_of_turn>"
    # every trained token is the input token at that position; the prompt and user turns are masked
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(encoded.input_ids, encoded.labels))
    first_reply = encoded.labels.index(next(t for t in encoded.labels if t != IGNORE_INDEX))
    prompt = gemma.tokenizer.decode(encoded.input_ids[:first_reply])
    assert prompt.endswith("<start_of_turn>model\n") and "回答要简短。" in prompt


def test_delete_drops_long_rows_and_says_why(gemma, tmp_path):
    rows = [conversation(i, turns=1) for i in range(3)] + [conversation(9, turns=12)]
    short = len(gemma.encode(rows[0]["messages"]).input_ids)
    result = encode_rows(rows, gemma, max_length=short + 5, cache_dir=tmp_path)
    assert len(result.items) == 3 and result.dropped == 1
    assert result.stats["dropped_reasons"] == {f"longer than max_length {short + 5}": 1}
    assert result.stats["max"] <= short + 5 and result.stats["rows"] == 3


def test_truncation_left_keeps_the_end(gemma, tmp_path):
    row = conversation(5, turns=12)
    full = gemma.encode(row["messages"])
    result = encode_rows([row], gemma, max_length=40, truncation_strategy="truncation_left", cache_dir=tmp_path)
    assert result.dropped == 0
    kept = result.items[0]
    assert kept.input_ids == full.input_ids[-40:] and kept.labels == full.labels[-40:]
    assert trained_text(gemma, kept).endswith("5加11等于16。<end_of_turn>")
    # a window that holds no reply at all is dropped, with its reason
    tail_only = encode_rows([row], gemma, max_length=1, truncation_strategy="truncation_left", cache_dir=tmp_path)
    assert tail_only.dropped == 1 and "no reply left" in next(iter(tail_only.stats["dropped_reasons"]))


def test_bad_truncation_strategy(gemma):
    with pytest.raises(UserError, match="--truncation_strategy 'right' is not one of delete, truncation_left"):
        encode_rows([conversation()], gemma, 100, truncation_strategy="right")


def test_cache_is_reused_and_keyed_by_settings(gemma, tmp_path, monkeypatch):
    monkeypatch.setenv("ZHTUNE_CACHE", str(tmp_path))
    rows = [conversation(i) for i in range(5)]
    first = encode_rows(rows, gemma, 256)
    files = list((tmp_path / "encoded").glob("*.npz"))
    assert len(files) == 1 and not first.stats["from_cache"]
    assert not list((tmp_path / "encoded").glob(".*"))  # no temporary file left behind
    again = encode_rows(rows, gemma, 256)
    assert again.stats["from_cache"] and again.items == first.items and again.dropped == first.dropped
    assert again.stats == {**first.stats, "from_cache": True} and again.stats["cache_file"] == str(files[0])
    encode_rows(rows, gemma, 128)
    encode_rows(rows, gemma, 256, truncation_strategy="truncation_left")
    encode_rows(rows[:4], gemma, 256)
    assert len(list((tmp_path / "encoded").glob("*.npz"))) == 4
    files[0].write_bytes(b"corrupt")  # an unreadable cache file is encoded again
    assert encode_rows(rows, gemma, 256).items == first.items


def test_worker_processes_give_the_same_result(tmp_path, monkeypatch, zhtune_log):
    monkeypatch.setattr(encode_module, "IN_PROCESS_BELOW", 0)
    monkeypatch.setattr(encode_module, "CHUNK_ROWS", 7)
    rows = [conversation(i, turns=1 + i % 3) for i in range(40)]
    parallel = encode_rows(rows, CharTemplate(), 60, num_proc=2, cache_dir=tmp_path / "a")
    serial = encode_rows(rows, CharTemplate(), 60, num_proc=1, cache_dir=tmp_path / "b")
    assert parallel.items == serial.items and parallel.dropped == serial.dropped > 0
    if (os.cpu_count() or 1) >= 2:
        assert zhtune_log.messages == ["encoding 40 rows with 2 processes (cached for re-runs)..."]


def test_statistics_table(gemma, tmp_path):
    rows = [conversation(i, turns=1) for i in range(6)] + [conversation(7, turns=12)]
    split = DatasetSplit(train=rows[1:], val=rows[:1], entries=[
        {"name": "swift-mix", "subset": ["sharegpt", "firefly"], "requested": 5, "train": 4, "val": 1},
        {"name": "data/my.jsonl", "subset": None, "requested": None, "train": 2, "val": 0}])
    train = encode_rows(split.train, gemma, 100, cache_dir=tmp_path)
    val = encode_rows(split.val, gemma, 100, cache_dir=tmp_path)
    table = format_statistics(split, train, val)
    lines = table.splitlines()
    assert lines[1].split() == ["swift-mix:sharegpt/firefly", "5", "4", "1"]
    assert lines[2].split() == ["data/my.jsonl", "all", "2", "0"]
    assert lines[3].split() == ["total", "6", "1"]
    assert f"train tokens: 5 rows, length mean {train.stats['mean']}, min {train.stats['min']}" in table
    assert "dropped: 1 (longer than max_length 100: 1)" in table
    assert "val tokens: 1 rows" in table and table.endswith("dropped: none")
    again = format_statistics(split, encode_rows(split.train, gemma, 100, cache_dir=tmp_path), None)
    assert "(encoded earlier, from the cache)" in again and "val tokens" not in again


def test_no_rows_encode_to_an_empty_set(gemma, tmp_path):
    empty = encode_rows([], gemma, 100, cache_dir=tmp_path)
    assert empty.items == [] and empty.dropped == 0 and empty.stats["rows"] == 0 and empty.stats["mean"] is None
    assert "no rows" in format_statistics(DatasetSplit([], [], []), empty)
