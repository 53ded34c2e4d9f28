"""End to end on the real embedded Gemma 3 270M, on a CPU: a shortened quickstart.

sft (a few steps of the quickstart recipe) -> the merged checkpoint -> the same measurements before and
after (probes, identity, leakage, follow-ups, loglik on a few own-written items) -> report.md, summary.json.
"""

import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quickstart_path_on_the_embedded_model(tmp_path):
    from zhtune.quickstart import run
    report = run(tmp_path, eval_limit=2, max_new_tokens=12,
                 sft_extra=["--max_steps", "3", "--dataset", "self-cognition#24", "zh-instruct#8"])
    text = report.read_text(encoding="utf-8")
    for section in ("## Probe answers", "## Identity", "## Leakage", "## Follow-up coherence",
                    "## General ability (loglik, own-written items)", "## Training"):
        assert section in text
    assert "这有什么好吃的？" in text and "what's your name?" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    base, tuned = list(summary["scores"])
    assert base == "gemma3-270m" and tuned.endswith("checkpoint-3")
    assert set(summary["scores"][tuned]) == {"arc", "ceval", "mmlu"}
    assert summary["identity"]["total"] == 40 and summary["identity"]["before"] == 0.0  # the base never says it
    assert 0 <= summary["identity"]["after"] <= 1 and 0 <= summary["identity"]["leakage"] <= 1
    assert 0 <= summary["followup_repeat"] <= 1 and summary["followup"]["total"] >= 10
    general = summary["general"]
    assert general["items_per_benchmark"] == {"arc": 2, "ceval": 2, "mmlu": 2}
    for name in ("arc", "ceval", "mmlu"):
        side = general[name]["before"]
        assert side["low"] <= side["acc"] <= side["high"] and general[name]["verdict"]
    assert "| before (base) | 0/40 |" in text
    for name in ("identity", "leakage", "followup"):
        assert (tmp_path / f"{name}_before.json").is_file() and (tmp_path / f"{name}_after.json").is_file()
    run_dir = next((tmp_path / "output" / "gemma3-270m").glob("v0-*"))
    assert (run_dir / "images" / "train_loss.png").is_file()
    assert (run_dir / "checkpoint-3-merged" / "model.safetensors").is_file()
    for side in ("before", "after"):
        outputs = next((tmp_path / "eval_outputs" / f"quickstart-{side}").iterdir())
        rows = [json.loads(l) for l in (outputs / "eval_result.jsonl").read_text().splitlines()]
        assert [r["dataset"] for r in rows] == ["arc", "ceval", "mmlu"] and {r["mode"] for r in rows} == {"loglik"}
