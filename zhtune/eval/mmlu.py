"""MMLU: four-option questions in 57 subjects; the test split (14042 items) is scored.

Local copy (the original Hendrycks distribution): mmlu/test/<subject>_test.csv and
mmlu/dev/<subject>_dev.csv (also under mmlu/data/), CSV with NO header and six columns: question,
A, B, C, D, answer letter. Hub rows: cais/mmlu (config "all": question, subject, choices, answer index)
or modelscope/mmlu (one subset per subject: input, A, B, C, D, target).
The implementation behind the seed's table put the question into the prompt twice (the few-shot
context already ended with it, then the question was appended again); here it appears once.
"""

from pathlib import Path

from zhtune.eval.base import (EvalItem, abcd_item, hub_rows, letter_item, options_text, rows_to_items,
                              SubjectCsvBenchmark)
from zhtune.hub import use_hf
from zhtune.eval.extract import LETTERS

SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_mathematics high_school_microeconomics high_school_physics high_school_psychology "
    "high_school_statistics high_school_us_history high_school_world_history human_aging human_sexuality "
    "international_law jurisprudence logical_fallacies machine_learning management marketing medical_genetics "
    "miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting "
    "professional_law professional_medicine professional_psychology public_relations security_studies "
    "sociology us_foreign_policy virology world_religions"
).split()


def parse_csv_row(row: list, subject: str, index: int) -> EvalItem:
    if len(row) != 6:
        raise ValueError(f"{len(row)} columns, expected 6 (question, A, B, C, D, answer)")
    return letter_item(f"{subject}-{index}", row[0], row[1:5], list("ABCD"), row[5].strip().upper(), subject)


def parse_hub_row(row: dict, subject: str, index: int) -> EvalItem:
    if "choices" in row:  # cais/mmlu
        subject = row.get("subject") or subject
        return letter_item(f"{subject}-{index}", row["question"], list(row["choices"]), list("ABCD"),
                           LETTERS[int(row["answer"])], subject)
    return abcd_item(f"{subject}-{index}", row["input"], row, row["target"], subject)


class MMLU(SubjectCsvBenchmark):
    name = "mmlu"
    ms_id = "modelscope/mmlu"
    hf_id = "cais/mmlu"
    shot_split = "dev"
    layout = ("A local copy has mmlu/test/<subject>_test.csv (and mmlu/dev/<subject>_dev.csv for few-shot), "
              "CSV without a header: question,A,B,C,D,answer.")

    csv_header = False

    def split_dir(self, folder: Path, split: str) -> Path:
        return next((d for d in (folder / split, folder / "data" / split) if d.is_dir()), folder / split)

    def parse_csv_row(self, row, subject: str, index: int) -> EvalItem:
        return parse_csv_row(row, subject, index)

    def load_hub(self, few_shot: bool) -> list[EvalItem]:
        if use_hf():  # one config holds every subject
            split = "dev" if few_shot else "test"
            rows = hub_rows(self, "all", split)
            items = rows_to_items(rows, lambda r, i: parse_hub_row(r, "", i), f"{self.hf_id} all {split}")
            return sorted(items, key=lambda it: it.subject)  # the local files' order: subjects A-Z
        split = "train" if few_shot else "test"  # modelscope/mmlu keeps the five dev items as "train"
        items = []
        for subject in SUBJECTS:
            rows = hub_rows(self, subject, split)
            items += rows_to_items(rows, lambda r, i, s=subject: parse_hub_row(r, s, i), f"{self.ms_id} {subject} {split}")
        return items

    def user_prompt(self, item: EvalItem) -> str:
        subject = item.subject.replace("_", " ")
        return (f"The following is a multiple choice question about {subject}. Answer with the letter of the "
                f"correct option.\n\n{item.question}\n{options_text(item)}\nAnswer:")
