"""The quickstart's report (zhtune/eval/quickstart_report.py) and the files it reads: the own-written
general-ability items, the leakage and follow-up probes. Fast: a fake engine, no model."""

import collections
import csv
import json

import pytest

from zhtune.args import EvalArguments
from zhtune.data.registry import FILES_DIR
from zhtune.eval import quickstart_items_dir
from zhtune.eval import quickstart_report as qr
from zhtune.eval.plan import make_benchmark

ITEMS = quickstart_items_dir()


# -- the bundled items ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["arc", "ceval", "mmlu"])
def test_quickstart_items_load_through_the_official_loaders(name):
    items = make_benchmark(name, EvalArguments()).load(str(ITEMS))
    assert len(items) >= 100
    assert all(len(it.choices) == 4 and it.gold in "ABCD" for it in items)
    assert all(it.question.strip() and all(c.strip() for c in it.choices) for it in items)
    assert all(len(set(it.choices)) == 4 for it in items)  # four different options
    assert len({it.question for it in items}) == len(items)  # no question twice
    letters = collections.Counter(it.gold for it in items)
    assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1  # balanced


def test_quickstart_item_files_are_in_the_official_formats():
    arc = [json.loads(line) for line in (ITEMS / "arc" / "ARC-Challenge-Test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["answerKey"] in "ABCD" and [c["label"] for c in r["question"]["choices"]] == list("ABCD") for r in arc)
    assert len({r["id"] for r in arc}) == len(arc)
    for path in sorted((ITEMS / "ceval" / "val").glob("*_val.csv")):
        rows = list(csv.reader(path.open(encoding="utf-8")))
        assert rows[0] == ["id", "question", "A", "B", "C", "D", "answer"]
        assert all(len(r) == 7 and r[6] in "ABCD" for r in rows[1:])
    assert len(list((ITEMS / "ceval" / "val").glob("*_val.csv"))) >= 5  # several subjects
    for path in sorted((ITEMS / "mmlu" / "test").glob("*_test.csv")):
        rows = list(csv.reader(path.open(encoding="utf-8")))
        assert all(len(r) == 6 and r[5] in "ABCD" for r in rows)  # no header
    assert len(list((ITEMS / "mmlu" / "test").glob("*_test.csv"))) >= 5


def test_quickstart_items_say_they_are_not_the_official_sets():
    readme = (ITEMS / "README.md").read_text(encoding="utf-8")
    assert "NOT the official" in readme and "written for zhtune" in readme and "--eval_data_dir" in readme
    assert "Apache" in (ITEMS / "LICENSE").read_text(encoding="utf-8")


# -- the probes ----------------------------------------------------------------------------------

def _turns(name):
    """(user, reply) pairs of a training file (messages, or query/response with history)."""
    pairs = []
    for row in qr.read_jsonl(FILES_DIR / name):
        if "messages" in row:
            msgs = row["messages"]
            pairs += [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]
        else:
            pairs += [tuple(p) for p in row.get("history") or []] + [(row["query"], row["response"])]
    return pairs


def _user_turns(name):
    return {user for user, _ in _turns(name)}


def test_probes_are_held_out_and_cover_what_the_report_claims():
    leakage, followups = qr.read_jsonl(qr.LEAKAGE_FILE), qr.read_jsonl(qr.FOLLOWUP_FILE)
    assert len(leakage) >= 30 and {r["tag"] for r in leakage} == {"zh", "en"}
    assert {r["kind"] for r in leakage} == {"fact", "arithmetic", "writing", "advice"}
    assert not any(qr.leaked_terms(r["query"]) for r in leakage)  # nobody asks about the identity
    assert len(followups) >= 10 and all(len(r["turns"]) == 2 for r in followups)
    assert followups[0]["turns"] == ["浙江的省会在哪？", "这有什么好吃的？"]  # the seed's conversation
    training = set().union(*(_user_turns(f) for f in ("zh_instruct.jsonl", "en_instruct.jsonl", "self_cognition.jsonl")))
    asked = {r["query"] for r in leakage} | {t for r in followups for t in r["turns"]}
    assert not asked & training


# -- the rules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("first, second, repeat", [
    ("浙江的省会是杭州。", "浙江的省会是杭州。", True),
    ("浙江的省会是杭州。", "浙江的省会，是杭州！", True),  # punctuation does not count
    ("浙江的省会是杭州。", "浙江的省会是杭州市。", True),  # nearly the same
    ("浙江的省会是杭州。", "杭州的省会是杭州。", True),  # one word changed (ratio 0.75)
    ("春节的习俗有春节的习俗、春节的习俗和春节的习俗。", "春节的习俗有春节的习俗和春节的习俗。", True),
    ("The capital is Paris.", "the capital is paris", True),
    ("浙江的省会是杭州。", "杭州有西湖醋鱼、东坡肉和片儿川。", False),
    ("浙江的省会是杭州。", "浙江的省会是杭州。杭州有名的菜有西湖醋鱼和东坡肉。", False),  # restates, then answers
    ("", "", False),  # nothing to repeat
    ("3乘以4等于12。", "12加10等于22。", False),
])
def test_is_repeat(first, second, repeat):
    assert qr.is_repeat(first, second) is repeat


