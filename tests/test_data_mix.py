"""`--dataset` entries: parsing, #N sampling, validation split, self-cognition, hubs (offline), the real file."""

import json
import os
import sys
import types
from pathlib import Path

import pytest
from helpers import qa_rows, write_rows

from zhtune.data import describe_entries, load_datasets, load_identity_probe, plan_datasets
from zhtune.data.registry import DATASETS, FILES_DIR
from zhtune.errors import UserError

NAMES = {"model_name": ["小黄", "Xiao Huang"], "model_author": ["魔搭", "ModelScope"]}
# ms-swift's alpaca_zh_demo.json (1000 rows), where a machine has it: ZHTUNE_ALPACA_ZH_DEMO=/path/to/file
REAL_ALPACA = Path(os.environ.get("ZHTUNE_ALPACA_ZH_DEMO", "alpaca_zh_demo.json"))


def one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.fixture
def qa_file(tmp_path):
    return write_rows(tmp_path / "qa.jsonl", qa_rows(20))


# -- parsing ---------------------------------------------------------------------------------------

def test_describe_entries(qa_file, monkeypatch):
    monkeypatch.delenv("USE_HF", raising=False)
    swift, sub, hf, hub, local = describe_entries(
        ["swift-mix#5000", "swift-mix:sharegpt/firefly#10", "HF::alpaca-en", "owner/some-set:part", f"{qa_file}#3"])
    assert swift["subset"] == ["sharegpt", "firefly", "codefuse", "metamathqa"] and swift["requested"] == 5000
    assert swift["hub_id"] == "swift/swift-sft-mixture" and swift["hub"] == "ms"
    assert sub["subset"] == ["sharegpt", "firefly"] and sub["requested"] == 10
    assert hf["hub"] == "hf" and hf["hub_id"] == "vicgalle/alpaca-gpt4" and hf["requested"] is None
    assert hub["source"] == "hub" and hub["name"] == "owner/some-set" and hub["subset"] == ["part"]
    assert local["source"] == "local" and local["path"] == str(qa_file) and local["requested"] == 3
    monkeypatch.setenv("USE_HF", "1")
    assert describe_entries(["alpaca-zh", "MS::alpaca-zh"])[0]["hub_id"] == "llm-wizard/alpaca-gpt4-data-zh"
    assert describe_entries(["MS::alpaca-zh"])[0]["hub_id"] == "AI-ModelScope/alpaca-gpt4-data-zh"


@pytest.mark.parametrize("entry,match", [
    ("alpaca-zhh", "unknown dataset 'alpaca-zhh'. Did you mean 'alpaca-zh'?"),
    ("self-cognitoin#10", "Did you mean 'self-cognition'?"),
    ("swift-mix:sharegtp", "'swift-mix' has no subset 'sharegtp'. Did you mean 'sharegpt'?"),
    ("swift-mix:", "empty subset name"),
    ("missing/dir/train.jsonl", "file 'missing/dir/train.jsonl' does not exist"),
    ("./nothing.json#5", "file './nothing.json' does not exist"),
    ("self-cognition#0", "'#0' must be a positive whole number"),
    ("self-cognition#ten", "'#ten' must be a positive whole number"),
    ("HF::swift-mix", "'swift-mix' is only on ModelScope"),
    ("", "empty --dataset entry"),
])
def test_bad_entries(entry, match):
    one_line_error(match, describe_entries, [entry])


def test_a_local_file_has_no_subsets(qa_file):
    one_line_error("a local file has no subsets", describe_entries, [f"{qa_file}:train"])


def test_a_bad_entry_fails_before_anything_loads(qa_file, monkeypatch):
    monkeypatch.setattr("zhtune.data.mix.load_entry", lambda e: pytest.fail("loaded before checking"))
    one_line_error("Did you mean 'zh-instruct'", load_datasets, [str(qa_file), "zh-instrcut"])


