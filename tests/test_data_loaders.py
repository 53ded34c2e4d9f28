"""Local files in every file format and row format, and every bad file as one error line."""

import json

import pytest
from helpers import expected_messages, row_in_format, write_rows

from zhtune.data.formats import FORMATS
from zhtune.data.loaders import load_local
from zhtune.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def one_line_error(path, match: str) -> str:
    with pytest.raises(UserError) as info:
        load_local(path)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("suffix", FILE_SUFFIXES)
def test_every_file_format_and_row_format(tmp_path, suffix, fmt):
    path = write_rows(tmp_path / f"data{suffix}", [row_in_format(fmt, i) for i in range(3)])
    rows = load_local(path)
    assert [r["messages"] for r in rows] == [expected_messages(i) for i in range(3)]


def test_alpaca_input_is_appended_and_tags_are_kept(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [
        {"instruction": "翻译成英文", "input": "你好", "output": "Hello", "tag": "zh"},
        {"instruction": "Say hi", "output": "Hi"},
    ])
    rows = load_local(path)
    assert rows[0] == {"messages": [{"role": "user", "content": "翻译成英文\n你好"},
                                    {"role": "assistant", "content": "Hello"}], "tag": "zh"}
    assert rows[1]["messages"][0] == {"role": "user", "content": "Say hi"} and "tag" not in rows[1]


def test_csv_empty_input_cell_and_sharegpt_top_level_system(tmp_path):
    (tmp_path / "a.csv").write_text("instruction,input,output\n求和,1+1,2\n你好,,你好！\n", encoding="utf-8")
    rows = load_local(tmp_path / "a.csv")
    assert [r["messages"][0]["content"] for r in rows] == ["求和\n1+1", "你好"]
    path = write_rows(tmp_path / "s.jsonl", [{"system": "be brief", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    assert load_local(path)[0]["messages"][0] == {"role": "system", "content": "be brief"}


def test_a_folder_loads_its_data_files_in_name_order(tmp_path):
    write_rows(tmp_path / "b.json", [row_in_format("alpaca", 1)])
    write_rows(tmp_path / "a.jsonl", [row_in_format("messages", 0)])
    (tmp_path / "notes.txt").write_text("not data")
    assert [r["messages"] for r in load_local(tmp_path)] == [expected_messages(0), expected_messages(1)]


def test_a_row_that_fits_no_format(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    message = one_line_error(path, "fits no known format")
    assert str(path) in message and "line 1" in message and "fields: question, answer" in message


def test_a_later_row_that_does_not_fit_the_files_format(tmp_path):
    path = write_rows(tmp_path / "bad.json", [row_in_format("alpaca"), {"instruction": "x", "answer": "y"}])
    message = one_line_error(path, "row 2")
    assert "missing `output`" in message and "alpaca" in message and "fields: instruction, answer" in message


@pytest.mark.parametrize("suffix", FILE_SUFFIXES)
def test_an_empty_response_is_an_error_not_a_training_row(tmp_path, suffix):
    path = write_rows(tmp_path / f"e{suffix}", [{"query": "a", "response": "b"}, {"query": "c", "response": "  "}])
    message = one_line_error(path, "empty assistant reply")
    assert "2:" in message and str(path) in message


@pytest.mark.parametrize("name,content,match", [
    ("empty.jsonl", "", "is empty"),
    ("blank.jsonl", "\n\n", "has no rows"),
    ("empty.json", "[]", "has no rows"),
    ("empty.csv", "", "is empty"),
    ("header_only.csv", "query,response\n", "has no rows"),
    ("broken.jsonl", '{"query": "a", "response": "b"}\n{"query": \n', "line 2: not valid JSON"),
    ("broken.json", '[{"query": "a"', "not valid JSON"),
    ("object.json", '{"query": "a", "response": "b"}', "a .json dataset is an array of rows"),
    ("garbage.parquet", "not a parquet file at all", "cannot be read as .parquet"),
    ("data.txt", "query,response", "unsupported file type '.txt'"),
    ("strings.json", '["a", "b"]', "row 1: expected an object"),
])
def test_unreadable_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert str(tmp_path / name) in one_line_error(tmp_path / name, match)


@pytest.mark.parametrize("row,match", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant reply"),
    ({"messages": "not json"}, "not JSON"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "from 'alien'"),
    ({"query": "q", "response": "r", "history": [["only one"]]}, "history item 1"),
    ({"query": "q"}, "needs both `query` and `response`"),
    ({"instruction": "q", "output": ["not", "text"]}, "output must be text"),
])
def test_malformed_rows(tmp_path, row, match):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert "line 1" in one_line_error(path, match)
