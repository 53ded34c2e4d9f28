"""What every benchmark shares: the item, where its files come from, prompts as chat turns, scoring.

A benchmark is one small class (arc.py, ceval.py, gsm8k.py, mmlu.py, self_cognition.py). It reads its
test split and its few-shot split either from a local folder (`--eval_data_dir DIR` holds DIR/arc,
DIR/ceval, DIR/gsm8k, DIR/mmlu in the files' original formats) or from the hub (ModelScope, or
Hugging Face with USE_HF=1), and turns every row into an `EvalItem`. Everything after that (prompt,
generation, extraction, scoring) is the same code for all of them.
"""

from dataclasses import dataclass, field
from pathlib import Path

from zhtune import files, hub
from zhtune.errors import UserError
from zhtune.eval.extract import LETTERS, extract_choice, extract_number, numbers_equal, to_number


@dataclass
class EvalItem:
    id: str
    question: str
    gold: str  # a letter, a canonical number, or for self-cognition "name + author"
    choices: list[str] = field(default_factory=list)  # option texts; letter i is LETTERS[i]
    subject: str | None = None
    solution: str | None = None  # the worked answer a few-shot example shows (GSM8K)
    meta: dict = field(default_factory=dict)

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.choices)]


@dataclass
class Scored:
    extracted: str | None
    correct: bool

    @property
    def no_answer(self) -> bool:
        return self.extracted is None


def options_text(item: EvalItem) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(item.letters, item.choices))


def raw(item: EvalItem, key: str):
    """The question or the choices exactly as the file had them (before .strip()), for the seed prompts."""
    return item.meta.get("raw", {}).get(key, item.question if key == "question" else item.choices)


def letter_item(id_: str, question: str, choices: list[str], labels: list[str], answer_key: str,
                subject: str | None = None) -> EvalItem:
    """An item whose options carry their own labels ("A".."E", or ARC's "1".."4").

    Options are shown as A, B, C, ... by position, and the gold letter is the position of the answer
    key among the labels, so an item labelled 1-4 with answerKey "3" has gold "C".
    """
    labels = [str(label).strip() for label in labels]
    key = str(answer_key).strip()
    if key not in labels:
        raise ValueError(f"answer key {key!r} is not one of the labels {labels}")
    gold = LETTERS[labels.index(key)]
    meta = {"labels": labels} if labels != list(LETTERS[:len(labels)]) else {}
    choices = [str(c) for c in choices]
    item = EvalItem(id_, question.strip(), gold, [c.strip() for c in choices], subject, meta=meta)
    if item.question != question or item.choices != choices:
        item.meta["raw"] = {"question": question, "choices": choices}
    return item


def abcd_item(id_: str, question: str, row: dict, answer, subject: str | None = None) -> EvalItem:
    """An item whose options are the row's A, B, C, D columns and whose answer is one of those letters."""
    return letter_item(id_, question, [row[k] for k in "ABCD"], list("ABCD"), str(answer).strip().upper(), subject)


class Benchmark:
    """One benchmark. Subclasses set the names and implement the loaders and the prompt."""

    name: str = ""
    ms_id: str | None = None  # ModelScope dataset id
    hf_id: str | None = None  # Hugging Face dataset id
    kind: str = "choice"  # "choice" (an option letter) or "number"
    max_new_tokens: int = 32
    test_split: str = "test"
    shot_split: str = "train"

    # -- data ------------------------------------------------------------------------------------
    def load(self, data_dir: str | Path | None, few_shot: bool = False) -> list[EvalItem]:
        """The test items (or the few-shot pool) in their canonical order."""
        if data_dir is None:
            return self.load_hub(few_shot)
        folder = Path(data_dir).expanduser() / self.name
        if not folder.is_dir():
            raise UserError(f"--eval_data_dir {data_dir} has no {self.name}/ folder. Expected layout: "
                            f"{data_dir}/{{arc,ceval,gsm8k,mmlu}}/ with the official files (see zhtune/eval/README.md).")
        items = self.load_local(folder, few_shot)
        if not items and not few_shot:  # a missing few-shot split is reported by the caller
            raise UserError(f"no {self.name} items found under {folder}. {self.local_layout()}")
        return items

    def load_local(self, folder: Path, few_shot: bool) -> list[EvalItem]:
        raise NotImplementedError

    def data_files(self, folder: Path, few_shot: bool = False) -> list[Path]:
        """The files of a local copy that `load_local` reads (for --dry_run)."""
        raise NotImplementedError

    def load_hub(self, few_shot: bool) -> list[EvalItem]:
        raise NotImplementedError

    layout = ""  # one sentence: which files a local copy has

    def local_layout(self) -> str:
        return self.layout

    def source(self, data_dir: str | Path | None) -> str:
        if data_dir is not None:
            return str(Path(data_dir).expanduser() / self.name)
        return f"HF::{self.hf_id}" if hub.use_hf() else f"MS::{self.ms_id}"

    # -- prompt and scoring ----------------------------------------------------------------------
    def user_prompt(self, item: EvalItem) -> str:
        raise NotImplementedError

    def shot_answer(self, item: EvalItem) -> str:
        """The assistant turn of a few-shot example."""
        return item.gold

    def conversation(self, item: EvalItem, shots: list[EvalItem] = ()) -> list[dict]:
        """Few-shot examples as earlier user/assistant turns, then the item as the last user turn."""
        turns = []
        for shot in shots:
            turns += [{"role": "user", "content": self.user_prompt(shot)},
                      {"role": "assistant", "content": self.shot_answer(shot)}]
        return turns + [{"role": "user", "content": self.user_prompt(item)}]

    def score(self, item: EvalItem, output: str, prompt: str | None = None, labels: str | None = None) -> Scored:
        """`prompt`: the user turn the model saw (its echo is not an answer); `labels`: the option
        labels it showed (default A, B, C, ...). The extracted answer is the letter by position."""
        if self.kind == "number":
            value = extract_number(output, prompt)
            return Scored(value, numbers_equal(value, to_number(item.gold)))
        labels = labels or item.letters
        label = extract_choice(output, labels, prompt)
        letter = None if label is None else LETTERS[labels.index(label)]
        return Scored(letter, letter == item.gold)


