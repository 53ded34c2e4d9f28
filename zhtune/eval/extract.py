"""Reading the answer out of a generated reply: an option letter, or for GSM8K a number.

This docstring is the specification; zhtune/eval/README.md repeats it for users and
tests/test_eval_extract.py checks it on a table of real reply shapes.

Step 0, for every answer type: the text is NFKC-normalised (full-width "答案：Ｃ", "（B）" read as their
ASCII forms; also ‘ ’ as ', − as -, 【】 as []), then ECHOED PROMPT TEXT IS REMOVED (lines compared
stripped, runs of spaces as one) (`strip_echo`): a reply line that repeats a line of
the prompt (the question, a header, the "Answer:" line), or is a 20+ character piece of one (a
truncated echo, "Question: <the question>"), is dropped; option lines ("B. Paris", or the start of one
cut short by the token budget) are dropped when the reply repeats two or more of them or a non-option
line of the prompt (an echo of the option list), while a single option line on its own is kept (that
is how a model picks an option). A reply that repeats prompt lines and then stops inside the next one
(cut off by the token limit: "A. the frequen", a bare "D" after copied options, the question's first
words) has that last line counted as echo too. A reply that only repeats the prompt is therefore "no
answer", never a letter.

Letters (`extract_choice`): only the labels the prompt showed (A-D; A-C / A-E for ARC items with 3 or 5
options; with `--eval_prompt seed`, "1"-"4" for the ARC items labelled that way). A label counts only
when it stands alone: not glued to letters, digits or "_" on either side ("B12", "vitamin B6",
"ABCD", "Bob" never count). Answer phrases never match across a line break. The rules are tried in
order, the first rule that finds something wins, and inside a rule the FIRST match wins (what a base
model invents after answering, e.g. the next question, does not count):
  1. an explicit answer phrase on one line: "答案是 B", "答案：C", "正确答案为(C)", "The answer is (C).",
     "Answer: **D**", "the correct option is B", "选B" / "选择 B" / "选项B".
  2. a highlighted label: "**D**", "**D. Paris**", "\\boxed{D}".
  3. the reply (after step 0) starts with the label: "B", "B. Paris", "(C) because", "D）".
  4. the label after a verb of choosing, on one line: "I think it's A because…", "I would choose C".
  5. the first stand-alone label anywhere ("... so C fits best").
  In 3 and 5 an "A" that starts a sentence and is followed by a lower-case word ("A planet rotates…")
  is the English article, not an answer, and is skipped.

Numbers (`extract_number`), GSM8K:
  1. after the first "####" (GSM8K's own answer marker, which zhtune's few-shot examples teach; a base
     model that goes on to invent the next example is judged on its first answer).
  2. inside the last "\\boxed{...}".
  3. otherwise the LAST number in the reply: the seed's rule (llmuses' last-number extraction).
  A "-" is a minus sign only when it does not follow a number ("16-3-4" ends in 4, not -4;
  "x = -4" is -4). "$1,234.50" reads as 1234.5: currency signs and thousands separators are dropped,
  a trailing full stop is not a decimal point, a comma that groups no thousands separates numbers
  ("3,4,5" ends in 5), and numbers are compared by value (42 == 42.0).
  Unlike the zhtune of before, "The answer is N" / "Answer: N" are NOT read first: the seed reads
  the last number, and so does zhtune when no marker is given.

A reply where no rule finds anything gives None: the item counts as wrong and as "no answer".
"""

import re
import unicodedata
from decimal import Decimal

LETTERS = "ABCDEFGHIJ"

_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_SPACES = r"[ \t]*"  # never a line break: answer phrases stay on one line


def normalize(text: str | None) -> str:
    text = unicodedata.normalize("NFKC", text or "")
    for a, b in (("\u2212", "-"), ("【", "["), ("】", "]"), ("\u2019", "'"), ("\u2018", "'")):
        text = text.replace(a, b)
    return text


# -- step 0: echoed prompt text ----------------------------------------------------------------------

_OPTION_LINE = re.compile(r"^\(?[A-J1-9][.)]\s")
_MIN_PIECE = 20  # shorter prompt lines are only dropped when a reply line repeats them whole


def _key(line: str) -> str:
    return " ".join(line.split())


def strip_echo(reply: str | None, prompt: str | None) -> str:
    """The reply without the prompt text it repeats (see step 0 in the module docstring)."""
    text = normalize(reply)
    if not prompt:
        return text
    prompt_lines = {_key(line) for line in normalize(prompt).splitlines() if line.strip()}
    options = {line for line in prompt_lines if _OPTION_LINE.match(line)}
    others = prompt_lines - options
    long_others = sorted((line for line in others if len(line) >= _MIN_PIECE), key=len, reverse=True)
    lines = text.splitlines()
    echoed_options = {_key(line) for line in lines if _key(line) in options}
    echoed_other = any(_key(line) in others for line in lines)
    # A reply that already repeats prompt lines and stops (at its token limit) inside the next one: that
    # last line is part of the echo too ("A. the frequen", "注册会计师甲选择了A公司2017", a bare "D").
    last = max((i for i, line in enumerate(lines) if _key(line)), default=None)
    cut = None
    if last is not None and (echoed_options or echoed_other):
        key = _key(lines[last])
        if any(p != key and p.startswith(key) for p in prompt_lines) and \
                (len(key) >= 5 or (echoed_options and any(o.startswith(key) for o in options))):
            cut = last
            if _OPTION_LINE.match(key) or len(key) <= 2:
                echoed_options.add(key)
    option_echo = len(echoed_options) >= 2 or echoed_other  # the option list, or options after the question
    kept = []
    for i, line in enumerate(lines):
        key = _key(line)
        if not key:
            kept.append(line)
            continue
        if i == cut or key in others or (option_echo and any(o.startswith(key) for o in options) and len(key) > 2):
            continue
        if len(key) >= _MIN_PIECE and any(key in other for other in long_others):
            continue  # a truncated echo of a long line
        for other in long_others:  # "Question: <the question>" on one line with other text
            if other in key:
                key = key.replace(other, " ")
        kept.append(key if key != _key(line) else line)
    return "\n".join(kept).strip()


