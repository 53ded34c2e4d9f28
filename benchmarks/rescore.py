"""Independent re-scorer of `zhtune eval` generate-mode per-item outputs.

Written from the specification only (zhtune/eval/README.md, "Answer extraction" and the per-item
row format), with the standard library alone: it imports nothing from zhtune, so it can check
zhtune's answer extraction item by item.

    python benchmarks/rescore.py FILE.jsonl [FILE.jsonl ...]

Per file: items, this scorer's accuracy, the stored accuracy (mean of `correct`), how many items'
extracted answers differ from the stored `extracted` (None vs a letter counts), and up to 10 of them.
Always exits 0: it is a report.

Readings of the README that are mine (it does not spell them out): a reply's last line may be cut
off by the token limit, so a prefix of a prompt line there is an echo (an option line needs text
after its label; a bare label "B." after an echoed option line is the next option, cut off); a reply
whose lines all repeat the prompt (beyond one lone option line) is "no answer". Letters are
stand-alone when no ASCII letter, digit or "_" touches them. The prompt is the item's last user turn.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from decimal import Decimal, InvalidOperation

# ---------------------------------------------------------------------------------------------
# step 0: NFKC and echo removal

_OPTION_LINE = re.compile(r"^\(?([A-Za-z0-9])[.．、:)）]")
MIN_PIECE = 20  # a reply line that is a piece of a prompt line this long (or longer) is an echo


def nfkc(text: str) -> str:
    """NFKC, then the README's extra character readings: ‘ ’ as ', − as -, 【】 as []."""
    text = unicodedata.normalize("NFKC", text or "")
    return text.translate(str.maketrans({"\u2018": "'", "\u2019": "'", "\u2212": "-", "【": "[", "】": "]"}))


def _squeeze(line: str) -> str:
    """A line as the README compares lines: stripped, runs of spaces read as one."""
    return " ".join(line.split())


def prompt_text(row: dict) -> str:
    """The text of the item's user turn (`messages`), else `prompt` without chat-template markup."""
    msgs = row.get("messages") or []
    users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if users and isinstance(users[-1], str):
        return users[-1]
    text = row.get("prompt") or ""
    return re.sub(r"<[^<>\n]{1,40}>", "\n", text)  # <bos>, <start_of_turn>, <|im_start|> ...


def _prompt_parts(prompt: str, labels) -> tuple[list[str], set[str]]:
    """(all prompt lines, option lines); lines are NFKC'd and stripped."""
    lines = [_squeeze(ln) for ln in nfkc(prompt).split("\n")]
    options = set()
    for ln in lines:
        m = _OPTION_LINE.match(ln)
        if m and labels and m.group(1) in labels:
            options.add(ln)
    return [ln for ln in lines if ln], options


def _echoes(line: str, target: str, last: bool = False) -> bool:
    """Does the reply line repeat the prompt line `target`?

    Whole, or as a piece of 20+ characters (README step 0). My reading, not spelled out there: the
    reply's last line may be cut off by the token limit, so there a proper prefix of the prompt line
    counts too (of an option line anywhere, as the README says): an option line needs text after its label ("A. 0 degr", not "B." or "B"), another
    line 5+ characters (so that a reply "A" is never a cut-off "An astronomer ..."). A bare label
    ("B.") ending a reply after an echoed option line is taken as the next option line, cut off.
    """
    if line == target or (len(line) >= MIN_PIECE and line in target):
        return True
    if not target.startswith(line):
        return False
    m = _OPTION_LINE.match(target)
    if m:  # README: an option line's beginning, cut short, is that option line (anywhere in the reply)
        return len(line) > m.end() and line[m.end():].strip() != ""
    return last and len(line) >= 5