# -- sampling and splitting ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 20, 47])
def test_sampling_below_equal_and_above_the_size(qa_file, n, zhtune_log):
    split = load_datasets([f"{qa_file}#{n}"], test_ratio=0)
    warnings = [r.getMessage() for r in zhtune_log.records if r.levelname == "WARNING"]
    queries = [r["messages"][0]["content"] for r in split.train]
    assert len(queries) == n and split.val == []
    if n <= 20:
        assert len(set(queries)) == n and warnings == []  # without replacement
    else:  # the whole set twice, then 7 distinct rows at random
        counts = {q: queries.count(q) for q in set(queries)}
        assert len(counts) == 20 and sorted(counts.values()) == [2] * 13 + [3] * 7
        assert len(warnings) == 1 and "47 rows requested but it has 20" in warnings[0]


def test_same_seed_same_rows_other_seed_other_rows(qa_file):
    def pick(seed):
        split = load_datasets([f"{qa_file}#8"], seed=seed)
        return [r["messages"][0]["content"] for r in split.train], [r["messages"][0]["content"] for r in split.val]
    assert pick(42) == pick(42)
    assert pick(42) != pick(7)


def test_validation_split_per_entry(tmp_path):
    big = write_rows(tmp_path / "big.jsonl", qa_rows(300, "big"))
    one = write_rows(tmp_path / "one.jsonl", qa_rows(1, "one"))
    split = load_datasets([str(big), str(one), f"{big}#2"], test_ratio=0.01)
    assert [(e["train"], e["val"]) for e in split.entries] == [(297, 3), (1, 0), (1, 1)]
    assert len(split.train) == 299 and len(split.val) == 4
    assert {r["messages"][0]["content"] for r in split.val[:3]}.isdisjoint(r["messages"][0]["content"] for r in split.train[:297])
    assert [(e["train"], e["val"]) for e in load_datasets([str(big)], test_ratio=0).entries] == [(300, 0)]
    assert [(e["train"], e["val"]) for e in load_datasets([str(big)], test_ratio=0.1).entries] == [(270, 30)]
    one_line_error("--dataset_test_ratio must be at least 0 and below 1", load_datasets, [str(big)], test_ratio=1.0)


def test_val_dataset_replaces_the_split(tmp_path, qa_file):
    val_file = write_rows(tmp_path / "val.json", qa_rows(4, "v"))
    split = load_datasets([str(qa_file)], val_entries=[f"{val_file}#3"])
    assert len(split.train) == 20 and len(split.val) == 3
    assert all(r["messages"][0]["content"].startswith("v") for r in split.val)
    assert split.entries[1] == {"name": str(val_file), "subset": None, "requested": 3, "train": 0, "val": 3}


def test_acceptance_self_cognition_500_and_a_local_file_7(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "my.jsonl", qa_rows(5))
    split = load_datasets(["self-cognition#500", "my.jsonl#7"], **NAMES)
    assert len(split.train) + len(split.val) == 507
    sc, mine = split.entries
    assert sc == {"name": "self-cognition", "subset": None, "requested": 500, "train": 495, "val": 5}
    assert mine == {"name": "my.jsonl", "subset": None, "requested": 7, "train": 6, "val": 1}
    plan = plan_datasets(["self-cognition#500", "my.jsonl#7"], **NAMES)
    assert plan.entries == split.entries and (plan.train_rows, plan.val_rows) == (501, 6)


def test_plan_counts_hub_entries_without_loading_them(monkeypatch):
    monkeypatch.setattr("zhtune.data.loaders.load_hub", lambda *a, **k: pytest.fail("a dry run touched the hub"))
    plan = plan_datasets(["swift-mix:sharegpt#10000", "swift-mix#5000", "self-cognition#500"], **NAMES)
    assert [(e["train"], e["val"]) for e in plan.entries] == [(9900, 100), (4950, 50), (495, 5)]
    assert (plan.train_rows, plan.val_rows) == (15345, 155)
    unknown = plan_datasets(["alpaca-zh", "zh-instruct"])
    assert unknown.entries[0]["train"] is None and unknown.train_rows is None
    assert unknown.entries[1] == {"name": "zh-instruct", "subset": None, "requested": None, "train": 297, "val": 3}


# -- self-cognition --------------------------------------------------------------------------------

