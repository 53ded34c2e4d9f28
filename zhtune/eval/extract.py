"""Reading the answer out of a generated reply: an option letter, or for GSM8K a number.

The model is asked for a letter, but chat models answer in many shapes. The rules below are tried in
order and the first rule that finds something wins; inside a rule the FIRST match wins (a model that
keeps talking after answering, e.g. a base model inventing the next question, should not be judged on
what it made up afterwards). The text is NFKC-normalised first, so full-width letters, colons and
brackets ("答案：Ｃ", "（B）") read as their ASCII forms.

Letters (`extract_choice`), only the item's valid letters (A-D, or A-C / A-E for ARC items with 3 or
5 options), upper case:
  1. an explicit answer phrase: "答案是 B", "答案：C", "正确答案为(C)", "The answer is (C).",
     "Answer: **D**", "the correct option is B", "选B" / "选择 B" / "选项B".
  2. a highlighted letter: "**D**", "**D. Paris**", "\\boxed{D}".
  3. the reply starts with the letter: "B", "B. Paris", "(C) because", "D）".
  4. the letter after a verb of choosing: "I think it's A because…", "I would choose C".
  5. the first stand-alone valid letter anywhere ("... so C fits best").
  In 3 and 5 an "A" that starts a sentence and is followed by a lower-case word ("A planet rotates…")
  is the English article, not an answer, and is skipped.
Numbers (`extract_number`):
  1. after "####" (GSM8K's own answer marker, which few-shot examples teach).
  2. inside "\\boxed{...}".
  3. after an explicit answer phrase: "The answer is $18.", "答案是 18".
  4. otherwise the LAST number in the reply (the seed's rule).
  "$1,234.50" reads as 1234.5: currency signs and thousands separators are dropped, and numbers are
  compared by value (42 == 42.0).
A reply where no rule finds anything gives None: the item counts as wrong and as "no answer".
"""

import re
import unicodedata

LETTERS = "ABCDEFGHIJ"

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


def normalize(text: str | None) -> str:
    text = unicodedata.normalize("NFKC", text or "")
    for a, b in (("\u2212", "-"), ("【", "["), ("】", "]"), ("\u2019", "'"), ("\u2018", "'")):
        text = text.replace(a, b)
    return text


def _choice_rules(valid: str) -> list[tuple[str, bool]]:
    """(pattern, article check) pairs; group 1 is the letter."""
    L = f"([{valid}])(?![A-Za-z])"
    opener = r"[\(\[]?\s*\**\s*"
    return [
        (rf"(?:正确答案|最终答案|答案)\s*(?:应该|应当|应)?\s*(?:是|为|选)?\s*:?\s*{opener}{L}", False),
        (r"(?i:answer)\s*(?i:is|would be|should be|will be)?\s*(?i:option|choice)?"
         rf"\s*[:=]?\s*{opener}{L}", False),
        (r"(?i:correct|right|best|final)\s+(?i:option|choice)\s*(?i:is|would be|should be|will be)?"
         rf"\s*[:=]?\s*{opener}{L}", False),
        (rf"(?:选择|选项|选)\s*{opener}{L}", False),
        (rf"\\boxed\{{\s*\(?{L}", False),
        (rf"\*\*\s*[\(\[]?{L}", False),
        (rf"^\s*[\(\[]?{L}", True),
        (rf"\b(?i:it's|it is|is|choose|pick|select|go with)\s+[\(\[]?{L}", False),
        (rf"(?<![A-Za-z]){L}", True),
    ]


def _is_article(text: str, start: int, end: int) -> bool:
    """'A planet…' at a sentence start: the article, not option A."""
    if text[start:end] != "A":
        return False
    before = text[:start].rstrip(" \t\"'*([")
    at_sentence_start = not before or before[-1] in ".!?\n:"
    return at_sentence_start and re.match(r"\s+[a-z]", text[end:]) is not None


def extract_choice(text: str | None, letters: str = "ABCD") -> str | None:
    """The option letter a reply gives, or None (see the module docstring for the rules)."""
    t = normalize(text)
    for pattern, check_article in _choice_rules(letters):
        for m in re.finditer(pattern, t):
            if check_article and _is_article(t, m.start(1), m.end(1)):
                continue
            return m.group(1)
    return None


def to_number(text: str | None) -> str | None:
    """'$1,234.50' -> '1234.5', '42.0' -> '42'; None when it is not a number."""
    if text is None:
        return None
    cleaned = normalize(text).strip().replace(",", "").replace("$", "").replace("¥", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def extract_number(text: str | None) -> str | None:
    """The final numeric answer of a worked solution, canonicalised by `to_number`, or None."""
    t = normalize(text)
    money = r"[\$¥]?\s*"
    for pattern in (rf"####\s*{money}({_NUMBER})",
                    rf"\\boxed\{{\s*{money}({_NUMBER})",
                    rf"(?i:answer\s*(?:is|:)|答案\s*(?:是|为|:))\s*:?\s*\**\s*{money}({_NUMBER})"):
        m = re.search(pattern, t)
        if m:
            return to_number(m.group(1))
    numbers = re.findall(_NUMBER, t)
    return to_number(numbers[-1]) if numbers else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return abs(float(a) - float(b)) < 1e-6
