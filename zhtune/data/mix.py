"""Parsed entries -> one training mix and a validation split.

Each entry's rows (all its subsets, concatenated) are sampled to its `#N` with the dataset seed (N
above the size repeats the whole set and draws the rest, with a warning), filled in with the
self-cognition identity, and split for validation per entry. Every entry is parsed before any is
loaded, so a typo in the last entry fails at once.
"""

import random
from dataclasses import dataclass, field

from zhtune.data import loaders
from zhtune.data.entries import Entry, parse_entry
from zhtune.data.self_cognition import Identity, fill_placeholders
from zhtune.errors import UserError
from zhtune.log import logger


@dataclass
class DatasetSplit:
    train: list[dict]
    val: list[dict]
    entries: list[dict] = field(default_factory=list)  # {"name", "subset", "requested", "train", "val"}


def load_entry(entry: Entry, replies_optional: bool = False) -> list[dict]:
    if entry.source == "local":
        return loaders.load_local(entry.path, replies_optional=replies_optional)
    info = entry.info
    if info is not None and info.shipped_file:
        return loaders.load_local(info.shipped_path(), replies_optional=replies_optional)
    hub_id = entry.name if info is None else (info.hf_id if entry.use_hf else info.ms_id)
    split = info.split if info else "train"
    columns = info.columns if info else None
    rows = []
    for subset in entry.subsets:
        rows += loaders.load_hub(hub_id, subset, split, entry.use_hf, columns, replies_optional=replies_optional)
    return rows


def sample_rows(rows: list, n: int | None, rng: random.Random, label: str) -> list:
    """N rows: without replacement when N <= size; else the whole set repeated, the rest drawn at random."""
    if n is None:
        return list(rows)
    size = len(rows)
    if n <= size:
        return [rows[i] for i in rng.sample(range(size), n)]
    repeats, rest = divmod(n, size)
    logger.warning(f"dataset {label}: {n} rows requested but it has {size}; "
                   f"using every row {repeats} time(s) and {rest} more drawn at random.")
    return list(rows) * repeats + [rows[i] for i in rng.sample(range(size), rest)]


def val_size(n: int, ratio: float) -> int:
    """Validation rows for an entry of n rows: `ratio` of them, at least one when n >= 2, never all."""
    if ratio <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(n * ratio + 1e-9)))


def split_val(rows: list, ratio: float, rng: random.Random) -> tuple[list, list]:
    """A random `val_size` of the rows for validation; the rest, in order, for training."""
    val_index = set(rng.sample(range(len(rows)), val_size(len(rows), ratio)))
    return ([r for i, r in enumerate(rows) if i not in val_index],
            [r for i, r in enumerate(rows) if i in val_index])


def load_datasets(entries: list[str], *, seed: int = 42, test_ratio: float = 0.01, val_entries=(),
                  model_name=(), model_author=(), replies_optional: bool = False) -> DatasetSplit:
    """Load, sample and concatenate every entry; split each for validation unless val_entries are given.
    `replies_optional`: for inference, rows may end on a user turn (see formats.to_row)."""
    parsed, parsed_val, identity = _check(entries, val_entries, test_ratio, model_name, model_author)
    split = DatasetSplit([], [], [])
    for role, group in (("train", parsed), ("val", parsed_val)):
        for index, entry in enumerate(group):
            rng = random.Random(f"{seed}/{role}/{index}/{entry.text}")
            rows = sample_rows(load_entry(entry, replies_optional), entry.requested, rng, entry.text)
            rows = fill_placeholders(rows, identity, entry.text)
            if role == "val":
                train, val = [], rows
            elif parsed_val:
                train, val = rows, []
            else:
                train, val = split_val(rows, test_ratio, rng)
            split.train += train
            split.val += val
            split.entries.append(_entry_report(entry, len(train), len(val)))
    return split


@dataclass
class DatasetPlan:
    entries: list[dict]  # as DatasetSplit.entries; train/val None where only the hub could tell
    train_rows: int | None
    val_rows: int | None


def plan_datasets(entries: list[str], *, seed: int = 42, test_ratio: float = 0.01, val_entries=(),
                  model_name=(), model_author=()) -> DatasetPlan:
    """The row counts load_datasets will give, without touching a hub (for --dry_run).

    Local and shipped files are read (that checks every row); a hub entry counts as its #N, or as
    unknown (None) without one.
    """
    parsed, parsed_val, identity = _check(entries, val_entries, test_ratio, model_name, model_author)
    reports = []
    for role, group in (("train", parsed), ("val", parsed_val)):
        for entry in group:
            size = entry.requested
            if entry.source == "local" or (entry.info is not None and entry.info.shipped_file):
                rows = load_entry(entry)
                fill_placeholders(rows, identity, entry.text)
                size = size or len(rows)
            if size is None:
                train = val = None
            elif role == "val":
                train, val = 0, size
            else:
                val = 0 if parsed_val else val_size(size, test_ratio)
                train = size - val
            reports.append(_entry_report(entry, train, val))

    def total(key):
        return None if any(r[key] is None for r in reports) else sum(r[key] for r in reports)
    return DatasetPlan(reports, total("train"), total("val"))


def _check(entries, val_entries, test_ratio, model_name, model_author):
    """Every entry parsed and the arguments checked, before any row is loaded."""
    entries, val_entries = list(entries or ()), list(val_entries or ())
    if not entries:
        raise UserError("no --dataset given. Name one or more, e.g. --dataset self-cognition#500 zh-instruct "
                        "(or a local file: --dataset train.jsonl).")
    if not 0 <= test_ratio < 1:
        raise UserError(f"--dataset_test_ratio must be at least 0 and below 1, got {test_ratio}.")
    identity = Identity.from_args(model_name, model_author)
    parsed = [parse_entry(e) for e in entries]
    parsed_val = [parse_entry(e) for e in val_entries]
    if identity is None and any(e.name == "self-cognition" for e in parsed + parsed_val):
        raise UserError("self-cognition needs the model's identity: "
                        "--model_name 小黄 'Xiao Huang' --model_author 魔搭 ModelScope (Chinese, then English).")
    return parsed, parsed_val, identity


def _entry_report(entry: Entry, train, val) -> dict:
    return {"name": entry.name, "subset": entry.subset_list, "requested": entry.requested,
            "train": train, "val": val}