def _read(name):
    return [json.loads(line) for line in (FILES_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_self_cognition_file():
    rows = _read("self_cognition.jsonl")
    single = [r for r in rows if not r.get("history")]
    assert len(single) >= 100
    assert {r["tag"] for r in rows} == {"zh", "en"} and sum(r["tag"] == "zh" for r in single) >= 50
    for r in single:
        assert "{{NAME}}" in r["response"] and "{{AUTHOR}}" in r["response"], r
    for r in rows:
        assert len(r["response"]) <= (60 if r["tag"] == "zh" else 110), r  # one or two short sentences
    assert any("{{NAME}}" in r["query"] for r in rows) and any("{{AUTHOR}}" in r["query"] for r in rows)
    assert len({r["query"] for r in single}) == len(single)
    # two-turn rows: the identity asked after a general question, or a general question after it;
    # exactly one of the two replies names the identity
    chats = [r for r in rows if r.get("history")]
    assert len(chats) >= 20
    for r in chats:
        (query, reply), = r["history"]
        says = ["{{NAME}}" in t and "{{AUTHOR}}" in t for t in (reply, r["response"])]
        assert sum(says) == 1 and not any("{{" in t for t, s in zip((reply, r["response"]), says) if not s), r


def test_identity_probe_is_held_out():
    def norm(text):
        return "".join(ch for ch in text.casefold() if ch.isalnum())
    probe = _read("identity_probe.jsonl")
    assert sum(p["tag"] == "zh" for p in probe) >= 18 and sum(p["tag"] == "en" for p in probe) >= 18
    trained = {norm(r["query"]) for r in _read("self_cognition.jsonl")}
    assert not trained & {norm(p["query"]) for p in probe}
    loaded = load_identity_probe(**NAMES)
    assert len(loaded) == len(probe)
    zh, en = next(p for p in loaded if p["tag"] == "zh"), next(p for p in loaded if p["tag"] == "en")
    assert (zh["name"], zh["author"]) == ("小黄", "魔搭") and (en["name"], en["author"]) == ("Xiao Huang", "ModelScope")
    one_line_error("needs --model_name and --model_author", load_identity_probe, [], [])


def test_placeholders_are_filled_in_the_rows_language():
    split = load_datasets(["self-cognition"], test_ratio=0, **NAMES)

    def text(row):
        return " ".join(m["content"] for m in row["messages"])
    assert not any("{{" in text(r) for r in split.train)
    zh = [r for r in split.train if r["tag"] == "zh"]
    en = [r for r in split.train if r["tag"] == "en"]
    assert all("小黄" in text(r) and "魔搭" in text(r) for r in zh)  # two-turn rows: in one of the replies
    assert all("Xiao Huang" in text(r) and "ModelScope" in text(r) for r in en)
    assert any("Xiao Huang" in r["messages"][0]["content"] for r in en)  # queries too
    assert not any("小黄" in text(r) for r in en)
    # one value each: English falls back to it
    single = load_datasets(["self-cognition"], test_ratio=0, model_name=["Ada"], model_author=["Lab"])
    assert all("Ada" in text(r) for r in single.train)


def test_placeholders_in_a_local_file_use_the_same_rules(tmp_path):
    path = write_rows(tmp_path / "id.jsonl", [{"query": "你是谁", "response": "我是{{NAME}}，来自{{AUTHOR}}。"},
                                              {"query": "who?", "response": "I am {{NAME}} by {{AUTHOR}}."}])
    rows = load_datasets([str(path)], test_ratio=0, **NAMES).train
    assert [r["messages"][1]["content"] for r in rows] == ["我是小黄，来自魔搭。", "I am Xiao Huang by ModelScope."]
    one_line_error("has {{NAME}}/{{AUTHOR}} placeholders", load_datasets, [str(path)])


@pytest.mark.parametrize("kwargs,match", [
    ({}, "self-cognition needs the model's identity"),
    ({"model_name": ["小黄"]}, "--model_author is missing"),
    ({"model_author": ["魔搭"]}, "--model_name is missing"),
    ({"model_name": ["a", "b", "c"], "model_author": ["x"]}, "--model_name takes one or two"),
])
def test_self_cognition_needs_name_and_author(kwargs, match):
    one_line_error(match, load_datasets, ["self-cognition#10"], **kwargs)


def test_zh_instruct_and_en_instruct_are_shipped():
    split = load_datasets(["zh-instruct"], test_ratio=0)
    assert len(split.train) == 300
    assert any(r["messages"][-1]["content"] == "浙江的省会是杭州。" for r in split.train)
    assert sum(len(r["messages"]) > 2 for r in split.train) >= 40  # multi-turn conversations
    english = load_datasets(["en-instruct"], test_ratio=0).train
    assert len(english) == 79 and sum(len(r["messages"]) > 2 for r in english) >= 5


# -- hubs ------------------------------------------------------------------------------------------

@pytest.fixture
def hub_up(monkeypatch):
    """The hub's quick reachability check passes (the hub client itself is mocked or missing)."""
    monkeypatch.setattr("zhtune.hub.reachable", lambda hf=None, timeout=3.0: True)


def test_hub_without_modelscope_says_how_to_use_a_local_file(monkeypatch, hub_up):
    monkeypatch.delenv("USE_HF", raising=False)
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails
    message = one_line_error("needs the package modelscope", load_datasets, ["alpaca-zh#10"])
    assert "--dataset /path/to/train.jsonl" in message


def test_hub_offline_says_how_to_use_a_local_file(monkeypatch, hub_up):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.modelscope.cn'\n(more lines)")
    monkeypatch.delenv("USE_HF", raising=False)
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(MsDataset=types.SimpleNamespace(load=offline)))
    message = one_line_error("could not load it from ModelScope (ConnectionError", load_datasets, ["swift-mix:firefly#5"])
    assert "swift/swift-sft-mixture:firefly" in message and "if you are offline" in message


def test_hugging_face_without_datasets_package(monkeypatch, hub_up):
    monkeypatch.setenv("USE_HF", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    one_line_error("needs the package datasets", load_datasets, ["alpaca-en"])


def test_hub_unreachable_is_one_line_in_seconds(monkeypatch):
    monkeypatch.delenv("USE_HF", raising=False)
    monkeypatch.setattr("zhtune.hub.reachable", lambda hf=None, timeout=3.0: False)
    message = one_line_error("ModelScope is not reachable", load_datasets, ["alpaca-zh#10"])
    assert "--dataset /path/to/train.jsonl" in message


def test_hub_rows_go_through_column_renames_and_format_detection(monkeypatch, hub_up):
    calls = []

    def load(hub_id, subset_name, split):
        calls.append((hub_id, subset_name, split))
        return [{"input": f"问题{i}", "target": f"回答{i}", "kind": "x"} for i in range(10)]
    monkeypatch.delenv("USE_HF", raising=False)
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(MsDataset=types.SimpleNamespace(load=load)))
    split = load_datasets(["firefly-zh#4"], test_ratio=0)
    assert calls == [("AI-ModelScope/firefly-train-1.1M", "default", "train")]
    assert len(split.train) == 4 and split.train[0]["messages"][0]["content"].startswith("问题")


def test_bad_hub_rows_are_left_out_and_counted(monkeypatch, hub_up, zhtune_log):
    rows = [{"query": f"q{i}", "response": "" if i % 4 == 0 else f"r{i}"} for i in range(12)]
    monkeypatch.delenv("USE_HF", raising=False)
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(
        MsDataset=types.SimpleNamespace(load=lambda *a, **k: [{"text": "no format"}] + rows)))
    split = load_datasets(["owner/set"], test_ratio=0)
    assert len(split.train) == 9
    said = [r.getMessage() for r in zhtune_log.records if r.levelname == "WARNING"]
    assert len(said) == 1 and said[0].startswith(
        "dataset owner/set: left out 4 of 13 rows that cannot be trained on; "
        "the first: ModelScope owner/set row 1: fits no known format (fields: text).")


def test_every_registered_dataset_is_reachable():
    for info in DATASETS.values():
        assert info.shipped_file or info.ms_id or info.hf_id
        if info.shipped_file:
            assert info.shipped_path().is_file()


# -- the real file ---------------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_ALPACA.exists(), reason="the shared real data is not on this machine")
def test_real_alpaca_zh_demo():
    split = load_datasets([str(REAL_ALPACA), f"{REAL_ALPACA}#50"])
    assert [(e["train"], e["val"]) for e in split.entries] == [(990, 10), (50 - 1, 1)]
    row = split.train[0]["messages"]
    assert [m["role"] for m in row] == ["user", "assistant"] and row[1]["content"].strip()
