"""End to end on the real embedded Gemma 3 270M, on a CPU: a shortened quickstart.

sft (a few steps of the quickstart recipe) -> infer from the merged checkpoint -> eval before/after
on the bundled sample items and the identity probe -> report.md.
"""

import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quickstart_path_on_the_embedded_model(tmp_path):
    from zhtune.quickstart import run
    report = run(tmp_path, eval_limit=2, max_new_tokens=12,
                 sft_extra=["--max_steps", "3", "--eval_steps", "3", "--dataset", "self-cognition#24", "zh-instruct#8"])
    text = report.read_text(encoding="utf-8")
    for section in ("## Probe answers", "## Benchmarks", "## Identity", "## Training loss"):
        assert section in text
    assert "这有什么好吃的？" in text and "what's your name?" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    base, tuned = list(summary["scores"])
    assert base == "gemma3-270m" and tuned.endswith("checkpoint-3")
    assert set(summary["scores"][tuned]) == {"arc", "ceval", "gsm8k", "mmlu"}
    assert summary["identity"]["total"] == 40 and summary["identity"]["before"] == 0.0  # the base never says it
    assert "| before (base) | 0/40 |" in text
    assert len(json.loads((tmp_path / "identity_before.json").read_text())["items"]) == 40
    run_dir = next((tmp_path / "output" / "gemma3-270m").glob("v0-*"))
    assert (run_dir / "images" / "train_loss.png").is_file()
    assert (run_dir / "checkpoint-3-merged" / "model.safetensors").is_file()
    probe = json.loads((run_dir / "identity_probe.json").read_text())
    assert probe["total"] == 40
    outputs = next((tmp_path / "eval_outputs" / "quickstart").iterdir())
    rows = [json.loads(l) for l in (outputs / "eval_result.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # 2 models x 4 datasets
