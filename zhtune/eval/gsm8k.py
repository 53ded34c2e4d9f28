"""GSM8K: grade-school maths word problems; the main test split (1319 items) is scored.

Local copy: gsm8k/test.jsonl (and gsm8k/train.jsonl for few-shot), rows {"question", "answer"} where
`answer` is the worked solution ending in "#### <number>", as in openai/grade-school-math (the hub
copies openai/gsm8k and modelscope/gsm8k, config "main", have the same rows).
The reply is scored by the number it ends on (see extract.extract_number).
"""

import re
from pathlib import Path

from zhtune.eval.base import Benchmark, EvalItem, hub_rows, read_records, rows_to_items
from zhtune.eval.extract import to_number


def parse_row(row: dict, index: int) -> EvalItem:
    solution = row["answer"]
    if "####" not in solution:
        raise ValueError("the answer has no '#### <number>' line")
    gold = to_number(solution.rsplit("####", 1)[1])
    if gold is None:
        raise ValueError(f"'{solution.rsplit('####', 1)[1].strip()}' after #### is not a number")
    readable = re.sub(r"<<[^>]*>>", "", solution).strip()  # drop the calculator annotations
    item = EvalItem(f"gsm8k-{index}", row["question"].strip(), gold, solution=readable)
    if item.question != row["question"]:
        item.meta["raw"] = {"question": row["question"]}
    return item


class GSM8K(Benchmark):
    name = "gsm8k"
    ms_id = "modelscope/gsm8k"
    hf_id = "openai/gsm8k"
    kind = "number"
    max_new_tokens = 512

    layout = "A local copy has gsm8k/test.jsonl (and gsm8k/train.jsonl for few-shot) with question/answer rows."

    def data_files(self, folder: Path, few_shot: bool = False) -> list[Path]:
        path = folder / ("train.jsonl" if few_shot else "test.jsonl")
        return [path] if path.is_file() else []

    def load_local(self, folder: Path, few_shot: bool) -> list[EvalItem]:
        return [item for path in self.data_files(folder, few_shot)
                for item in rows_to_items(read_records(path), parse_row, str(path))]

    def load_hub(self, few_shot: bool) -> list[EvalItem]:
        split = self.shot_split if few_shot else self.test_split
        return rows_to_items(hub_rows(self, "main", split), parse_row, f"{self.ms_id} main {split}")

    def user_prompt(self, item: EvalItem) -> str:
        return f"Question: {item.question}\nAnswer:"

    def shot_answer(self, item: EvalItem) -> str:
        return item.solution or f"#### {item.gold}"