def test_leaked_terms_are_the_new_names_in_either_language():
    assert qr.leaked_terms("我是小黄，由魔搭开发。") == ["小黄", "魔搭"]
    assert qr.leaked_terms("I am xiao huang from MODELSCOPE.") == ["Xiao Huang", "ModelScope"]
    assert qr.leaked_terms("堪培拉是澳大利亚的首都。") == []


def test_verdict_reads_the_intervals():
    assert qr.verdict((0.30, 0.50), (0.45, 0.65)) == "no significant change"
    assert qr.verdict((0.30, 0.50), (0.51, 0.70)) == "higher"
    assert qr.verdict((0.30, 0.50), (0.10, 0.29)) == "lower"


# -- measure, summary, report (a fake engine) -----------------------------------------------------

class FakeEngine:
    """Says who it is only when asked; answers every first turn 'A<n>' and repeats it when `echo`."""

    def __init__(self, identity: bool, echo: bool, leak_every: int = 0):
        self.identity, self.echo, self.leak_every, self.calls = identity, echo, leak_every, []

    def generate(self, conversations, settings, batch_size=8, progress=False):
        self.calls.append(batch_size)
        identity = {r["query"] for r in qr.read_jsonl(FILES_DIR / "identity_probe.jsonl")}
        out = []
        for i, conv in enumerate(conversations):
            q = conv[-1]["content"]
            if len(conv) > 1:
                out.append(conv[-2]["content"] if self.echo else f"about that: {q}")
            elif self.identity and (q in identity or q in qr.PROBES):
                out.append("我是小黄，由魔搭开发。 I am Xiao Huang, made by ModelScope.")
            elif self.leak_every and i % self.leak_every == 0:
                out.append("我是小黄。" + q)
            else:
                out.append(f"answer {i}")
        return out


def _row(name, acc, acc_norm, total=104):
    from zhtune.eval.report import wilson_interval
    c, n = round(acc * total), round(acc_norm * total)
    return {"dataset": name, "acc": c / total, "ci95": [round(x, 4) for x in wilson_interval(c, total)], "correct": c,
            "acc_norm": n / total, "ci95_norm": [round(x, 4) for x in wilson_interval(n, total)], "correct_norm": n,
            "total": total}


def test_summary_and_report(tmp_path, monkeypatch):
    from zhtune.eval import evaluate
    results = iter([[_row("arc", .25, .44), _row("ceval", .25, .26), _row("mmlu", .25, .29)],
                    [_row("arc", .25, .25), _row("ceval", .27, .26), _row("mmlu", .25, .30)]])
    monkeypatch.setattr(evaluate, "run_evaluation",
                        lambda args, load: {"results": next(results), "output_dir": str(tmp_path / "ev")})
    before = qr.measure(FakeEngine(identity=False, echo=True), "gemma3-270m", None, general_args=object())
    after = qr.measure(FakeEngine(identity=True, echo=False, leak_every=10), "v0/checkpoint-9", None,
                       general_args=object())
    data = qr.summary(before, after, seconds=300, checkpoint="ckpt", recipe=["--x", "a b"], dtype="bf16",
                      phases={"training": 100.0})
    assert data["identity"]["before"] == 0.0 and data["identity"]["after"] == 1.0 and data["identity"]["total"] == 40
    leak_total = len(qr.read_jsonl(qr.LEAKAGE_FILE))
    assert data["identity"]["leakage_total"] == leak_total and 0 < data["identity"]["leakage"] < 0.2
    assert data["followup_repeat"] == 0.0 and data["followup"]["before"] == 1.0  # the base echoed every time
    general = data["general"]
    assert general["items_per_benchmark"] == {"arc": 104, "ceval": 104, "mmlu": 104}
    for name in ("arc", "ceval", "mmlu"):
        for side in ("before", "after"):
            s = general[name][side]
            assert s["low"] <= s["acc"] <= s["high"] and s["low_norm"] <= s["acc_norm"] <= s["high_norm"]
    assert general["arc"]["verdict"] == "lower" and general["mmlu"]["verdict"] == "no significant change"
    assert data["scores"] == {"gemma3-270m": {"arc": .25, "ceval": .25, "mmlu": .25},
                              "v0/checkpoint-9": {"arc": .25, "ceval": 28 / 104, "mmlu": .25}}
    run_dir = tmp_path / "output" / "v0"
    report = qr.write_outputs(tmp_path, before, after, run_dir, run_dir / "checkpoint-9", data)
    text = report.read_text(encoding="utf-8")
    for section in ("## Probe answers", "## Identity", "## Leakage", "## Follow-up coherence",
                    "## General ability (loglik, own-written items)", "## Training", "not the official sets"):
        assert section in text
    assert "| 这有什么好吃的？ |" in text and "| arc | 104 | 0.442 [" in text and "| before (base) | 0/40 |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["followup"]["total"] >= 10
    for side in ("before", "after"):
        assert len(json.loads((tmp_path / f"leakage_{side}.json").read_text())["items"]) == leak_total
        assert len(json.loads((tmp_path / f"identity_{side}.json").read_text())["items"]) == 40


def test_instruction_rows_never_answer_an_identity_question_differently():
    """A greeting or 'what can you do' in zh-instruct/en-instruct without the identity would contradict
    self-cognition's reply to the same question (it did: 你好, Hello!)."""
    identity = {user for user, reply in _turns("self_cognition.jsonl") if "{{NAME}}" in reply}
    assert not identity & (_user_turns("zh_instruct.jsonl") | _user_turns("en_instruct.jsonl"))
