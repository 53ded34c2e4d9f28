"""Answer extraction on replies shaped like real model outputs (zhtune/eval/extract.py)."""

import pytest

from zhtune.eval.base import EvalItem
from zhtune.eval.extract import extract_choice, extract_number, numbers_equal, to_number
from zhtune.eval.gsm8k import GSM8K
from zhtune.eval.mmlu import MMLU


@pytest.mark.parametrize("reply, letter", [
    ("答案是 B", "B"),
    ("答案：C", "C"),
    ("答案为（D）。", "D"),
    ("正确答案应该是A，因为税收法定。", "A"),
    ("根据题意，故选B。", "B"),
    ("选项A和B都不对，答案为C", "C"),
    ("The answer is (C).", "C"),
    ("Answer: **D. Paris**", "D"),
    ("The correct option is B.", "B"),
    ("B. Paris", "B"),
    ("B", "B"),
    ("(C) because plants need light", "C"),
    ("**D**", "D"),
    ("\\boxed{A}", "A"),
    ("I think it's A because the Moon reflects sunlight.", "A"),
    ("I think it’s A because…", "A"),
    ("A planet rotates faster, so the days get shorter: C.", "C"),
    ("ＡＢＣ答案：Ｃ", "C"),
])
def test_letter_rules(reply, letter):
    assert extract_choice(reply) == letter


@pytest.mark.parametrize("reply", [
    "",
    "I am not sure.",
    "A planet rotates faster after an impact.",  # the article, not option A
    "The following is a multiple choice science question.",
    "以下是中国关于注册会计师考试的单项选择题，请选出其中的正确答案。",
])
def test_replies_without_a_letter(reply):
    assert extract_choice(reply) is None


def test_only_the_items_letters_count():
    assert extract_choice("The answer is E.", "ABCD") is None
    assert extract_choice("The answer is E.", "ABCDE") == "E"
    assert extract_choice("Answer: D", "ABC") is None


def test_first_explicit_answer_wins_over_invented_continuation():
    reply = "答案：B\n\n以下是中国关于会计考试的单项选择题……答案：C"
    assert extract_choice(reply) == "B"


@pytest.mark.parametrize("reply, number", [
    ("She sells 9 eggs for $2 each.\n#### 18", "18"),
    ("#### 42", "42"),
    ("The total is $1,234.50", "1234.5"),
    ("So the answer is \\boxed{18}.", "18"),
    ("The answer is $18. Check: 18 * 2 = 36", "18"),
    ("答案是 7 个", "7"),
    ("First 3 + 4 = 7, then 7 * 2 = 14.", "14"),
    ("It drops to −5 degrees", "-5"),
    ("He has 12.0 apples", "12"),
])
def test_number_rules(reply, number):
    assert extract_number(reply) == number


def test_number_normalisation():
    assert to_number("$1,234.50") == "1234.5"
    assert to_number(" 2,100 ") == "2100"
    assert to_number("abc") is None
    assert numbers_equal("42", "42.0") and not numbers_equal("42", None)


def test_no_answer_counts_as_wrong_and_as_no_answer():
    mc = EvalItem("m-1", "Q?", "B", ["a", "b", "c", "d"], "astronomy")
    scored = MMLU().score(mc, "I don't know.")
    assert (scored.extracted, scored.correct, scored.no_answer) == (None, False, True)
    scored = MMLU().score(mc, "The answer is (B).")
    assert (scored.extracted, scored.correct, scored.no_answer) == ("B", True, False)
    maths = EvalItem("g-1", "Q?", "18")
    assert GSM8K().score(maths, "Let me think about it.").no_answer
    assert GSM8K().score(maths, "9 * 2 = 18 dollars").correct
    assert not GSM8K().score(maths, "#### 17").correct
