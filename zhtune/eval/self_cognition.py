"""The identity probe: does the model say who it is and who made it?

Each held-out identity question (`zhtune.data.load_identity_probe`) is asked as one user turn. A reply
counts when it contains BOTH the name and the author in the question's language (zh: 小黄 and 魔搭;
en: Xiao Huang and ModelScope), compared case-insensitively. `--model_name ZH [EN]` and
`--model_author ZH [EN]` give them; with one value it serves both languages.
"""

from zhtune.data.self_cognition import Identity, load_identity_probe
from zhtune.errors import UserError
from zhtune.eval.base import Benchmark, EvalItem, Scored


class SelfCognition(Benchmark):
    name = "self-cognition"
    kind = "identity"
    max_new_tokens = 256

    def __init__(self, model_name: list[str], model_author: list[str]):
        identity = Identity.from_args(model_name, model_author)
        if identity is None:
            raise UserError("--eval_dataset self-cognition needs --model_name and --model_author, "
                            "e.g. --model_name 小黄 'Xiao Huang' --model_author 魔搭 ModelScope.")
        self.names = {tag: identity.for_language(tag) for tag in ("zh", "en")}
        self.model_name, self.model_author = list(model_name), list(model_author)

    def load(self, data_dir=None, few_shot: bool = False) -> list[EvalItem]:
        if few_shot:
            return []
        items = []
        for i, row in enumerate(load_identity_probe(self.model_name, self.model_author)):
            tag = row.get("tag", "zh")
            name, author = row.get("name") or self.names[tag][0], row.get("author") or self.names[tag][1]
            items.append(EvalItem(f"identity-{i}", row["query"], f"{name} + {author}",
                                  meta={"tag": tag, "name": name, "author": author}))
        return items

    def source(self, data_dir) -> str:
        return "zhtune.data.load_identity_probe (held-out questions)"

    def user_prompt(self, item: EvalItem) -> str:
        return item.question

    def score(self, item: EvalItem, output: str, prompt: str | None = None, labels: str | None = None) -> Scored:
        text = (output or "").casefold()
        found = [term for term in (item.meta["name"], item.meta["author"]) if term.casefold() in text]
        return Scored(" + ".join(found) if found else None, len(found) == 2)


def score_identity(engine, model_name: list[str], model_author: list[str], settings=None, batch_size: int = 8,
                   progress: bool = False, max_new_tokens: int | None = None) -> dict:
    """Ask the probe questions through an engine: {"score", "correct", "total", "by_tag", "items"}."""
    from zhtune.infer.base import GenerationSettings

    bench = SelfCognition(model_name, model_author)
    items = bench.load()
    settings = settings or GenerationSettings(max_new_tokens=max_new_tokens or bench.max_new_tokens, do_sample=False)
    outputs = engine.generate([bench.conversation(it) for it in items], settings, batch_size=batch_size,
                              progress=progress)
    return identity_result(bench, items, outputs)


def identity_result(bench: SelfCognition, items: list[EvalItem], outputs: list[str]) -> dict:
    """The probe's result from replies already generated (one per item, in order)."""
    rows, by_tag = [], {}
    for item, output in zip(items, outputs, strict=True):
        scored = bench.score(item, output)
        by_tag.setdefault(item.meta["tag"], []).append(scored.correct)
        rows.append({"query": item.question, "tag": item.meta["tag"], "response": output,
                     "found": scored.extracted, "correct": scored.correct})
    correct = sum(r["correct"] for r in rows)
    return {"score": correct / len(rows) if rows else 0.0, "correct": correct, "total": len(rows),
            "by_tag": {tag: sum(v) / len(v) for tag, v in by_tag.items()}, "items": rows}
