"""Reading data files, and writing files and folders whole or not at all.

Writers: a temporary name in the same folder, then a rename, so a killed run never leaves a half
file or folder under the final name. Readers: rows of .jsonl/.json/.csv/.parquet with their row
numbers, every failure one UserError naming the file and what to do.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

from zhtune.errors import UserError

# -- writing -------------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def staged_file(path: Path):
    """Yield a temporary path beside `path` to write to; renamed to `path` on success, removed on failure.
    The suffix is kept (savefig and np.savez pick the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2, default=str))


def write_jsonl_atomic(path: Path, rows) -> None:
    """One JSON object per line; the parent folder is created."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def staged_folder(target: Path, replace: bool = False):
    """Yield a temporary folder beside `target`; on success rename it to `target` (replacing an
    existing one when `replace`, else keeping whichever finished first); on failure remove it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists() and replace:
            shutil.rmtree(target)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- reading -------------------------------------------------------------------------------------

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_records(file: Path, csv_header: bool = True) -> list[tuple[int, object]]:
    """(row number, row) of a data file: dicts from .jsonl/.json/.parquet/.csv with a header, lists
    from a .csv without one. JSON lines saved as .json are read as such."""
    file = Path(file)
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return list(_jsonl(file))
    if suffix == ".json":
        return list(enumerate(_json(file), 1))
    try:
        if suffix == ".csv":
            import csv
            with _open_text(file) as f:
                rows = list(csv.DictReader(f)) if csv_header else [r for r in csv.reader(f) if r]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            rows = pq.read_table(file).to_pylist()
        else:
            raise UserError(f"{file}: unsupported file type '{suffix or '(none)'}'. "
                            f"Use {', '.join(DATA_SUFFIXES)}.")
    except UserError:
        raise
    except ImportError as e:
        raise UserError(f"{file}: reading {suffix} files needs `pip install 'zhtune[data]'`.") from e
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
        raise UserError(f"{file}: cannot be read as {suffix} ({type(e).__name__}: {one_line(e)}). "
                        "Check the file, or convert it to .jsonl.") from e
    return list(enumerate(rows, 1))


@contextlib.contextmanager
def reading(path, what: str, fix: str):
    """The one boundary where a model folder, adapter, checkpoint or config file is read: any failure
    inside becomes one UserError naming `path`, what was being read and `fix`; the original exception
    is chained for ZHTUNE_DEBUG=1. Running out of memory is not the file's fault and passes through."""
    try:
        yield
    except (UserError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers, peft, safetensors and json raise many kinds
        if type(e).__name__ == "OutOfMemoryError":
            raise
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {one_line(e)}). {fix}") from e


def read_json_file(path, what: str, fix: str, arg: str = "") -> dict:
    """A JSON object from a file (a config, sft_args.json, ...), through `reading`; `arg` prefixes the message."""
    path = Path(path)
    with reading(f"{arg} {path}".strip(), what, fix):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
    return data


def one_line(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _jsonl(file: Path):
    with _open_text(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{file} line {number}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}). "
                                "A .jsonl file holds one JSON object per line.") from e


def _json(file: Path) -> list:
    with _open_text(file) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON lines saved as .json
            return [record for _, record in _jsonl(file)]
        raise UserError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}). "
                        "A .json file holds one array of rows.") from e
    if isinstance(data, dict):
        raise UserError(f"{file}: holds one JSON object (fields: {', '.join(map(str, data)) or 'none'}); "
                        "a .json dataset is an array of rows, e.g. [{\"query\": ..., \"response\": ...}].")
    if not isinstance(data, list):
        raise UserError(f"{file}: a .json dataset is an array of rows, found {type(data).__name__}.")
    return data


class _CheckedText:
    """An open text file whose decoding errors become one UserError naming the file."""

    def __init__(self, file: Path):
        self.file = file
        try:
            self.handle = open(file, encoding="utf-8-sig")
        except OSError as e:
            raise UserError(f"{file}: cannot be opened ({e.strerror}).") from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def __iter__(self):
        try:
            yield from self.handle
        except UnicodeDecodeError as e:
            raise UserError(f"{self.file}: is not UTF-8 text ({e.reason} at byte {e.start}). Save it as UTF-8.") from e

    def read(self) -> str:
        return "".join(self)


def _open_text(file: Path) -> _CheckedText:
    return _CheckedText(file)
