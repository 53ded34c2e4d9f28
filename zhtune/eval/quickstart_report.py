"""What the quickstart measures on one model (base or fine-tuned), and its report.

`measure(engine, ...)` asks, in one batched generation (plus one for second turns):
  - the seed's probes (你是谁？ / what's your name? / 你是谁研发的？), answers shown side by side;
  - identity: the 40 held-out identity questions (zhtune.eval.self_cognition: a reply counts when it
    holds both the name and the author in the question's language);
  - leakage: the held-out NON-identity prompts of data/files/leakage_probe.jsonl (zh and en: facts,
    arithmetic, writing, advice). A reply LEAKS when it contains any of the new names — 小黄, Xiao Huang,
    魔搭, ModelScope (case-insensitive) — although nobody asked who the model is;
  - follow-up coherence: the two-turn conversations of data/files/followup_probe.jsonl (the first is the
    seed's 浙江的省会在哪？ → 这有什么好吃的？). The second question is asked with the model's own first
    reply in the history; the conversation counts as a REPEAT when the second reply merely repeats the
    first: see `is_repeat`;
and scores general ability by `zhtune eval --eval_mode loglik` on zhtune's own ARC-, C-Eval- and
MMLU-style items (zhtune/eval/quickstart_items: written for zhtune, NOT the official sets).
Every share comes with its 95% Wilson interval (report.wilson_interval).

`verdict(before, after)`: "no significant change" when the two 95% intervals overlap, else "higher" or
"lower" (a conservative reading: intervals that overlap a little can still hide a real difference).
"""

import difflib
import os
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.data.registry import FILES_DIR
from zhtune.eval.report import wilson_interval
from zhtune.files import read_records, write_json_atomic, write_text_atomic

NAME = ["小黄", "Xiao Huang"]
AUTHOR = ["魔搭", "ModelScope"]
PROBES = ["你是谁？", "what's your name?", "你是谁研发的？"]
GENERAL = ["arc", "ceval", "mmlu"]
# acc_norm (option text, length-normalised) is the headline: the embedded base model gives every item
# the same letter, so its letter accuracy (acc) is exactly 0.25 on the balanced items whatever it knows.
METRIC = "acc_norm"
REPEAT_RATIO = 0.7  # flags 杭州的省会是杭州。 after 浙江的省会是杭州。 (ratio 0.75), as a reader would
LEAKAGE_FILE = FILES_DIR / "leakage_probe.jsonl"
FOLLOWUP_FILE = FILES_DIR / "followup_probe.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_records(path)]  # the project's one reader (clear errors per line)


