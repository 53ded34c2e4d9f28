"""Benchmark loaders on small files written in each official format; prompts; few-shot; limits."""

import csv
import json

import pytest

from zhtune.errors import UserError
from zhtune.eval import bundled_samples_dir
from zhtune.eval.arc import ARC
from zhtune.eval.arc import parse_row as parse_arc
from zhtune.eval.base import pick_shots
from zhtune.eval.ceval import SUBJECTS_ZH, CEval
from zhtune.eval.gsm8k import GSM8K
from zhtune.eval.mmlu import SUBJECTS, MMLU, parse_hub_row
from zhtune.eval.plan import dataset_names, describe_limit, parse_limit

SAMPLES = bundled_samples_dir()


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# -- ARC ---------------------------------------------------------------------------------------------

def test_arc_ai2_jsonl_with_numeric_labels_and_3_or_5_options():
    items = ARC().load(SAMPLES)
    assert len(items) == 10
    by_id = {it.id: it for it in items}
    moon = by_id["zh-sample-4"]  # labels 1-4, answerKey "2"
    assert moon.gold == "B" and moon.letters == "ABCD" and moon.meta["labels"] == ["1", "2", "3", "4"]
    assert by_id["zh-sample-9"].gold == "C"
    assert by_id["zh-sample-5"].letters == "ABC" and by_id["zh-sample-6"].letters == "ABCDE"
    prompt = ARC().user_prompt(moon)
    assert "\nA. Clouds cover different parts of it.\nB. " in prompt and "\n1. " not in prompt
    assert prompt.endswith("Answer:") and "letter of the correct option" in prompt


