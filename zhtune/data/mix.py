"""`--dataset` entries -> one training mix and a validation split.

An entry is `[HF::|MS::]name|hub_id|path[:subset1/subset2][#N]`: a registered name, a hub id or a
local file (or folder); subsets of a registered or hub dataset (none given: all registered ones);
`#N` samples N rows with the dataset seed (N above the size repeats the whole set and draws the rest,
with a warning). Every entry is parsed before any is loaded, so a typo in the last entry fails at once.
"""

import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.data import loaders
from zhtune.data.registry import DATASETS, DatasetInfo, get_dataset_info
from zhtune.data.self_cognition import Identity, fill_placeholders
from zhtune.errors import UserError, closest

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Entry:
    text: str  # as the user wrote it
    name: str  # registered name, hub id, or path as given
    source: str  # "registered" | "hub" | "local"
    subsets: tuple = ()
    requested: int | None = None
    use_hf: bool = False
    path: Path | None = None
    info: DatasetInfo | None = None

    def describe(self) -> dict:
        hub_id = None
        if self.source == "hub":
            hub_id = self.name
        elif self.info is not None and self.info.shipped_file is None:
            hub_id = self.info.hf_id if self.use_hf else self.info.ms_id
        return {"entry": self.text, "name": self.name, "subset": _subset_list(self.subsets),
                "requested": self.requested, "source": self.source,
                "hub": ("hf" if self.use_hf else "ms") if hub_id else None, "hub_id": hub_id,
                "path": str(self.path) if self.path else None}


@dataclass
class DatasetSplit:
    train: list[dict]
    val: list[dict]
    entries: list[dict] = field(default_factory=list)  # {"name", "subset", "requested", "train", "val"}


# -- parsing ---------------------------------------------------------------------------------------

def parse_entry(text: str) -> Entry:
    raw = str(text).strip()
    if not raw:
        raise UserError("empty --dataset entry. Give a registered name, a hub id or a local file.")
    use_hf = loaders.use_hf_by_default()
    if raw[:4].upper() in ("HF::", "MS::"):
        use_hf, raw = raw[:2].upper() == "HF", raw[4:]
    if _exists(raw):  # a local path may itself contain ':' or '#'
        return Entry(text, raw, "local", path=_path(raw))
    body, requested = raw, None
    if "#" in raw:
        body, _, count = raw.rpartition("#")
        requested = _parse_count(count, text)
    if _exists(body):
        return Entry(text, body, "local", requested=requested, path=_path(body))
    name, has_subsets, subset_text = body.partition(":")
    subsets = tuple(s.strip() for s in subset_text.split("/")) if has_subsets else ()
    if has_subsets and not all(subsets):
        raise UserError(f"--dataset {text}: empty subset name; write name:subset1/subset2.")
    if _exists(name):
        raise UserError(f"--dataset {text}: a local file has no subsets; drop ':{subset_text}'.")
    if name in DATASETS:
        return _registered(text, name, subsets, requested, use_hf)
    if _looks_like_path(name):
        raise UserError(f"--dataset {text}: file '{name}' does not exist. Check the path "
                        f"(relative paths start from {Path.cwd()}).")
    if _HUB_ID.fullmatch(name):
        return Entry(text, name, "hub", subsets or ("default",), requested, use_hf)
    get_dataset_info(name)  # raises the "Did you mean" error
    raise AssertionError("unreachable")


def _registered(text, name, subsets, requested, use_hf) -> Entry:
    info = get_dataset_info(name)
    for s in subsets:
        if s not in info.subsets:
            raise UserError(f"--dataset {text}: '{name}' has no subset '{s}'.{closest(s, info.subsets)} "
                            f"Subsets: {', '.join(info.subsets)}.")
    if info.shipped_file:
        use_hf = False
    elif use_hf and not info.hf_id:
        raise UserError(f"--dataset {text}: '{name}' is only on ModelScope; unset USE_HF (or write MS::{name}).")
    elif not use_hf and not info.ms_id:
        raise UserError(f"--dataset {text}: '{name}' is only on Hugging Face; set USE_HF=1 (or write HF::{name}).")
    return Entry(text, name, "registered", subsets or info.subsets, requested, use_hf, info=info)


def _parse_count(count: str, text: str) -> int:
    if not count.strip().isdigit() or int(count) < 1:
        raise UserError(f"--dataset {text}: '#{count}' must be a positive whole number of rows, e.g. {text.rpartition('#')[0]}#1000.")
    return int(count)


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _exists(text: str) -> bool:
    return bool(text) and _path(text).exists()


def _looks_like_path(name: str) -> bool:
    return (Path(name).suffix.lower() in loaders.SUPPORTED_SUFFIXES or name.startswith(("/", ".", "~"))
            or "\\" in name or name.count("/") > 1)


def describe_entries(entries: list[str]) -> list[dict]:
    """Parse and check entries without loading any rows (for early errors and --dry_run)."""
    return [parse_entry(e).describe() for e in entries]


# -- loading, sampling, splitting ------------------------------------------------------------------

def load_entry(entry: Entry) -> list[dict]:
    if entry.source == "local":
        return loaders.load_local(entry.path)
    info = entry.info
    if info is not None and info.shipped_file:
        return loaders.load_local(info.shipped_path())
    hub_id = entry.name if info is None else (info.hf_id if entry.use_hf else info.ms_id)
    split = info.split if info else "train"
    columns = info.columns if info else None
    rows = []
    for subset in entry.subsets:
        rows += loaders.load_hub(hub_id, subset, split, entry.use_hf, columns)
    return rows


def sample_rows(rows: list, n: int | None, rng: random.Random, label: str, log=None) -> list:
    """N rows: without replacement when N <= size; else the whole set repeated, the rest drawn at random."""
    if n is None:
        return list(rows)
    size = len(rows)
    if n <= size:
        return [rows[i] for i in rng.sample(range(size), n)]
    repeats, rest = divmod(n, size)
    (log or _warn)(f"dataset {label}: {n} rows requested but it has {size}; "
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
                  model_name=(), model_author=(), log=None) -> DatasetSplit:
    """Load, sample and concatenate every entry; split each for validation unless val_entries are given."""
    parsed, parsed_val, identity = _check(entries, val_entries, test_ratio, model_name, model_author)
    split = DatasetSplit([], [], [])
    for role, group in (("train", parsed), ("val", parsed_val)):
        for index, entry in enumerate(group):
            rng = random.Random(f"{seed}/{role}/{index}/{entry.text}")
            rows = sample_rows(load_entry(entry), entry.requested, rng, entry.text, log)
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
    total = lambda key: None if any(r[key] is None for r in reports) else sum(r[key] for r in reports)  # noqa: E731
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
    return {"name": entry.name, "subset": _subset_list(entry.subsets), "requested": entry.requested,
            "train": train, "val": val}


def _subset_list(subsets: tuple) -> list[str] | None:
    """Subsets for reports: None for a local file or a dataset that has only the default subset."""
    return None if subsets in ((), ("default",)) else list(subsets)


def _warn(message: str) -> None:
    print(f"[zhtune] warning: {message}", file=sys.stderr)
