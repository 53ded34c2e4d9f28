"""C-Eval: Chinese exam questions in 52 subjects; the val split (1346 items, with answers) is scored.

Local copy: ceval/val/<subject>_val.csv and ceval/dev/<subject>_dev.csv, CSV with the header
`id,question,A,B,C,D,answer` (dev adds `explanation`), as in the official ceval-exam.zip. Hub rows
(ceval/ceval-exam, modelscope/ceval-exam) have the same columns, one subset per subject.
The prompt is C-Eval's own: "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。" with the subject's
Chinese name.
"""


from zhtune.eval.base import (EvalItem, abcd_item, hub_rows, options_text, rows_to_items,
                              SubjectCsvBenchmark)

SUBJECTS_ZH = {
    "accountant": "注册会计师",
    "advanced_mathematics": "高等数学",
    "art_studies": "艺术学",
    "basic_medicine": "基础医学",
    "business_administration": "工商管理",
    "chinese_language_and_literature": "中国语言文学",
    "civil_servant": "公务员",
    "clinical_medicine": "临床医学",
    "college_chemistry": "大学化学",
    "college_economics": "大学经济学",
    "college_physics": "大学物理",
    "college_programming": "大学编程",
    "computer_architecture": "计算机组成",
    "computer_network": "计算机网络",
    "discrete_mathematics": "离散数学",
    "education_science": "教育学",
    "electrical_engineer": "注册电气工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "fire_engineer": "注册消防工程师",
    "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学",
    "high_school_chinese": "高中语文",
    "high_school_geography": "高中地理",
    "high_school_history": "高中历史",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理",
    "high_school_politics": "高中政治",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础",
    "law": "法学",
    "legal_professional": "法律职业资格",
    "logic": "逻辑学",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "marxism": "马克思主义基本原理",
    "metrology_engineer": "注册计量师",
    "middle_school_biology": "初中生物",
    "middle_school_chemistry": "初中化学",
    "middle_school_geography": "初中地理",
    "middle_school_history": "初中历史",
    "middle_school_mathematics": "初中数学",
    "middle_school_physics": "初中物理",
    "middle_school_politics": "初中政治",
    "modern_chinese_history": "近代史纲要",
    "operating_system": "操作系统",
    "physician": "医师资格",
    "plant_protection": "植物保护",
    "probability_and_statistics": "概率统计",
    "professional_tour_guide": "导游资格",
    "sports_science": "体育学",
    "tax_accountant": "税务师",
    "teacher_qualification": "教师资格",
    "urban_and_rural_planner": "注册城乡规划师",
    "veterinary_medicine": "兽医学",
}


def subject_zh(subject: str) -> str:
    return SUBJECTS_ZH.get(subject, subject.replace("_", " "))


def parse_row(row: dict, subject: str, index: int) -> EvalItem:
    return abcd_item(f"{subject}-{row.get('id', index)}", row["question"], row, row["answer"], subject)


class CEval(SubjectCsvBenchmark):
    name = "ceval"
    ms_id = "modelscope/ceval-exam"
    hf_id = "ceval/ceval-exam"
    test_split = "val"
    shot_split = "dev"
    layout = ("A local copy has ceval/val/<subject>_val.csv (and ceval/dev/<subject>_dev.csv for few-shot), "
              "CSV with the header id,question,A,B,C,D,answer.")

    def parse_csv_row(self, row, subject: str, index: int) -> EvalItem:
        return parse_row(row, subject, index)

    def load_hub(self, few_shot: bool) -> list[EvalItem]:
        split = self.shot_split if few_shot else self.test_split
        items = []
        for subject in sorted(SUBJECTS_ZH):
            rows = hub_rows(self, subject, split)
            items += rows_to_items(rows, lambda r, i, s=subject: parse_row(r, s, i), f"{self.ms_id} {subject} {split}")
        return items

    def user_prompt(self, item: EvalItem) -> str:
        return (f"以下是中国关于{subject_zh(item.subject)}考试的单项选择题，请选出其中的正确答案。\n\n"
                f"{item.question}\n{options_text(item)}\n答案：")