def pick_shots(item: EvalItem, pool: list[EvalItem], k: int) -> list[EvalItem]:
    """The first k examples of the pool, from the item's own subject where the pool has one."""
    if k <= 0 or not pool:
        return []
    same = [s for s in pool if s.subject == item.subject] if item.subject else []
    return [s for s in (same or pool) if s.question != item.question][:k]  # never the item itself


# -- hub access ------------------------------------------------------------------------------------

def bundled_samples_dir() -> Path:
    """Ten hand-written items per benchmark in the official formats, for trying `zhtune eval` offline."""
    return Path(__file__).parent / "samples"


def quickstart_items_dir() -> Path:
    """104 items each of ARC-, C-Eval- and MMLU-style questions written for zhtune (NOT the official
    sets; quickstart_items/README.md), in the official formats: the quickstart's general-ability check."""
    return Path(__file__).parent / "quickstart_items"


def offline_advice() -> str:
    return (f"point at local copies instead: --eval_data_dir DIR with DIR/arc, DIR/ceval, DIR/gsm8k, DIR/mmlu "
            f"in their official formats (see zhtune/eval/README.md), or try the bundled samples: "
            f"--eval_data_dir {bundled_samples_dir()}")


def hub_rows(benchmark: "Benchmark", subset: str | None, split: str) -> list[dict]:
    """Rows of one subset and split, from ModelScope (default) or Hugging Face (USE_HF=1)."""
    dataset_id = benchmark.hf_id if hub.use_hf() else benchmark.ms_id
    return hub.load_dataset_rows(dataset_id, subset, split, advice=offline_advice())


# -- local files -----------------------------------------------------------------------------------

def read_records(path: Path) -> list:
    """Rows of a benchmark file (.jsonl, .json, .parquet, or .csv with a header), through zhtune.files."""
    return [row for _, row in files.read_records(path)]


def read_csv(path: Path, header: bool) -> list:
    """CSV rows: dicts when the file has a header, lists when it has none (MMLU)."""
    return [row for _, row in files.read_records(path, csv_header=header)]


def rows_to_items(rows: list, parse, where: str) -> list[EvalItem]:
    """parse(row, index) -> EvalItem for every row; a bad row is a UserError naming it."""
    items = []
    for i, row in enumerate(rows):
        try:
            items.append(parse(row, i))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"{where}: row {i + 1} is not in a format zhtune reads ({type(e).__name__}: {e}).") from None
    return items


class SubjectCsvBenchmark(Benchmark):
    """A benchmark stored as one <subject>_<split>.csv per subject (C-Eval, MMLU)."""
    csv_header = True

    def parse_csv_row(self, row, subject: str, index: int) -> EvalItem:
        raise NotImplementedError

    def split_dir(self, folder: Path, split: str) -> Path:
        return folder / split

    def data_files(self, folder: Path, few_shot: bool = False) -> list[Path]:
        split = self.shot_split if few_shot else self.test_split
        return sorted(self.split_dir(folder, split).glob(f"*_{split}.csv"))

    def load_local(self, folder: Path, few_shot: bool) -> list[EvalItem]:
        split = self.shot_split if few_shot else self.test_split
        items = []
        for path in self.data_files(folder, few_shot):
            subject = path.name[: -len(f"_{split}.csv")]
            items += rows_to_items(read_csv(path, self.csv_header),
                                   lambda r, i, s=subject: self.parse_csv_row(r, s, i), str(path))
        return items