def remove_echo(reply: str, prompt: str, labels=None) -> str:
    """NFKC the reply and drop the lines that repeat the prompt (README step 0).

    Option lines are dropped when the reply repeats two or more of them or any other prompt line (the
    question or the header above it); one option line on its own is kept as a choice. A reply whose every line repeats the prompt (and that
    repeats more than a single option line) gives "" ("no answer").
    """
    reply = nfkc(reply)
    plines, options = _prompt_parts(prompt, labels)
    others = [p for p in plines if p not in options]
    lines = reply.split("\n")
    last_i = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    kept: list[tuple[str, bool]] = []  # (line, is an option-line echo)
    opt_echoed: set[str] = set()
    other_echoed = False
    plain = False  # a non-empty line that repeats nothing
    for i, raw in enumerate(lines):
        ln = _squeeze(raw)
        if not ln:
            kept.append((raw, False))
            continue
        hit_opts = [o for o in options if _echoes(ln, o, i == last_i)]
        if not hit_opts and i == last_i and opt_echoed:
            # a bare label ("B", "B.") ending a reply that already repeated an option line: the
            # next option line, cut off by the token limit (my reading)
            m = re.fullmatch(r"\(?([A-Za-z0-9])[.．、:)）]?", ln)
            hit_opts = [o for o in options if m and _OPTION_LINE.match(o).group(1) == m.group(1)]
        if hit_opts:
            if i == last_i or ln in hit_opts:  # README: whole option lines (or the cut-off last line) count
                opt_echoed.update(hit_opts)
            kept.append((raw, True))
            continue
        hit = [p for p in others if _echoes(ln, p, i == last_i)]
        if hit:
            other_echoed = True
            continue  # an echoed prompt line (header, question, "Answer:")
        plain = True
        kept.append((raw, False))
    if not plain and other_echoed:
        return ""  # the reply only repeats the prompt
    drop_options = len(opt_echoed) >= 2 or other_echoed
    return "\n".join(raw for raw, is_opt in kept if not (is_opt and drop_options)).strip()


# ---------------------------------------------------------------------------------------------
# letters


def _lab(labels) -> str:
    return "(" + "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True)) + ")"


_NOT_ALNUM_BEFORE = r"(?<![A-Za-z0-9_])"  # README: no letter, digit or "_" touching a label
_NOT_ALNUM_AFTER = r"(?![A-Za-z0-9_])"
_SP = r"[^\S\n]"  # whitespace that is not a line break
_OPEN = r"(?:\*\*|[(\[（【\"'])?"

_PHRASES = [
    r"(?:正确)?答案(?:应该是|应当是|应是|应为|是|为)?",
    r"(?:故|应|应该)选(?:择)?",
    r"选择",
    r"(?:the\s+)?(?:correct\s+|right\s+|final\s+|best\s+)?answer(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?",
    r"(?:the\s+)?(?:correct|right|best|final)\s+(?:option|choice)(?:\s+(?:is|would\s+be|should\s+be))?",
]
_VERBS = r"(?:choose|chose|pick|picked|select|selected|go\s+with|opt\s+for|it['’]s|it\s+is)"


def _article(text: str, pos: int, letter: str) -> bool:
    """Is the "A" at pos the English article: starts a sentence, followed by a lower-case word?"""
    if letter != "A":
        return False
    if not re.match(_SP + r"+[a-z]", text[pos + 1:]):
        return False
    before = re.sub(r"[\s*#>\-\"'(\[]+$", "", text[:pos].split("\n")[-1])
    return before == "" or before[-1] in ".!?。！？"


def extract_letter(reply: str, prompt: str, labels) -> str | None:
    """The answer letter by rules 1-5, or None ("no answer")."""
    labels = list(labels)
    text = remove_echo(reply, prompt, labels)
    if not text:
        return None
    L = _lab(labels)
    letter = _NOT_ALNUM_BEFORE + L + _NOT_ALNUM_AFTER
    flags = re.IGNORECASE

    # 1. explicit answer phrase, on one line; the first (leftmost) wins
    best = None
    for ph in _PHRASES:
        pat = ph.replace(r"\s", _SP) + _SP + r"*[:：=]?" + _SP + r"*" + _OPEN + _SP + r"*" + letter
        for m in re.finditer(pat, text, flags):
            if m.group(1) not in labels:  # IGNORECASE also matched lower-case letters
                continue
            if best is None or m.start() < best[0]:
                best = (m.start(), m.group(1))
            break
    if best:
        return best[1]

    # 2. highlighted letter
    best = None
    for pat in (
        r"\*\*" + _SP + r"*[(\[]?" + L + r"[)\]]?(?:[.:、)][^*\n]*)?" + _SP + r"*\*\*",
        r"\\boxed\{" + _SP + r"*" + L + r"(?:[.:)][^}\n]*)?" + _SP + r"*\}",
    ):
        m = re.search(pat, text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), m.group(1))
    if best:
        return best[1]

    # 3. the reply starts with the letter
    m = re.match(r"(?:\*\*|[(\[（])?" + _SP + r"*" + L + _NOT_ALNUM_AFTER, text)
    if m and not _article(text, m.start(1), m.group(1)):
        return m.group(1)

    # 4. the letter after a verb of choosing
    pat = _VERBS + _SP + r"+(?:option" + _SP + r"+|choice" + _SP + r"+)?" + _OPEN + letter
    for m in re.finditer(pat.replace(r"\s", _SP), text, flags):
        if m.group(1) in labels:
            return m.group(1)

    # 5. the first stand-alone valid letter anywhere (skipping the article "A")
    for m in re.finditer(letter, text):
        if not _article(text, m.start(1), m.group(1)):
            return m.group(1)
    return None


