"""Where rows come from: local files (.jsonl, .json, .csv, .parquet, or a folder of them) and the hubs.

Both paths end in `formats.convert_rows`, so a hub dataset and a local file are read the same way.
The hubs are optional: without the package, or offline, the error says how to use a local file.
"""

import json
import os
from functools import partial
from pathlib import Path

from zhtune.data.formats import convert_rows
from zhtune.errors import UserError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_LOCAL_HINT = "or download it and pass a local file instead: --dataset /path/to/train.jsonl"


def use_hf_by_default() -> bool:
    return os.environ.get("USE_HF", "0").strip().lower() in ("1", "true", "yes")


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
        suffix = file.suffix.lower()
        if file.stat().st_size == 0:
            raise UserError(f"{file}: is empty. Give a dataset with at least one conversation.")
        records = _read_jsonl(file) if suffix == ".jsonl" else _read_table(file, suffix)
        rows += convert_rows(records, str(file), unit="line" if suffix == ".jsonl" else "row", columns=columns,
                             replies_optional=replies_optional)
    return rows


def _read_jsonl(file: Path):
    with _open_text(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{file} line {number}: not valid JSON ({e.msg} at column {e.colno}). "
                                "A .jsonl file holds one JSON object per line.") from None


def _read_table(file: Path, suffix: str) -> list[tuple[int, dict]]:
    try:
        if suffix == ".json":
            records = _read_json(file)
        elif suffix == ".csv":
            import pandas as pd
            frame = pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            records = frame.to_dict("records")
        else:
            import pyarrow.parquet as pq
            records = pq.read_table(file).to_pylist()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
        raise UserError(f"{file}: cannot be read as {suffix} ({type(e).__name__}: {_one_line(e)}). "
                        "Check the file, or convert it to .jsonl.") from None
    return list(enumerate(records, 1))


def _read_json(file: Path) -> list:
    with _open_text(file) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON lines saved as .json
            return [record for _, record in _read_jsonl(file)]
        raise UserError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}). "
                        "A .json file holds one array of rows.") from None
    if isinstance(data, dict):
        raise UserError(f"{file}: holds one JSON object (fields: {', '.join(map(str, data)) or 'none'}); "
                        "a .json dataset is an array of rows, e.g. [{\"query\": ..., \"response\": ...}].")
    if not isinstance(data, list):
        raise UserError(f"{file}: a .json dataset is an array of rows, found {type(data).__name__}.")
    return data


def _open_text(file: Path):
    try:
        return open(file, encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"{file}: cannot be opened ({e.strerror}).") from None


# -- hubs ------------------------------------------------------------------------------------------

def load_hub(hub_id: str, subset: str, split: str, use_hf: bool, columns: dict | None = None, log=print,
             replies_optional: bool = False) -> list[dict]:
    """One subset of a hub dataset, through modelscope's MsDataset or Hugging Face `datasets`.

    Rows that fit no format or have an empty reply are left out and counted in a warning: unlike a
    local file, the user cannot fix them.
    """
    label = f"{hub_id}:{subset}" if subset != "default" else hub_id
    hub = "Hugging Face" if use_hf else "ModelScope"
    if use_hf:
        try:
            import datasets
        except ImportError:
            raise UserError(f"dataset {label}: loading from Hugging Face needs the `datasets` package "
                            f"(pip install 'zhtune[data]'), {_LOCAL_HINT}") from None
        load = partial(datasets.load_dataset, hub_id, None if subset == "default" else subset, split=split)
    else:
        try:
            from modelscope import MsDataset
        except ImportError:
            raise UserError(f"dataset {label}: loading from ModelScope needs the `modelscope` package "
                            f"(pip install 'zhtune[hub]'; or USE_HF=1 for Hugging Face), {_LOCAL_HINT}") from None
        load = partial(MsDataset.load, hub_id, subset_name=subset, split=split)
    try:
        dataset = load()
        records = [(i, dict(r)) for i, r in enumerate(dataset, 1)]
    except Exception as e:  # noqa: BLE001 - offline, missing id, hub down: all need the same advice
        raise UserError(f"dataset {label}: could not load it from {hub} ({type(e).__name__}: {_one_line(e)}). "
                        f"If you are offline, {_LOCAL_HINT}") from None
    skipped = []
    rows = convert_rows(records, f"{hub} {label}", columns=columns, skipped=skipped, replies_optional=replies_optional)
    if skipped:
        log(f"[zhtune] warning: dataset {label}: left out {len(skipped)} of {len(records)} rows that cannot be "
            f"trained on; the first: {skipped[0]}")
    return rows


def _one_line(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text[:limit] + ("..." if len(text) > limit else "")