# -- letters -------------------------------------------------------------------------------------------

def _choice_rules(valid: str) -> list[tuple[str, bool]]:
    """(pattern, article check) pairs; group 1 is the label."""
    L = rf"(?<![A-Za-z0-9_])([{valid}])(?![A-Za-z0-9_])"
    s = _SPACES
    opener = rf"[\(\[]?{s}\**{s}"
    return [
        (rf"(?:正确答案|最终答案|答案){s}(?:应该|应当|应)?{s}(?:是|为|选)?{s}:?{s}{opener}{L}", False),
        (rf"(?i:answer){s}(?i:is|would be|should be|will be)?{s}(?i:option|choice)?{s}[:=]?{s}{opener}{L}", False),
        (rf"(?i:correct|right|best|final) (?i:option|choice){s}(?i:is|would be|should be|will be)?"
         rf"{s}[:=]?{s}{opener}{L}", False),
        (rf"(?:选择|选项|选){s}{opener}{L}", False),
        (rf"\\boxed\{{{s}\(?{L}", False),
        (rf"\*\*{s}[\(\[]?{L}", False),
        (rf"^\s*[\(\[]?{L}", True),
        (rf"\b(?i:it's|it is|is|choose|pick|select|go with)[ \t]+[\(\[]?{L}", False),
        (L, True),
    ]


def _is_article(text: str, start: int, end: int) -> bool:
    """'A planet…' at a sentence start: the article, not option A."""
    if text[start:end] != "A":
        return False
    before = text[:start].rstrip(" \t\"'*([")
    at_sentence_start = not before or before[-1] in ".!?\n:"
    return at_sentence_start and re.match(r"\s+[a-z]", text[end:]) is not None


def extract_choice(text: str | None, letters: str = "ABCD", prompt: str | None = None) -> str | None:
    """The option label a reply gives (one of `letters`), or None. `prompt`: the user turn the model
    saw, whose echo is removed first (see the module docstring for the rules)."""
    t = strip_echo(text, prompt)
    for pattern, check_article in _choice_rules(re.escape(letters)):
        for m in re.finditer(pattern, t):
            if check_article and _is_article(t, m.start(1), m.end(1)):
                continue
            return m.group(1)
    return None


# -- numbers -------------------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)")


def to_number(text: str | None) -> str | None:
    """'$1,234.50' -> '1234.5', '42.0' -> '42'; None when it is not a number."""
    if text is None:
        return None
    cleaned = normalize(text).strip().replace(",", "").replace("$", "").replace("¥", "").rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(cleaned):  # not "inf", "nan", "1e400": float() would take those
        return None
    value = Decimal(cleaned)  # exact at any length: a reply may hold a 400-digit number
    if value == value.to_integral_value():
        try:
            return str(int(value))
        except ValueError:  # past Python's int-to-str digit limit: the digits as written
            digits = cleaned.lstrip("-").split(".")[0].lstrip("0") or "0"
            return ("-" if cleaned.startswith("-") and digits != "0" else "") + digits
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    """Every number in the text, signed where a '-' is a minus sign (not after a number: '16-3-4')."""
    found = []
    # a comma that is not a thousands separator separates numbers: "16.50,22.50,42.50" ends in 42.50
    for m in re.finditer(rf"(?<![\d.])(-?){_SPACES}(?<![\d.])({_NUMBER})(?![\d])", text):
        sign = m.group(1)
        if sign and re.search(r"[\d)][ \t]*$", text[:m.start()]):
            sign = ""  # a subtraction
        found.append(sign + m.group(2))
    return found


def extract_number(text: str | None, prompt: str | None = None) -> str | None:
    """The final numeric answer of a worked solution, canonicalised by `to_number`, or None."""
    t = strip_echo(text, prompt)
    money = rf"[\$¥]?{_SPACES}"
    marker = re.search(rf"####{_SPACES}{money}(-?{_NUMBER})", t)
    if marker:
        return to_number(marker.group(1))
    boxed = re.findall(rf"\\boxed\{{{_SPACES}{money}(-?{_NUMBER})", t)
    if boxed:
        return to_number(boxed[-1])
    numbers = _numbers(t)
    return to_number(numbers[-1]) if numbers else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return abs(Decimal(a) - Decimal(b)) < Decimal("1e-6")
