"""The two prompt sets, `--eval_prompt zhtune|seed`: from an item (and its few-shot examples) to chat turns.

zhtune (default): the benchmark's own `user_prompt` (arc.py, ceval.py, gsm8k.py, mmlu.py); few-shot
examples are earlier user/assistant turns; options are always labelled A, B, C, ... by position.

seed: the prompts of the evaluator behind the seed's table, llmuses (modelscope/evalscope) v0.4.3
(commit 1056a56a275b760b973ab467d576798384f90c27, 2024-07-29; the four adapters' prompt code is
unchanged there since 2024-04-22, so it is what ms-swift 2.x ran in mid-2024), byte for byte, quirks
included. llmuses built ONE string per item (few-shot examples inside it) and ms-swift sent it as the
single user turn of the chat template. Quirks kept on purpose (zhtune/eval/README.md lists them):
  - ARC: no instruction; the file's own labels ("1"-"4" for 22 test items); few-shot examples end in
    "\\n\\n" and are joined with "\\n" (three line breaks between them).
  - C-Eval: header line, then "问题：" before the question and "答案: " (ASCII colon, trailing space);
    few-shot examples are glued to the item ("答案: B问题：...": the join is stripped); at most 5.
  - MMLU: "about  {subject}." (two spaces: the subject is joined with a leading space), and the item
    appears TWICE (the context already ends with it, then it is appended again, with no separator
    after "Answer:"); at most 5 examples.
  - GSM8K: zero-shot "Question: {q}\\nAnswer:"; any other --eval_few_shot gives llmuses' four fixed
    chain-of-thought examples (not from the train split) and "Let's think step by step".
llmuses drew its few-shot examples at random (random.sample); zhtune takes the first K of the item's
subject (`base.pick_shots`), so runs are repeatable.
"""

from zhtune.eval.base import Benchmark, EvalItem, raw
from zhtune.eval.extract import LETTERS

STYLES = ("zhtune", "seed")


def shown_labels(item: EvalItem, style: str) -> str:
    """The option labels the prompt shows, in order ("ABCD", or "1234" for some ARC items in seed)."""
    if style == "seed" and item.meta.get("labels") and all(len(x) == 1 for x in item.meta["labels"]):
        return "".join(item.meta["labels"])
    return item.letters


def conversation(bench: Benchmark, item: EvalItem, shots: list[EvalItem], style: str, k: int = 0) -> list[dict]:
    """The chat turns for one item (`k`: --eval_few_shot, which seed GSM8K reads instead of `shots`)."""
    if style == "seed" and bench.name in SEED:
        return [{"role": "user", "content": SEED[bench.name](item, list(shots), k)}]
    return bench.conversation(item, shots)


