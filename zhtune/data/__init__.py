"""The dataset layer: registered, hub and local datasets -> a sampled mix -> encoded rows.

    load_datasets(entries, *, seed, test_ratio, val_entries, model_name, model_author) -> DatasetSplit
    describe_entries(entries) -> list[dict]            parse and check, load nothing
    plan_datasets(entries, ...) -> DatasetPlan         row counts for --dry_run, no hub access
    encode_rows(rows, template, max_length, truncation_strategy, num_proc, cache_dir) -> EncodedSet
    format_statistics(split, encoded_train, encoded_val) -> str
    load_identity_probe(model_name, model_author) -> list[dict]
"""

from zhtune.data.encode import EncodedSet, encode_rows
from zhtune.data.entries import describe_entries
from zhtune.data.mix import DatasetPlan, DatasetSplit, load_datasets, plan_datasets
from zhtune.data.registry import DATASETS, DatasetInfo
from zhtune.data.self_cognition import load_identity_probe
from zhtune.data.stats import format_statistics

__all__ = ["DATASETS", "DatasetInfo", "DatasetPlan", "DatasetSplit", "EncodedSet", "describe_entries", "encode_rows",
           "format_statistics", "load_datasets", "load_identity_probe", "plan_datasets"]
