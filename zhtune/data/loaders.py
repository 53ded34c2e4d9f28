"""Where rows come from: local files (.jsonl, .json, .csv, .parquet, or a folder of them) and the hubs.

Both paths end in `formats.convert_rows`, so a hub dataset and a local file are read the same way.
The hubs are optional: without the package, or offline, the error says how to use a local file.
"""

from pathlib import Path

from zhtune import hub
from zhtune.data.formats import convert_rows
from zhtune.errors import UserError
from zhtune.files import DATA_SUFFIXES as SUPPORTED_SUFFIXES
from zhtune.files import read_records
from zhtune.log import logger

_OFFLINE_ADVICE = ("if you are offline, download it elsewhere and pass a local file instead: "
                   "--dataset /path/to/train.jsonl")


# -- local files -----------------------------------------------------------------------------------

def data_files(path: Path) -> list[Path]:
    """The files a local entry stands for: the file itself, or a folder's data files in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder has no {'/'.join(SUPPORTED_SUFFIXES)} files. Give a data file.")
        return files
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise UserError(f"{path}: unsupported file type '{path.suffix or '(none)'}'. "
                        f"Use .jsonl, .json (an array of rows), .csv or .parquet.")
    return [path]


def load_local(path: Path, columns: dict | None = None, replies_optional: bool = False) -> list[dict]:
    rows = []
    for file in data_files(path):
        if file.stat().st_size == 0:
            raise UserError(f"{file}: is empty. Give a dataset with at least one conversation.")
        unit = "line" if file.suffix.lower() == ".jsonl" else "row"
        rows += convert_rows(read_records(file), str(file), unit=unit, columns=columns,
                             replies_optional=replies_optional)
    return rows


# -- hubs ------------------------------------------------------------------------------------------

def load_hub(hub_id: str, subset: str, split: str, use_hf: bool, columns: dict | None = None,
             replies_optional: bool = False) -> list[dict]:
    """One subset of a hub dataset. Rows that fit no format or have an empty reply are left out and
    counted in a warning: unlike a local file, the user cannot fix them."""
    label = f"{hub_id}:{subset}" if subset != "default" else hub_id
    records = list(enumerate(hub.load_dataset_rows(hub_id, subset, split, hf=use_hf, advice=_OFFLINE_ADVICE), 1))
    skipped = []
    rows = convert_rows(records, f"{hub.hub_name(use_hf)} {label}", columns=columns, skipped=skipped,
                        replies_optional=replies_optional)
    if skipped:
        logger.warning(f"dataset {label}: left out {len(skipped)} of {len(records)} rows that cannot be "
                       f"trained on; the first: {skipped[0]}")
    return rows