def last_user_text(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


# -- llmuses v0.4.3, one function per adapter ------------------------------------------------------------

def _gold_label(item: EvalItem, style: str = "seed") -> str:
    return shown_labels(item, style)[LETTERS.index(item.gold)]


def _arc_example(item: EvalItem, include_answer: bool) -> str:
    example = raw(item, "question")
    example += "\n" + "\n".join(label + ". " + text for text, label in zip(raw(item, "choices"), shown_labels(item, "seed")))
    example += "\nAnswer:"
    if include_answer:
        example += " {}\n\n".format(_gold_label(item))
    return example


def seed_arc(item: EvalItem, shots: list[EvalItem], k: int = 0) -> str:
    context = "\n".join(_arc_example(s, True) for s in shots)
    return context + _arc_example(item, False)


def _ceval_example(item: EvalItem, include_answer: bool) -> str:
    example = "问题：" + raw(item, "question")
    for choice, text in zip("ABCD", raw(item, "choices")):
        example += f"\n{choice}. {text}"
    return example + ("\n答案: " + item.gold + "\n\n" if include_answer else "\n答案: ")


def seed_ceval(item: EvalItem, shots: list[EvalItem], k: int = 0) -> str:
    from zhtune.eval.ceval import SUBJECTS_ZH

    examples = [_ceval_example(s, True) for s in shots[:5]]
    context = "\n".join(examples) + "\n" if examples else ""
    full = context.strip() + _ceval_example(item, False)
    subject = SUBJECTS_ZH.get(item.subject, item.subject)
    return "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n".format(subject) + full


def _mmlu_example(item: EvalItem, include_answer: bool) -> str:
    example = raw(item, "question")
    for letter, text in zip("ABCD", raw(item, "choices")):
        example += "\n{}. {}".format(letter, text)
    example += "\nAnswer:"
    if include_answer:
        example += " {}\n\n".format(item.gold)
    return example


def seed_mmlu(item: EvalItem, shots: list[EvalItem], k: int = 0) -> str:
    subject = "".join(" " + part for part in (item.subject or "").split("_"))
    header = "The following are multiple choice questions (with answers) about {}.\n\n".format(subject)
    context = "\n".join(_mmlu_example(s, True) for s in shots[:5]) + "\n"
    context += _mmlu_example(item, False)
    context = header + context
    return context.strip() + _mmlu_example(item, False)


GSM8K_SEED_SHOTS = (
    "Question: Angelo and Melanie want to plan how many hours over the next week they should study together for their test next week. They have 2 chapters of their textbook to study and 4 worksheets to memorize. They figure out that they should dedicate 3 hours to each chapter of their textbook and 1.5 hours for each worksheet. If they plan to study no more than 4 hours each day, how many days should they plan to study total over the next week if they take a 10-minute break every hour, include 3 10-minute snack breaks each day, and 30 minutes for lunch each day?\nLet's think step by step\n"  # noqa: E501
    "Angelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, 3 hours x 2 chapters = 6 hours total.\nFor the worksheets they plan to dedicate 1.5 hours for each worksheet, 1.5 hours x 4 worksheets = 6 hours total.\nAngelo and Melanie need to start with planning 12 hours to study, at 4 hours a day, 12 / 4 = 3 days.\nHowever, they need to include time for breaks and lunch. Every hour they want to include a 10-minute break, so 12 total hours x 10 minutes = 120 extra minutes for breaks.\nThey also want to include 3 10-minute snack breaks, 3 x 10 minutes = 30 minutes.\nAnd they want to include 30 minutes for lunch each day, so 120 minutes for breaks + 30 minutes for snack breaks + 30 minutes for lunch = 180 minutes, or 180 / 60 minutes per hour = 3 extra hours.\nSo Angelo and Melanie want to plan 12 hours to study + 3 hours of breaks = 15 hours total.\nThey want to study no more than 4 hours each day, 15 hours / 4 hours each day = 3.75\nThey will need to plan to study 4 days to allow for all the time they need.\nThe answer is 4\n\n"  # noqa: E501
    "Question: Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws.  Their opponents score double the 2 pointers but half the 3 pointers and free throws.  What's the total number of points scored by both teams added together?\nLet's think step by step\n"  # noqa: E501
    "Mark's team scores 25 2 pointers, meaning they scored 25*2= 50 points in 2 pointers.\nHis team also scores 6 3 pointers, meaning they scored 8*3= 24 points in 3 pointers\nThey scored 10 free throws, and free throws count as one point so they scored 10*1=10 points in free throws.\nAll together his team scored 50+24+10= 84 points\nMark's opponents scored double his team's number of 2 pointers, meaning they scored 50*2=100 points in 2 pointers.\nHis opponents scored half his team's number of 3 pointers, meaning they scored 24/2= 12 points in 3 pointers.\nThey also scored half Mark's team's points in free throws, meaning they scored 10/2=5 points in free throws.\nAll together Mark's opponents scored 100+12+5=117 points\nThe total score for the game is both team's scores added together, so it is 84+117=201 points\nThe answer is 201\n\n"  # noqa: E501
    "Question: Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck cards. If she buys 2/5 times more of each item, what would be the total number of the items she will have if she currently has 60 marbles?\nLet's think step by step\n"  # noqa: E501
    "When Bella buys 2/5 times more marbles, she'll have increased the number of marbles by 2/5*60 = 24\nThe total number of marbles she'll have is 60+24 = 84\nIf Bella currently has 60 marbles, and she has two times as many marbles as frisbees, she has 60/2 = 30 frisbees.\nIf Bella buys 2/5 times more frisbees, she'll have 2/5*30 = 12 more frisbees.\nThe total number of frisbees she'll have will increase to 30+12 = 42\nBella also has 20 more frisbees than deck cards, meaning she has 30-20 = 10 deck cards\nIf she buys 2/5 times more deck cards, she'll have 2/5*10 = 4 more deck cards.\nThe total number of deck cards she'll have is 10+4 = 14\nTogether, Bella will have a total of 14+42+84 = 140 items\nThe answer is 140\n\n"  # noqa: E501
    "Question: A group of 4 fruit baskets contains 9 apples, 15 oranges, and 14 bananas in the first three baskets and 2 less of each fruit in the fourth basket. How many fruits are there?\nLet's think step by step\n"  # noqa: E501
    "For the first three baskets, the number of apples and oranges in one basket is 9+15=24\nIn total, together with bananas, the number of fruits in one basket is 24+14=38 for the first three baskets.\nSince there are three baskets each having 38 fruits, there are 3*38=114 fruits in the first three baskets.\nThe number of apples in the fourth basket is 9-2=7\nThere are also 15-2=13 oranges in the fourth basket\nThe combined number of oranges and apples in the fourth basket is 13+7=20\nThe fourth basket also contains 14-2=12 bananas.\nIn total, the fourth basket has 20+12=32 fruits.\nThe four baskets together have 32+114=146 fruits.\nThe answer is 146\n\n"  # noqa: E501
)


def seed_gsm8k(item: EvalItem, shots: list[EvalItem], k: int = 0) -> str:
    question = raw(item, "question")
    if k > 0:  # llmuses: 0-shot, or its own 4 examples whatever the number asked
        return GSM8K_SEED_SHOTS + f"Question: {question}\nLet's think step by step\nAnswer:"
    return "Question: " + question + "\nAnswer:"


SEED = {"arc": seed_arc, "ceval": seed_ceval, "mmlu": seed_mmlu, "gsm8k": seed_gsm8k}
