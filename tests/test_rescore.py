"""benchmarks/rescore.py (the independent re-scorer) on hand-written rows."""

import importlib.util
import json
from decimal import Decimal
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "rescore.py"
_spec = importlib.util.spec_from_file_location("rescore", _PATH)
rescore = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rescore)

HEADER = "Pick the letter of the right option."
QUESTION = "Which city is the capital of the imaginary land of Zed?"
PROMPT = f"{HEADER}\n\n{QUESTION}\nA. Alpha town\nB. Paris\nC. Gamma city\nD. Delta port\nAnswer:"
CHOICES = {"A": "Alpha town", "B": "Paris", "C": "Gamma city", "D": "Delta port"}


def row(output, gold="B", extracted="B", prompt=PROMPT, choices=CHOICES):
    r = {"messages": [{"role": "user", "content": prompt}], "output": output, "gold": gold,
         "extracted": extracted, "correct": extracted == gold, "no_answer": extracted is None}
    if choices is not None:
        r["choices"] = choices
    return r


def letter(output):
    return rescore.extract_letter(output, PROMPT, list(CHOICES))


def test_letter_rules():
    assert letter("The answer is (B).") == "B"
    assert letter("答案：Ｃ") == "C"  # NFKC
    assert letter("I think **D** is right, the answer is B") == "B"  # rule 1 before rule 2
    assert letter("Hmm. **C. Gamma city**") == "C"
    assert letter("B because Paris") == "B"
    assert letter("A planet is not a city. I would choose D") == "D"  # article skipped, rule 4
    assert letter("vitamin B6 and ABCD and B12") is None
    assert letter("The answer is E") is None  # only the labels shown
    assert letter("B. Paris") == "B"  # one option line on its own is a choice


def test_echo_is_no_answer():
    assert letter(f"{HEADER}\n\n{QUESTION}\nA. Alpha town\nB. Paris") is None
    assert letter(f"{QUESTION}\nA. Alpha") is None  # question + cut-off option line
    assert letter(f"{HEADER}\nA. Alpha town\nB.") is None  # list cut off after a bare label
    assert letter(f"{HEADER}\nA. Alpha town") is None  # only repeats the prompt
    assert letter(f"{HEADER}\nAnswer: C") == "C"
    # the README's further readings, each seen on the full sets' real replies (2026-11-29, H200)
    assert letter(f"{QUESTION.replace(' ', '  ')}\nB. Paris") is None  # runs of spaces read as one: an echo
    curly = PROMPT.replace("imaginary", "Zed's imaginary")
    assert rescore.extract_letter(f"{QUESTION.replace('imaginary', 'Zed’s imaginary')}\nA. Alpha",
                                  curly, list(CHOICES)) is None  # ’ reads as '
    assert letter(f"{HEADER}\nA. Alpha\nB. Paris\nC. Gamma city") is None  # "A. Alpha": option A cut short
    assert letter("If B_1 and B_2 are bases") is None  # "_" touches the label


def test_numbers():
    q = "Question: Sam has 16 apples and gives away 3 and then 4. How many are left?\nAnswer:"
    num = lambda out: rescore.extract_number(out, q)  # noqa: E731
    assert num("16-3-4 = 9\n#### 9\nQuestion: next #### 5") == Decimal(9)
    assert num("so \\boxed{12} or \\boxed{$1,234.50}") == Decimal("1234.5")
    assert num("He pays 16-3-4") == Decimal(4)
    assert num("x = -4.") == Decimal(-4)
    assert num("no idea") is None
    assert num("prices 16.50,22.50,42.50 in all") == Decimal("42.5")  # a comma that groups no thousands
    assert rescore.fmt_number(Decimal("1E+40")) == "1" + "0" * 40  # plain digits at any size
    r = rescore.rescore_row(row("The answer is 9, then 1,000", gold="1000", extracted="1000",
                                prompt=q, choices=None))
    assert r == {"extracted": "1000", "correct": True, "same_extraction": True}


def test_file_report(tmp_path, capsys):
    f = tmp_path / "x.jsonl"
    rows = [row("The answer is B"), row("I choose C", extracted=None), row(f"{QUESTION}\nA. Alpha")]
    rows[2]["extracted"] = None
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert rescore.main([str(f)]) == 0
    out = capsys.readouterr().out
    assert "items 3" in out and "extraction differs on 1" in out and "stored=None rescored='C'" in out
