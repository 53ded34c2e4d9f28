"""`--eval_prompt seed`: llmuses v0.4.3's prompts byte for byte (golden strings produced by running
llmuses' own adapter code, evalscope commit 1056a56a, on these hand-written items), and the labels kept."""

import hashlib

import pytest

from zhtune.eval import prompts
from zhtune.eval.arc import ARC
from zhtune.eval.base import EvalItem, letter_item
from zhtune.eval.ceval import CEval
from zhtune.eval.gsm8k import GSM8K
from zhtune.eval.mmlu import MMLU

arc1 = letter_item("a1", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "nitrogen", "helium"], list("ABCD"), "B")
arc2 = letter_item("a2", "How many legs does an insect have?", ["four", "six", "eight"], ["1", "2", "3"], "2")
ce1 = letter_item("c1", "TCP/IP中把IP地址解析为物理地址的协议是____。", ["ARP", "RARP", "ICMP", "IGMP"], list("ABCD"), "A",
                  "computer_network")
ce2 = letter_item("c2", "OSI模型有几层？", ["5", "6", "7", "8"], list("ABCD"), "C", "computer_network")
mm1 = letter_item("m1", "What is 2 + 2?", ["3", "4", "5", "6"], list("ABCD"), "B", "abstract_algebra")
mm2 = letter_item("m2", "Which set is a group under addition?", ["N", "Z", "odd numbers", "{1}"], list("ABCD"), "B",
                  "abstract_algebra")
g1 = EvalItem("g1", "Tom has 3 apples and buys 2 more. How many does he have?", "5")

GOLDEN = {
    "arc_0": 'Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. nitrogen\nD. helium\nAnswer:',
    "arc_labels_0": 'How many legs does an insect have?\n1. four\n2. six\n3. eight\nAnswer:',
    "arc_1": 'Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. nitrogen\nD. helium\nAnswer: B\n\nHow many legs does an insect have?\n1. four\n2. six\n3. eight\nAnswer:',  # noqa: E501
    "ceval_0": '以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n问题：TCP/IP中把IP地址解析为物理地址的协议是____。\nA. ARP\nB. RARP\nC. ICMP\nD. IGMP\n答案: ',  # noqa: E501
    "ceval_1": '以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n问题：OSI模型有几层？\nA. 5\nB. 6\nC. 7\nD. 8\n答案: C问题：TCP/IP中把IP地址解析为物理地址的协议是____。\nA. ARP\nB. RARP\nC. ICMP\nD. IGMP\n答案: ',  # noqa: E501
    "mmlu_0": 'The following are multiple choice questions (with answers) about  abstract algebra.\n\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:',  # noqa: E501
    "mmlu_1": 'The following are multiple choice questions (with answers) about  abstract algebra.\n\nWhich set is a group under addition?\nA. N\nB. Z\nC. odd numbers\nD. {1}\nAnswer: B\n\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:',  # noqa: E501
    "gsm8k_0": 'Question: Tom has 3 apples and buys 2 more. How many does he have?\nAnswer:',
}
CASES = {"arc_0": (ARC(), arc1, [], 0), "arc_labels_0": (ARC(), arc2, [], 0), "arc_1": (ARC(), arc2, [arc1], 1),
         "ceval_0": (CEval(), ce1, [], 0), "ceval_1": (CEval(), ce1, [ce2], 1), "mmlu_0": (MMLU(), mm1, [], 0),
         "mmlu_1": (MMLU(), mm1, [mm2], 1), "gsm8k_0": (GSM8K(), g1, [], 0)}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_seed_prompts_are_llmuses_byte_for_byte(name):
    bench, item, shots, k = CASES[name]
    assert prompts.conversation(bench, item, shots, "seed", k) == [{"role": "user", "content": GOLDEN[name]}]


def test_seed_gsm8k_few_shot_is_llmuses_fixed_four_examples_whatever_k():
    for k in (1, 4, 8):
        text = prompts.conversation(GSM8K(), g1, [], "seed", k)[0]["content"]
        assert len(text) == 4672 and text.endswith("How many does he have?\nLet's think step by step\nAnswer:")
        assert hashlib.sha256(text.encode()).hexdigest() == \
            "b26634bcc77b77efaa845f4ef1e150faacce3d4ef57da75ae9296aaad90e1f2c"


def test_seed_uses_the_file_text_unstripped():
    item = letter_item("m3", "  Padded question? ", ["a ", "b", "c", "d"], list("ABCD"), "A", "anatomy")
    assert item.question == "Padded question?" and item.choices[0] == "a"
    text = prompts.conversation(MMLU(), item, [], "seed")[0]["content"]
    assert "about  anatomy.\n\n\n  Padded question? \nA. a \nB. b" in text


def test_zhtune_prompts_are_the_default_shape():
    msgs = prompts.conversation(ARC(), arc2, [arc1], "zhtune", 1)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "B" and "A. four\nB. six\nC. eight\nAnswer:" in msgs[2]["content"]
    assert prompts.shown_labels(arc2, "zhtune") == "ABC" and prompts.shown_labels(arc2, "seed") == "123"


def test_seed_numeric_labels_are_scored_by_position():
    text = prompts.conversation(ARC(), arc2, [], "seed")[0]["content"]
    scored = ARC().score(arc2, "Answer: 2", text, prompts.shown_labels(arc2, "seed"))
    assert (scored.extracted, scored.correct) == ("B", True)
    assert ARC().score(arc2, text, text, "123").no_answer  # an echo of the prompt
