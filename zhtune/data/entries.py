"""`--dataset` entries: `[HF::|MS::]name|hub_id|path[:subset1/subset2][#N]` -> Entry.

A local path wins when it exists (it may itself contain ':' or '#'); then a registered name, with
its subsets checked; then a hub id `owner/name`. Anything else is an error that says what was meant:
a missing file, or the closest registered name.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from zhtune import hub
from zhtune.data import loaders
from zhtune.data.registry import DATASETS, DatasetInfo, get_dataset_info, unknown_dataset
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

    @property
    def subset_list(self) -> list[str] | None:
        """Subsets for reports: None for a local file or a dataset that has only the default subset."""
        return None if self.subsets in ((), ("default",)) else list(self.subsets)

    def describe(self) -> dict:
        hub_id = None
        if self.source == "hub":
            hub_id = self.name
        elif self.info is not None and self.info.shipped_file is None:
            hub_id = self.info.hf_id if self.use_hf else self.info.ms_id
        return {"entry": self.text, "name": self.name, "subset": self.subset_list,
                "requested": self.requested, "source": self.source,
                "hub": ("hf" if self.use_hf else "ms") if hub_id else None, "hub_id": hub_id,
                "path": str(self.path) if self.path else None}


def parse_entry(text: str) -> Entry:
    raw = str(text).strip()
    if not raw:
        raise UserError("empty --dataset entry. Give a registered name, a hub id or a local file.")
    use_hf = hub.use_hf()
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
    raise unknown_dataset(name)


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