# ---------------------------------------------------------------------------------------------
# numbers

_NUM = re.compile(r"(?<![\d.])(-?)\$?(\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(\.\d+)?")


def _numbers(text: str) -> list[tuple[int, Decimal]]:
    out = []
    for m in _NUM.finditer(text):
        sign = m.group(1)
        if sign:
            prev = text[: m.start()].rstrip()
            if prev and prev[-1].isdigit():  # "16-3-4", "16 - 4": a subtraction, not a sign
                sign = ""
        digits = m.group(2).replace(",", "") + (m.group(3) or "")
        try:
            out.append((m.start(), Decimal(sign + digits)))
        except InvalidOperation:
            pass
    return out


def parse_number(s) -> Decimal | None:
    if s is None:
        return None
    nums = _numbers(nfkc(str(s)).replace("$", ""))
    return nums[-1][1] if nums else None


def extract_number(reply: str, prompt: str) -> Decimal | None:
    text = remove_echo(reply, prompt)
    i = text.find("####")
    if i >= 0:  # 1. after the first ####
        nums = _numbers(text[i + 4:])
        if nums:
            return nums[0][1]
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:  # 2. inside the last \boxed{...}
        nums = _numbers(boxed[-1])
        if nums:
            return nums[-1][1]
    nums = _numbers(text)  # 3. the last number
    return nums[-1][1] if nums else None


def fmt_number(d: Decimal | None) -> str | None:
    if d is None:
        return None
    return format(d.normalize(), "f")  # plain digits at any size ("1E+30" -> "1000...0"; quantize overflows)


# ---------------------------------------------------------------------------------------------
# rows and files


def rescore_row(row: dict) -> dict:
    """{"extracted", "correct", "same_extraction"} for one per-item row."""
    prompt = prompt_text(row)
    choices = row.get("choices")
    stored = row.get("extracted")
    if choices:
        labels = list(choices)
        shown = row.get("labels") or {}
        orig = [str(shown.get(k, k)) for k in labels]
        got = extract_letter(row.get("output") or "", prompt, orig)
        if got is not None and orig != labels:
            got = labels[orig.index(got)]  # a numeric label read back as its letter
        correct = got is not None and got == row.get("gold")
        same = got == stored
    else:
        val = extract_number(row.get("output") or "", prompt)
        gold = parse_number(row.get("gold"))
        correct = val is not None and gold is not None and val == gold
        st = parse_number(stored)
        same = (val is None and stored is None) or (val is not None and st is not None and val == st)
        got = fmt_number(val)
    return {"extracted": got, "correct": bool(correct), "same_extraction": same}


def rescore_file(path: str, show: int = 10, out=None) -> dict:
    out = out or sys.stdout
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                if "output" in r:
                    rows.append(r)
    n = len(rows)
    mine = [rescore_row(r) for r in rows]
    diffs = [(r, m) for r, m in zip(rows, mine) if not m["same_extraction"]]
    acc = sum(m["correct"] for m in mine) / n if n else 0.0
    stored = sum(bool(r.get("correct")) for r in rows) / n if n else 0.0
    print(f"== {path}", file=out)
    print(f"items {n}  rescored accuracy {acc:.4f}  stored accuracy {stored:.4f}  "
          f"extraction differs on {len(diffs)}  (agree {n - len(diffs)}/{n})", file=out)
    for r, m in diffs[:show]:
        o = (r.get("output") or "")
        o = o[:200] + ("..." if len(o) > 200 else "")
        print(f"  [{r.get('index')}] {r.get('id')} gold={r.get('gold')!r} "
              f"stored={r.get('extracted')!r} rescored={m['extracted']!r}", file=out)
        print("     output: " + json.dumps(o, ensure_ascii=False), file=out)
    return {"items": n, "accuracy": acc, "stored_accuracy": stored, "differ": len(diffs),
            "diffs": diffs}


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip().split("\n\n")[1])
        return 0
    for p in paths:
        try:
            rescore_file(p)
        except (OSError, ValueError) as e:
            print(f"== {p}\n  cannot read: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
