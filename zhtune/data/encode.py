"""Rows -> token ids and labels through the template's own encode, in parallel and cached on disk.

Labels come only from `template.encode` (assistant replies and their end-of-turn), so this module
never knows a turn marker. It adds the length policy (`delete` drops a row over --max_length,
`truncation_left` keeps its last max_length tokens) and counts what it drops and why.

The cache file is keyed by the rows, the template, the tokenizer and the length policy, written to a
temporary name and renamed, so a re-run with the same data reuses it and an interrupted run never
leaves a half file. Large sets are encoded by `num_proc` worker processes in chunks.
"""

import hashlib
import itertools
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zhtune.errors import UserError
from zhtune.files import staged_file
from zhtune.log import logger
from zhtune.models.embedded import cache_root
from zhtune.templates import IGNORE_INDEX, Encoded

STRATEGIES = ("delete", "truncation_left")
CACHE_VERSION = 1  # bump when the encoding or the file layout changes
# Below this many rows, starting worker processes (each imports transformers and unpickles the
# tokenizer: 5-15 s) costs more than it saves.
IN_PROCESS_BELOW = 10000
CHUNK_ROWS = 1000
# Encoded into the cache key, so that a change to a template's markers, its label rule or the
# tokenizer's behaviour never reuses stale ids.
_KEY_CONVERSATION = [{"role": "system", "content": "s"}, {"role": "user", "content": "q 你好"},
                     {"role": "assistant", "content": "a 好"}, {"role": "user", "content": "q2"},
                     {"role": "assistant", "content": "a2"}]


@dataclass
class EncodedSet:
    """The kept rows; `stats`: rows, mean/min/max token length, trained_tokens,
    dropped_reasons ({reason: count}), from_cache, cache_file."""

    items: list[Encoded]
    dropped: int
    stats: dict = field(default_factory=dict)


def encode_rows(rows: list[dict], template, max_length: int | None, truncation_strategy: str = "delete",
                num_proc: int = 2, cache_dir=None) -> EncodedSet:
    """Encode rows (or read them from the cache); rows over max_length are dropped or cut per the strategy."""
    if truncation_strategy not in STRATEGIES:
        raise UserError(f"--truncation_strategy '{truncation_strategy}' is not one of {', '.join(STRATEGIES)}.")
    max_length = max_length if max_length and max_length > 0 else None
    path = _cache_folder(cache_dir) / f"{cache_key(rows, template, max_length, truncation_strategy)}.npz"
    cached = _read_cache(path)
    if cached is None:
        results = _encode_all([r["messages"] for r in rows], template, max_length, truncation_strategy, num_proc)
        items = [Encoded(*r) for r in results if not isinstance(r, str)]
        reasons = Counter(r for r in results if isinstance(r, str))
        encoded = EncodedSet(items, sum(reasons.values()), _stats(items, reasons))
        _write_cache(path, encoded)
    else:
        encoded = cached
    encoded.stats.update(from_cache=cached is not None, cache_file=str(path))
    return encoded


def cache_key(rows: list[dict], template, max_length, truncation_strategy: str) -> str:
    tokenizer = template.tokenizer
    digest = hashlib.sha256()
    probe = template.encode(_KEY_CONVERSATION)
    header = [CACHE_VERSION, template.name, template.default_system, type(tokenizer).__name__,
              getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_length, truncation_strategy,
              probe.input_ids, probe.labels]
    digest.update(json.dumps(header, ensure_ascii=False).encode())
    for row in rows:
        digest.update(json.dumps(row["messages"], ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


# -- encoding --------------------------------------------------------------------------------------

def fit_length(enc: Encoded, max_length: int | None, strategy: str):
    """(input_ids, labels), or the reason the row is dropped."""
    ids, labels = enc.input_ids, enc.labels
    if max_length and len(ids) > max_length:
        if strategy == "delete":
            return f"longer than max_length {max_length}"
        ids, labels = ids[-max_length:], labels[-max_length:]
        if all(label == IGNORE_INDEX for label in labels):
            return f"no reply left after truncation_left to {max_length}"
    elif all(label == IGNORE_INDEX for label in labels):
        return "no trained tokens"
    return list(ids), list(labels)


def _encode_chunk(messages_list, template, max_length, strategy) -> list:
    return [fit_length(template.encode(m), max_length, strategy) for m in messages_list]


_worker = {}


def _init_worker(template, max_length, strategy):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker.update(template=template, max_length=max_length, strategy=strategy)


def _worker_chunk(messages_list):
    return _encode_chunk(messages_list, _worker["template"], _worker["max_length"], _worker["strategy"])


def _encode_all(messages_list, template, max_length, strategy, num_proc) -> list:
    num_proc = min(num_proc, os.cpu_count() or 1)
    if num_proc <= 1 or len(messages_list) < IN_PROCESS_BELOW:
        return _encode_chunk(messages_list, template, max_length, strategy)
    chunks = [messages_list[i:i + CHUNK_ROWS] for i in range(0, len(messages_list), CHUNK_ROWS)]
    processes = min(num_proc, len(chunks))
    logger.info(f"encoding {len(messages_list)} rows with {processes} processes (cached for re-runs)...")
    # spawn, not fork: the parent may already run torch and tokenizer threads, which fork can deadlock
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, _init_worker, (template, max_length, strategy)) as pool:
        return [r for chunk in pool.imap(_worker_chunk, chunks) for r in chunk]


def _stats(items: list[Encoded], reasons: Counter) -> dict:
    lengths = [len(e.input_ids) for e in items]
    return {"rows": len(items),
            "mean": round(sum(lengths) / len(lengths), 1) if lengths else None,
            "min": min(lengths) if lengths else None,
            "max": max(lengths) if lengths else None,
            "trained_tokens": sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in items),
            "dropped_reasons": dict(reasons)}


# -- cache -----------------------------------------------------------------------------------------

def _cache_folder(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir else cache_root() / "encoded"


def _read_cache(path: Path) -> EncodedSet | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            ids, labels, offsets = f["input_ids"], f["labels"], f["offsets"]
            meta = json.loads(str(f["meta"]))
    except (OSError, ValueError, KeyError):  # unreadable: encode again and overwrite
        return None
    items = [Encoded(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in itertools.pairwise(offsets)]
    return EncodedSet(items, meta["dropped"], meta["stats"])


def _write_cache(path: Path, encoded: EncodedSet) -> None:
    offsets = np.zeros(len(encoded.items) + 1, dtype=np.int64)
    np.cumsum([len(e.input_ids) for e in encoded.items], out=offsets[1:])

    def flat(key):
        return np.fromiter((t for e in encoded.items for t in getattr(e, key)), dtype=np.int32, count=int(offsets[-1]))
    meta = json.dumps({"dropped": encoded.dropped, "stats": encoded.stats}, ensure_ascii=False)
    try:
        with staged_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, input_ids=flat("input_ids"), labels=flat("labels"), offsets=offsets, meta=np.array(meta))
    except OSError as e:
        logger.warning(f"could not write the encoding cache {path} ({e.strerror or e}); continuing without it.")