def normalize(text: str) -> str:
    """NFKC, case-folded, without whitespace, punctuation or symbols: what `is_repeat` compares."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return "".join(c for c in text if unicodedata.category(c)[0] not in "PSZC")


def is_repeat(first: str, second: str, ratio: float = REPEAT_RATIO) -> bool:
    """The second reply merely repeats the first: after `normalize`, both are non-empty and equal, or
    difflib's similarity ratio 2*M/(len(a)+len(b)) (M: characters in matching blocks) is at least
    `ratio` (0.7: "杭州的省会是杭州。" after "浙江的省会是杭州。" is a repeat, at 0.75). An answer that
    restates the first and adds about as much new text stays below it."""
    a, b = normalize(first), normalize(second)
    if not a or not b:
        return False
    return a == b or difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= ratio


def leaked_terms(reply: str) -> list[str]:
    text = (reply or "").casefold()
    return [term for term in NAME + AUTHOR if term.casefold() in text]


def share(count: int, total: int) -> dict:
    low, high = wilson_interval(count, total)
    return {"share": count / total if total else 0.0, "count": count, "total": total,
            "low": round(low, 4), "high": round(high, 4)}


def verdict(before: tuple[float, float], after: tuple[float, float]) -> str:
    """From two (low, high) 95% intervals."""
    if after[0] > before[1]:
        return "higher"
    if after[1] < before[0]:
        return "lower"
    return "no significant change"


@dataclass
class Measurement:
    label: str
    probes: list[tuple[str, str]] = field(default_factory=list)
    identity: dict = field(default_factory=dict)
    leakage: dict = field(default_factory=dict)
    followup: dict = field(default_factory=dict)
    general: dict = field(default_factory=dict)  # benchmark -> eval_result row (loglik)
    general_dir: str = ""  # the loglik run's per-item outputs
    seconds: dict = field(default_factory=dict)


def measure(engine, label: str, settings, general_args=None) -> Measurement:
    """Everything above on one engine. `general_args`: the EvalArguments of the loglik run (None: skip)."""
    from zhtune.eval.self_cognition import SelfCognition, identity_result

    m, start = Measurement(label), time.time()
    bench = SelfCognition(NAME, AUTHOR)
    identity_items = bench.load()
    leakage = read_jsonl(LEAKAGE_FILE)
    followups = read_jsonl(FOLLOWUP_FILE)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    first = ([user(q) for q in PROBES] + [bench.conversation(it) for it in identity_items]
             + [user(row["query"]) for row in leakage] + [user(row["turns"][0]) for row in followups])
    replies = engine.generate(first, settings, batch_size=len(first))
    probe_replies, replies = replies[:len(PROBES)], replies[len(PROBES):]
    identity_replies, replies = replies[:len(identity_items)], replies[len(identity_items):]
    leakage_replies, first_replies = replies[:len(leakage)], replies[len(leakage):]
    second = [user(row["turns"][0]) + [{"role": "assistant", "content": reply}] + user(row["turns"][1])
              for row, reply in zip(followups, first_replies)]
    second_replies = engine.generate(second, settings, batch_size=len(second))
    m.seconds["generation"] = round(time.time() - start, 1)

    m.probes = list(zip(PROBES, probe_replies))
    seed = followups[0]["turns"]
    m.probes += [(seed[0], first_replies[0]), (seed[1], second_replies[0])]
    m.identity = identity_result(bench, identity_items, identity_replies)
    rows = [{**row, "response": reply, "leaked": leaked_terms(reply)} for row, reply in zip(leakage, leakage_replies)]
    m.leakage = {**share(sum(bool(r["leaked"]) for r in rows), len(rows)), "items": rows}
    rows = [{**row, "replies": [a, b], "repeat": is_repeat(a, b)}
            for row, a, b in zip(followups, first_replies, second_replies)]
    m.followup = {**share(sum(r["repeat"] for r in rows), len(rows)), "items": rows}

    if general_args is not None:
        from zhtune.eval.evaluate import run_evaluation
        start = time.time()
        result = run_evaluation(general_args, load=lambda resolved, args: engine)
        m.general = {row["dataset"]: row for row in result["results"]}
        m.general_dir = result["output_dir"]
        m.seconds["general"] = round(time.time() - start, 1)
    return m


# -- summary and report ------------------------------------------------------------------------------

def general_summary(before: Measurement, after: Measurement) -> dict:
    out = {"mode": "loglik", "metric": METRIC, "items": "zhtune/eval/quickstart_items (written for zhtune, "
           "NOT the official sets)", "items_per_benchmark": {}}
    for name in GENERAL:
        if name not in before.general or name not in after.general:
            continue
        sides = {label: _side(m.general[name]) for label, m in (("before", before), ("after", after))}
        out["items_per_benchmark"][name] = sides["after"]["total"]
        out[name] = {**sides,
                     "verdict": verdict(*[(s["low_norm"], s["high_norm"]) for s in sides.values()]),
                     "verdict_acc": verdict(*[(s["low"], s["high"]) for s in sides.values()])}
    return out


def _side(row: dict) -> dict:
    return {"acc": row["acc"], "low": row["ci95"][0], "high": row["ci95"][1], "correct": row["correct"],
            "acc_norm": row["acc_norm"], "low_norm": row["ci95_norm"][0], "high_norm": row["ci95_norm"][1],
            "correct_norm": row["correct_norm"], "total": row["total"]}


def summary(before: Measurement, after: Measurement, *, seconds: float, checkpoint: str, recipe: list[str],
            dtype: str, phases: dict) -> dict:
    general = general_summary(before, after)
    scores = {m.label: {name: m.general[name]["acc"] for name in GENERAL if name in m.general}
              for m in (before, after)}
    return {
        "scores": scores, "seconds": round(seconds, 1), "checkpoint": checkpoint,
        "identity": {"before": before.identity["score"], "after": after.identity["score"],
                     "total": after.identity["total"],
                     "leakage": after.leakage["share"], "leakage_before": before.leakage["share"],
                     "leakage_count": after.leakage["count"], "leakage_total": after.leakage["total"]},
        "followup_repeat": after.followup["share"],
        "followup": {"before": before.followup["share"], "after": after.followup["share"],
                     "count": after.followup["count"], "total": after.followup["total"],
                     "rule": f"normalized equal, or difflib ratio >= {REPEAT_RATIO}"},
        "general": general, "dtype": dtype, "recipe": recipe, "phases": phases,
        "measure_seconds": {"before": before.seconds, "after": after.seconds},
    }


def write_outputs(out_dir: Path, before: Measurement, after: Measurement, run_dir: Path, ckpt: Path,
                  data: dict) -> Path:
    for m, side in ((before, "before"), (after, "after")):
        write_json_atomic(out_dir / f"identity_{side}.json", m.identity)
        write_json_atomic(out_dir / f"leakage_{side}.json", m.leakage)
        write_json_atomic(out_dir / f"followup_{side}.json", m.followup)
    write_json_atomic(out_dir / "summary.json", data)
    report = out_dir / "report.md"
    write_text_atomic(report, render(out_dir, before, after, run_dir, ckpt, data))
    return report


def render(out_dir, before: Measurement, after: Measurement, run_dir, ckpt, data: dict) -> str:
    ident, fol, gen = data["identity"], data["followup"], data["general"]
    lines = [f"# zhtune quickstart report ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Model: embedded Gemma 3 270M (base), LoRA-trained on the CPU in {data['dtype']}; run folder "
             f"`{run_dir}`, checkpoint `{ckpt.name}`; total time {data['seconds'] / 60:.1f} min "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in data['phases'].items())}).", "",
             "| | before (base) | after (trained) |", "|---|---|---|",
             f"| identity, {ident['total']} held-out questions | {_pct(ident['before'])} | {_pct(ident['after'])} |",
             f"| leakage: names it unasked, {ident['leakage_total']} non-identity prompts | "
             f"{_share(before.leakage)} | {_share(after.leakage)} |",
             f"| follow-up repeats its first answer, {fol['total']} two-turn conversations | "
             f"{_share(before.followup)} | {_share(after.followup)} |"]
    for name in GENERAL:
        if name in gen:
            b, a = gen[name]["before"], gen[name]["after"]
            lines.append(f"| {name} (loglik {METRIC}, {a['total']} own-written items) | {_ci(b, '_norm')} | "
                         f"{_ci(a, '_norm')} — {gen[name]['verdict']} |")
    lines += ["", "Shares are given with their 95% Wilson interval; a verdict says \"no significant change\" "
              "when the before and after intervals overlap.", "",
              "## Probe answers", "", "| question | before | after |", "|---|---|---|"]
    for (q, x), (_, y) in zip(before.probes, after.probes):
        lines.append(f"| {q} | {_cell(x)} | {_cell(y)} |")
    lines += ["", "(The last two questions are one conversation: the second refers to the first.)", "",
              "## Identity", "",
              f"The {ident['total']} held-out identity questions (never in the training rows); a reply counts "
              f"when it names both {'/'.join(NAME)} and {'/'.join(AUTHOR)} in the question's language:", "",
              "| | correct | score | zh | en |", "|---|---:|---:|---:|---:|"]
    for label, result in (("before (base)", before.identity), ("after (trained)", after.identity)):
        tags = result["by_tag"]
        lines.append(f"| {label} | {result['correct']}/{result['total']} | {_pct(result['score'])} | "
                     f"{_pct(tags.get('zh'))} | {_pct(tags.get('en'))} |")
    lines += ["", "## Leakage", "",
              f"{after.leakage['total']} held-out prompts that do not ask who the model is (zh and en: facts, "
              f"arithmetic, writing, advice; `zhtune/data/files/leakage_probe.jsonl`). A reply leaks when it "
              f"contains {', '.join(NAME + AUTHOR)} (case-insensitive). Before: {_share(before.leakage)}; "
              f"after: {_share(after.leakage)}."]
    leaked = [r for r in after.leakage["items"] if r["leaked"]]
    if leaked:
        lines += ["", "| prompt | reply after training |", "|---|---|"]
        lines += [f"| {r['query']} | {_cell(r['response'])} |" for r in leaked]
    lines += ["", "## Follow-up coherence", "",
              f"{after.followup['total']} held-out two-turn conversations (`zhtune/data/files/followup_probe.jsonl`); "
              f"the second question is asked after the model's own first reply. A conversation REPEATS when "
              f"the second reply, with whitespace, punctuation and symbols removed and case folded, equals the "
              f"first or has a difflib similarity ratio of at least {REPEAT_RATIO}. Before: "
              f"{_share(before.followup)}; after: {_share(after.followup)}.", "",
              "| first question | first reply | second question | second reply | repeat |", "|---|---|---|---|---|"]
    for r in after.followup["items"]:
        (q1, q2), (a1, a2) = r["turns"], r["replies"]
        lines.append(f"| {q1} | {_cell(a1)} | {q2} | {_cell(a2)} | {'yes' if r['repeat'] else 'no'} |")
    lines += ["", "## General ability (loglik, own-written items)", "",
              "`zhtune eval --eval_mode loglik` on `zhtune/eval/quickstart_items`: ARC-, C-Eval- and MMLU-style "
              "questions written for zhtune, **not the official sets** (scores are not comparable with published "
              "ones; `--eval_data_dir` reads the official files). acc_norm: the option text's log-likelihood per "
              "byte; acc: the option letter's. The base model gives every item the same letter, so its acc is "
              "exactly 0.25 (the letters are balanced); the verdict reads acc_norm.", "",
              "| benchmark | items | acc_norm before | acc_norm after | verdict | acc before | acc after | verdict (acc) |",
              "|---|---:|---|---|---|---|---|---|"]
    for name in GENERAL:
        if name in gen:
            g = gen[name]
            lines.append(f"| {name} | {g['after']['total']} | {_ci(g['before'], '_norm')} | {_ci(g['after'], '_norm')} | "
                         f"{g['verdict']} | {_ci(g['before'])} | {_ci(g['after'])} | {g['verdict_acc']} |")
    if after.general_dir:
        lines += ["", f"Per-item outputs: `{before.general_dir}` and `{after.general_dir}`."]
    lines += ["", "## Training", "", "`zhtune sft " + " ".join(_quote(a) for a in data["recipe"]) + "`", "",
              "![train loss](" + os.path.relpath(run_dir / "images" / "train_loss.png", out_dir) + ")", "",
              "Every reply: `identity_*.json`, `leakage_*.json`, `followup_*.json` here.", ""]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    return f"'{arg}'" if " " in arg else arg


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", "<br>")[:300] or "(empty)"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}".replace(".0%", "%")


def _share(s: dict) -> str:
    return f"{s['count']}/{s['total']} = {_pct(s['share'])} [{s['low']:.2f}–{s['high']:.2f}]"


def _ci(side: dict, suffix: str = "") -> str:
    return f"{side['acc' + suffix]:.3f} [{side['low' + suffix]:.2f}–{side['high' + suffix]:.2f}]"