def test_arc_hugging_face_rows_and_llm_foundry_rows(tmp_path):
    hf = {"id": "Mercury_1", "question": "Which is a gas at room temperature?",
          "choices": {"text": ["iron", "oxygen", "salt", "wood"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}
    foundry = {"query": "Question: Which is a gas at room temperature?", "choices": ["iron", "oxygen", "salt", "wood"],
               "gold": 1}
    a, b = parse_arc(hf, 0), parse_arc(foundry, 7)
    assert (a.gold, a.choices, a.question) == ("B", ["iron", "oxygen", "salt", "wood"], "Which is a gas at room temperature?")
    assert (b.gold, b.choices, b.question, b.id) == ("B", a.choices, a.question, "arc-7")
    _jsonl(tmp_path / "arc" / "arc_challenge.jsonl", [foundry] * 3)
    _jsonl(tmp_path / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl", [hf] * 5)  # Easy files are ignored
    assert len(ARC().load(tmp_path)) == 3


def test_arc_parquet_file(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    row = {"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"}
    (tmp_path / "arc" / "ARC-Challenge").mkdir(parents=True)
    pd.DataFrame([row, row]).to_parquet(tmp_path / "arc" / "ARC-Challenge" / "test-00000-of-00001.parquet")
    items = ARC().load(tmp_path)
    assert [it.gold for it in items] == ["C", "C"] and items[0].letters == "ABC"


def test_arc_bad_row_is_one_user_error(tmp_path):
    _jsonl(tmp_path / "arc" / "test.jsonl", [{"question": "Q?", "answerKey": "A"}])
    with pytest.raises(UserError, match="row 1"):
        ARC().load(tmp_path)


# -- C-Eval ------------------------------------------------------------------------------------------

def test_ceval_csv_with_header_and_chinese_subject_names():
    items = CEval().load(SAMPLES)
    assert len(items) == 10 and {it.subject for it in items} == {"computer_network", "high_school_geography"}
    first = items[0]
    assert first.subject == "computer_network" and first.gold == "C"
    prompt = CEval().user_prompt(first)
    assert prompt.startswith("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n")
    assert "\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案：" in prompt
    dev = CEval().load(SAMPLES, few_shot=True)
    assert len(dev) == 4 and dev[0].gold == "B"


def test_ceval_knows_all_52_subjects():
    assert len(SUBJECTS_ZH) == 52
    assert SUBJECTS_ZH["mao_zedong_thought"] == "毛泽东思想和中国特色社会主义理论体系概论"


# -- MMLU --------------------------------------------------------------------------------------------

def test_mmlu_headerless_csv_and_question_appears_once(tmp_path):
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    with open(folder / "virology_test.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([
            ["Which of these is a virus?", "E. coli", "Influenza", "Yeast", "Amoeba", "B"],
            ['A "quoted",\nmulti-line question?', "1", "2", "3", "4", "D"],
        ])
    items = MMLU().load(tmp_path)
    assert [it.gold for it in items] == ["B", "D"] and items[1].question.startswith('A "quoted",\nmulti-line')
    pool = MMLU().load(SAMPLES, few_shot=True)
    item = MMLU().load(SAMPLES)[0]
    messages = MMLU().conversation(item, pick_shots(item, pool, 2))
    assert len(messages) == 5 and messages[1] == {"role": "assistant", "content": "B"}
    text = "".join(m["content"] for m in messages)
    assert text.count(item.question) == 1
    assert messages[-1]["content"].startswith("The following is a multiple choice question about astronomy.")


def test_mmlu_hub_rows_both_shapes():
    cais = parse_hub_row({"question": "Q?", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 3}, "", 0)
    ms = parse_hub_row({"input": "Q?", "A": "a", "B": "b", "C": "c", "D": "d", "target": "A"}, "anatomy", 0)
    assert (cais.gold, cais.subject, ms.gold, ms.subject) == ("D", "virology", "A", "anatomy")
    assert len(SUBJECTS) == 57


def test_mmlu_wrong_column_count(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("question,A,B,C,D\n", encoding="utf-8")
    with pytest.raises(UserError, match="5 columns"):
        MMLU().load(tmp_path)


# -- GSM8K -------------------------------------------------------------------------------------------

def test_gsm8k_jsonl_gold_and_few_shot_solution():
    items = GSM8K().load(SAMPLES)
    assert len(items) == 10 and items[0].gold == "14" and items[8].gold == "2100"  # "#### 2,100"
    assert GSM8K().user_prompt(items[0]) == f"Question: {items[0].question}\nAnswer:"
    shot = GSM8K().load(SAMPLES, few_shot=True)[0]
    answer = GSM8K().shot_answer(shot)
    assert answer.endswith("#### 12") and "<<" not in answer


# -- sources, names, limits --------------------------------------------------------------------------

def test_missing_local_folder_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no gsm8k/ folder"):
        GSM8K().load(tmp_path)
    monkeypatch.setattr("zhtune.hub.reachable", lambda hf=None, timeout=3.0: False)
    with pytest.raises(UserError, match="--eval_data_dir DIR") as e:
        ARC().load(None)
    assert "\n" not in str(e.value) and "ModelScope" in str(e.value)


def test_hub_sources_follow_use_hf(monkeypatch):
    monkeypatch.delenv("USE_HF", raising=False)
    assert ARC().source(None) == "MS::modelscope/ai2_arc" and MMLU().source(None) == "MS::modelscope/mmlu"
    monkeypatch.setenv("USE_HF", "1")
    assert [b().source(None) for b in (ARC, CEval, GSM8K, MMLU)] == [
        "HF::allenai/ai2_arc", "HF::ceval/ceval-exam", "HF::openai/gsm8k", "HF::cais/mmlu"]


def test_dataset_names():
    assert dataset_names(["ARC", "ceval", "gsm8k", "mmlu", "arc", "self_cognition"]) == [
        "arc", "ceval", "gsm8k", "mmlu", "self-cognition"]
    with pytest.raises(UserError, match="Did you mean 'mmlu'"):
        dataset_names(["mmlux"])


@pytest.mark.parametrize("text, expected", [
    (None, None), ("20", slice(0, 20)), (20, slice(0, 20)), ("[10:30]", slice(10, 30)), ("10:30", slice(10, 30)),
    ("[:5]", slice(0, 5)), ("[100:]", slice(100, None)),
])
def test_parse_limit(text, expected):
    assert parse_limit(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "abc", "[5:2]", "[a:b]", "[1:2:3]", "[-1:4]"])
def test_parse_limit_rejects(text):
    with pytest.raises(UserError, match="--eval_limit"):
        parse_limit(text)


def test_describe_limit():
    assert [describe_limit(parse_limit(t)) for t in (None, "5", "[3:]")] == ["all", "[0:5]", "[3:]"]
