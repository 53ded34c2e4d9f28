"""Self-cognition: teach a model its new name and author.

zhtune ships its own identity Q&A (files/self_cognition.jsonl, written for zhtune) whose queries and
replies hold `{{NAME}}` and `{{AUTHOR}}`. `--model_name ZH [EN]` and `--model_author ZH [EN]` fill
them in the row's language (`tag` zh/en; English falls back to the Chinese value); 24 of its rows are
two-turn (`history`): a general question then the identity, or the identity then a general question
answered without it. A held-out probe
(files/identity_probe.jsonl, questions that never occur in the training rows) measures whether the
identity generalises beyond the memorised phrasings.
"""

import json
import re
from dataclasses import dataclass

from zhtune.data.registry import FILES_DIR
from zhtune.errors import UserError

NAME, AUTHOR = "{{NAME}}", "{{AUTHOR}}"
PROBE_FILE = FILES_DIR / "identity_probe.jsonl"
_USAGE = "e.g. --model_name 小黄 'Xiao Huang' --model_author 魔搭 ModelScope"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class Identity:
    name_zh: str
    name_en: str
    author_zh: str
    author_en: str

    @classmethod
    def from_args(cls, model_name, model_author) -> "Identity | None":
        """None when neither is given; both are needed together, each with one or two values."""
        model_name, model_author = list(model_name or ()), list(model_author or ())
        if not model_name and not model_author:
            return None
        for flag, values in (("--model_name", model_name), ("--model_author", model_author)):
            if not values:
                raise UserError(f"{flag} is missing: self-cognition needs both --model_name and --model_author, {_USAGE}.")
            if len(values) > 2 or not all(str(v).strip() for v in values):
                raise UserError(f"{flag} takes one or two non-empty values (Chinese, then English), "
                                f"got {len(values)}: {values}. {_USAGE}.")
        return cls(model_name[0], model_name[-1], model_author[0], model_author[-1])

    def for_language(self, tag: str) -> tuple[str, str]:
        return (self.name_en, self.author_en) if tag == "en" else (self.name_zh, self.author_zh)


def language_of(row: dict) -> str:
    """'zh' or 'en': the row's tag, else whether its first user message has Chinese characters."""
    if row.get("tag") in ("zh", "en"):
        return row["tag"]
    first_user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
    return "zh" if _CJK.search(first_user) else "en"


def has_placeholders(row: dict) -> bool:
    return any(NAME in m["content"] or AUTHOR in m["content"] for m in row["messages"])


def fill_placeholders(rows: list[dict], identity: Identity | None, source: str) -> list[dict]:
    """Rows with {{NAME}}/{{AUTHOR}} replaced in their language; rows without them are returned as they are."""
    out = []
    for row in rows:
        if not has_placeholders(row):
            out.append(row)
            continue
        if identity is None:
            raise UserError(f"dataset {source} has {NAME}/{AUTHOR} placeholders: give the model's identity, {_USAGE}.")
        name, author = identity.for_language(language_of(row))
        messages = [{**m, "content": m["content"].replace(NAME, name).replace(AUTHOR, author)} for m in row["messages"]]
        out.append({**row, "messages": messages})
    return out


def load_identity_probe(model_name, model_author) -> list[dict]:
    """The held-out identity questions: {"query", "tag", "name", "author"}, name/author in the question's language."""
    identity = Identity.from_args(model_name, model_author)
    if identity is None:
        raise UserError(f"the identity probe needs --model_name and --model_author, {_USAGE}.")
    probe = []
    with open(PROBE_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                name, author = identity.for_language(item["tag"])
                query = item["query"].replace(NAME, name).replace(AUTHOR, author)
                probe.append({"query": query, "tag": item["tag"], "name": name, "author": author})
    return probe
