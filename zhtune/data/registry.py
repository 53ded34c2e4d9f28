"""Every dataset zhtune knows by name, as data: name -> hub ids, subsets, column renames, or a shipped file.

Adding a dataset is one `DatasetInfo(...)` line below. Rows of every dataset go through the same
format detection as local files (zhtune.data.loaders), so a declaration only says where the rows are
and, when the hub copy uses unusual column names, how to rename them.
"""

from dataclasses import dataclass, field
from pathlib import Path

from zhtune.errors import UserError, closest

FILES_DIR = Path(__file__).parent / "files"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    ms_id: str | None = None  # ModelScope id
    hf_id: str | None = None  # Hugging Face id (used with USE_HF=1 or an HF:: prefix)
    subsets: tuple = ("default",)  # no subset in an entry means all of these
    split: str = "train"
    columns: dict = field(default_factory=dict)  # hub column -> the name our formats expect
    shipped_file: str | None = None  # a file in zhtune/data/files: no hub needed
    help: str = ""

    def shipped_path(self) -> Path | None:
        return FILES_DIR / self.shipped_file if self.shipped_file else None


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("self-cognition", shipped_file="self_cognition.jsonl",
                    help="zhtune's own identity Q&A (zh/en) with {{NAME}}/{{AUTHOR}}: "
                         "needs --model_name and --model_author"),
        DatasetInfo("zh-instruct", shipped_file="zh_instruct.jsonl",
                    help="zhtune's own Chinese instruction rows (300: facts, food, festivals, arithmetic, "
                         "writing, advice, idioms and translation, small talk; 86 multi-turn conversations)"),
        DatasetInfo("en-instruct", shipped_file="en_instruct.jsonl",
                    help="zhtune's own English instruction rows (79: facts, arithmetic, writing, "
                         "advice; 16 multi-turn)"),
        DatasetInfo("swift-mix", ms_id="swift/swift-sft-mixture",
                    subsets=("sharegpt", "firefly", "codefuse", "metamathqa"),
                    help="ms-swift's cleaned zh/en general, code and math SFT mixture"),
        DatasetInfo("alpaca-zh", ms_id="AI-ModelScope/alpaca-gpt4-data-zh", hf_id="llm-wizard/alpaca-gpt4-data-zh"),
        DatasetInfo("alpaca-en", ms_id="AI-ModelScope/alpaca-gpt4-data-en", hf_id="vicgalle/alpaca-gpt4"),
        DatasetInfo("coig-cqia", ms_id="AI-ModelScope/COIG-CQIA", hf_id="m-a-p/COIG-CQIA",
                    subsets=("chinese_traditional", "coig_pc", "exam", "finance", "douban", "human_value",
                             "logi_qa", "ruozhiba", "segmentfault", "wiki", "wikihow", "xhs", "zhihu")),
        DatasetInfo("sharegpt-gpt4", ms_id="AI-ModelScope/sharegpt_gpt4",
                    subsets=("default", "V3_format", "zh_38K_format")),
        DatasetInfo("firefly-zh", ms_id="AI-ModelScope/firefly-train-1.1M", hf_id="YeungNLP/firefly-train-1.1M",
                    columns={"input": "query", "target": "response"}),
        DatasetInfo("school-math-zh", ms_id="AI-ModelScope/school_math_0.25M", hf_id="BelleGroup/school_math_0.25M"),
        DatasetInfo("metamathqa", ms_id="AI-ModelScope/MetaMathQA", hf_id="meta-math/MetaMathQA"),
        DatasetInfo("code-alpaca-en", ms_id="wyj123456/code_alpaca_en", hf_id="sahil2801/CodeAlpaca-20k"),
    ]
}


def get_dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise unknown_dataset(name) from None


def unknown_dataset(name: str) -> UserError:
    return UserError(f"unknown dataset '{name}'.{closest(name, DATASETS)} Registered: {', '.join(DATASETS)}; "
                     "or give a hub id (owner/name) or a local .jsonl/.json/.csv/.parquet file.")
