"""Row formats -> one conversation format.

A file's format is detected from its first row and every row is read in that format:
  messages        {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  sharegpt        {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system"?}
  alpaca          {"instruction", "input"?, "output", "system"?, "history"?: [[query, reply], ...]}
  query/response  {"query", "response", "system"?, "history"?}
Each becomes {"messages": [...]} (plus "tag" when the row has one). A row that does not fit, or that
has an empty reply, is a UserError naming the source, the row and the fields found: training on a
silently dropped or empty reply teaches the model to say nothing.

For inference (`replies_optional=True`, `zhtune infer --val_dataset`) the last reply may be missing or
empty, as in ms-swift: a query alone, or a conversation ending on a user turn, is a prompt.
"""

import json
import math
from collections.abc import Iterable

from zhtune.errors import UserError
from zhtune.templates import check_messages

FORMATS = ("messages", "sharegpt", "alpaca", "query/response")
FORMAT_HINT = ("A row needs `messages` (OpenAI roles), `conversations` (sharegpt from/value), "
               "`instruction`+`output` (alpaca) or `query`+`response`.")

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system"}


class RowError(Exception):
    """Why one row cannot be read; `convert_rows` adds where it is."""


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "query" in row or "response" in row:
        return "query/response"
    return None


def convert_rows(records: Iterable[tuple[int, object]], source: str, unit: str = "row",
                 columns: dict | None = None, skipped: list | None = None,
                 replies_optional: bool = False) -> list[dict]:
    """(number, raw record) pairs -> conversation rows; `unit` names the number ('row' or 'line').

    A bad row raises, unless `skipped` is a list: then its one-line reason is appended there and
    the row left out (for hub datasets, whose rows the user cannot fix).
    """
    rows, fmt, first = [], None, None
    for number, record in records:
        try:
            if not isinstance(record, dict):
                raise UserError(f"{source} {unit} {number}: expected an object with fields, "
                                f"found {type(record).__name__}. {FORMAT_HINT}")
            if columns:
                record = {columns.get(k, k): v for k, v in record.items()}
            own = detect_format(record)
            if own is None:
                raise UserError(f"{source} {unit} {number}: fits no known format "
                                f"(fields: {_fields(record)}). {FORMAT_HINT}")
            if fmt is None:  # the file's format is its first row's
                fmt, first = own, number
            elif own != fmt:
                raise UserError(f"{source} {unit} {number}: is in the {own} format (fields: {_fields(record)}), "
                                f"but {unit} {first} set the file's format to {fmt}. Write every row in one format.")
            try:
                rows.append(to_row(record, fmt, replies_optional))
            except RowError as e:
                raise UserError(f"{source} {unit} {number}: {e} (format {fmt}, detected from {unit} {first}; "
                                f"fields: {_fields(record)}). Fix or remove the row.") from None
        except UserError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    if not rows:
        why = f" (all {len(skipped)} rows skipped; the first: {skipped[0]})" if skipped else ""
        raise UserError(f"{source}: has no rows{why}. Give a dataset with at least one conversation.")
    return rows


def to_row(record: dict, fmt: str, replies_optional: bool = False) -> dict:
    """`replies_optional` (inference): the last reply may be missing or empty; the row is then a prompt."""
    if replies_optional and fmt in ("alpaca", "query/response"):
        key = "output" if fmt == "alpaca" else "response"
        record = {**record, key: record.get(key)}  # missing -> None -> "" -> left out below
    messages = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
                "query/response": _from_query_response}[fmt](record)
    if replies_optional and messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages = messages[:-1]
    try:
        check_messages(messages, for_generation=replies_optional and bool(messages)
                       and messages[-1]["role"] == "user")
    except UserError as e:
        raise RowError(str(e).rstrip(".")) from None
    for m in messages:
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty assistant reply")
        if m["role"] == "user" and not m["content"].strip():
            raise RowError("empty user message")
    row = {"messages": messages}
    if isinstance(record.get("tag"), str) and record["tag"]:
        row["tag"] = record["tag"]
    return row


# -- one converter per format ----------------------------------------------------------------------

def _from_messages(record: dict) -> list[dict]:
    turns = _as_list(record["messages"], "messages")
    out = []
    for i, m in enumerate(turns, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"message {i} needs `role` and `content`")
        if m["role"] not in ("system", "user", "assistant"):
            raise RowError(f"message {i} has role '{m['role']}'; use system, user or assistant")
        out.append({"role": m["role"], "content": _text(m["content"], f"message {i} content")})
    return _with_system(out, record)


def _from_sharegpt(record: dict) -> list[dict]:
    turns = _as_list(record["conversations"], "conversations")
    out = []
    for i, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise RowError(f"turn {i} is not an object")
        who, text = (t.get("from"), t.get("value")) if "from" in t else (t.get("role"), t.get("content"))
        role = _SHAREGPT_ROLES.get(str(who).lower())
        if role is None:
            raise RowError(f"turn {i} is from '{who}'; use human, gpt or system")
        out.append({"role": role, "content": _text(text, f"turn {i} value")})
    return _with_system(out, record)


def _from_alpaca(record: dict) -> list[dict]:
    if "output" not in record:
        raise RowError("missing `output`")
    instruction = _text(record["instruction"], "instruction")
    extra = _text(record.get("input"), "input")
    query = f"{instruction}\n{extra}" if extra.strip() else instruction
    return _conversation(record, query, _text(record["output"], "output"))


def _from_query_response(record: dict) -> list[dict]:
    if "query" not in record or "response" not in record:
        raise RowError("needs both `query` and `response`")
    return _conversation(record, _text(record["query"], "query"), _text(record["response"], "response"))


# -- helpers ---------------------------------------------------------------------------------------

def _conversation(record: dict, query: str, reply: str) -> list[dict]:
    out = []
    history = record.get("history")
    for i, pair in enumerate(_as_list(history, "history") if history not in (None, "") else [], 1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"history item {i} must be a [query, reply] pair")
        out += [{"role": "user", "content": _text(pair[0], f"history {i} query")},
                {"role": "assistant", "content": _text(pair[1], f"history {i} reply")}]
    out += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
    return _with_system(out, record)


def _with_system(messages: list[dict], record: dict) -> list[dict]:
    system = _text(record.get("system"), "system")
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _as_list(value, what: str) -> list:
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"`{what}` is text that is not JSON") from None
    if hasattr(value, "tolist"):  # numpy arrays from parquet/pandas
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError(f"`{what}` must be a list, found {type(value).__name__}")
    return list(value)


def _text(value, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):  # an empty cell read by pandas
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError(f"{what} must be text, found {type(value).__name__}")


def _fields(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"
