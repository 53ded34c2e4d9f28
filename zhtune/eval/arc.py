"""ARC-Challenge (AI2 Reasoning Challenge): grade-school science, 1172 test items, 3-5 options.

Three row formats are read, whichever a file holds:
  - the original AI2 jsonl: {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
  - Hugging Face / ModelScope rows: {"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}
  - llm-foundry's re-processed file: {"query": "Question: ...", "choices": [...], "gold": <index>}
22 of the 1172 test items label their options "1"-"4" instead of "A"-"D". The implementation behind
the seed's table compared the model's letter with answerKey "3" and so could never score them; here
options are always shown and scored as A, B, C, ... by position (`base.letter_item`).
"""

from pathlib import Path

from zhtune.eval.base import Benchmark, EvalItem, hub_rows, letter_item, options_text, read_records, rows_to_items
from zhtune.eval.extract import LETTERS

SUBSET = "ARC-Challenge"


def parse_row(row: dict, index: int) -> EvalItem:
    if "query" in row and "gold" in row:  # llm-foundry
        question = row["query"].strip()
        question = question[len("Question:"):].strip() if question.startswith("Question:") else question
        n = len(row["choices"])
        return letter_item(f"arc-{index}", question, list(row["choices"]), list(LETTERS[:n]), LETTERS[int(row["gold"])])
    q = row["question"]
    if isinstance(q, dict):  # AI2 jsonl
        texts, labels, stem = [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]], q["stem"]
    else:  # Hugging Face rows
        texts, labels, stem = list(row["choices"]["text"]), list(row["choices"]["label"]), q
    return letter_item(str(row.get("id", f"arc-{index}")), stem, texts, labels, row["answerKey"])


class ARC(Benchmark):
    name = "arc"
    ms_id = "modelscope/ai2_arc"
    hf_id = "allenai/ai2_arc"
    layout = ("A local copy is one ARC-Challenge test file under arc/: ARC-Challenge-Test.jsonl (AI2), "
              "test-*.parquet (Hugging Face) or arc_challenge.jsonl (llm-foundry); few-shot needs a *train* file.")

    def data_files(self, folder: Path, few_shot: bool = False) -> list[Path]:
        path = find_split_file(folder, "train" if few_shot else "test")
        return [] if path is None else [path]

    def load_local(self, folder: Path, few_shot: bool) -> list[EvalItem]:
        return [item for path in self.data_files(folder, few_shot)
                for item in rows_to_items(read_records(path), parse_row, str(path))]

    def load_hub(self, few_shot: bool) -> list[EvalItem]:
        split = self.shot_split if few_shot else self.test_split
        return rows_to_items(hub_rows(self, SUBSET, split), parse_row, f"{self.ms_id} {split}")

    def user_prompt(self, item: EvalItem) -> str:
        return ("The following is a multiple choice science question. Answer with the letter of the correct "
                f"option.\n\n{item.question}\n{options_text(item)}\nAnswer:")


def find_split_file(folder: Path, split: str) -> Path | None:
    """The Challenge file of a split under folder (any depth); ARC-Easy files are ignored."""
    order = {".jsonl": 0, ".json": 1, ".parquet": 2}
    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix in order
                    and "easy" not in str(p.relative_to(folder)).lower()),
                   key=lambda p: (order[p.suffix], str(p)))
    named = [p for p in files if split in p.name.lower()]
    if named or split != "test":
        return named[0] if named else None
    unnamed = [p for p in files if not any(s in p.name.lower() for s in ("train", "dev", "val"))]
    return unnamed[0] if unnamed else None
