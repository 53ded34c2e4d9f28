"""`make quickstart` / `zhtune-quickstart`: the seed's Chinese-enhancement story, end to end, on the
embedded Gemma 3 270M and a CPU, with a before/after report.

1. the base model answers the seed's probe questions
2. `zhtune sft` with the seed's recipe, scaled down: self-cognition + a small Chinese instruction set
3. the merged checkpoint answers the same probes
4. `zhtune eval` before and after (bundled sample items, official formats) and the identity probe
5. report.md: answers side by side, the score table, the identity score, the loss curve
"""

import json
import os
import sys
import time
from pathlib import Path

from zhtune.cli import main as zhtune
from zhtune.files import write_json_atomic, write_text_atomic
from zhtune.log import logger

PROBES = ["你是谁？", "what's your name?", "你是谁研发的？"]
MULTI_TURN = ["浙江的省会在哪？", "这有什么好吃的？"]
NAME = ["小黄", "Xiao Huang"]
AUTHOR = ["魔搭", "ModelScope"]
# The seed's recipe scaled down to a CPU: the same LoRA targets and trained norms; a higher learning
# rate, short packed rows and three epochs (measured: 100% on the held-out identity probe, 4 min).
SFT_RECIPE = ["--model_type", "gemma3-270m", "--dataset", "self-cognition", "zh-instruct#40",
              "--model_name", *NAME, "--model_author", *AUTHOR,
              "--lora_target_modules", "EMBEDDING", "ALL", "lm_head", "--lora_modules_to_save", "LN",
              "--lora_rank", "16", "--lora_alpha", "32", "--learning_rate", "1e-3", "--num_train_epochs", "3",
              "--batch_size", "1", "--gradient_accumulation_steps", "1", "--max_length", "128",
              "--gradient_checkpointing", "false", "--fast_path", "true", "--logging_steps", "5",
              "--eval_steps", "45", "--save_total_limit", "2", "--dataset_test_ratio", "0.02"]


def ask_probes(engine, settings) -> list[tuple[str, str]]:
    """The seed's probes: three single questions, then one two-turn exchange."""
    answers = list(zip(PROBES, engine.generate([[{"role": "user", "content": q}] for q in PROBES], settings,
                                               batch_size=len(PROBES))))
    history: list[dict] = []
    for question in MULTI_TURN:
        history.append({"role": "user", "content": question})
        reply = engine.generate([history], settings, batch_size=1)[0]
        history.append({"role": "assistant", "content": reply})
        answers.append((question, reply))
    return answers


def run(out_dir: Path, eval_limit: int = 10, sft_extra: list[str] = (), max_new_tokens: int = 48) -> Path:
    from zhtune.eval.evaluate import run_evaluation
    from zhtune.eval import bundled_samples_dir
    from zhtune.eval.self_cognition import score_identity
    from zhtune.args import InferArguments
    from zhtune.infer.base import GenerationSettings
    from zhtune.infer.engine import load_engine
    from zhtune.models.resolve import resolve_model

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1)
    logger.info("quickstart: 1/4 the base model answers the probes")
    engine_args = InferArguments(merge_lora=True, infer_backend="pt")
    base = load_engine(resolve_model("gemma3-270m"), engine_args)
    before = ask_probes(base, settings)
    identity_before = score_identity(base, NAME, AUTHOR, settings, batch_size=20)
    write_json_atomic(out_dir / "identity_before.json", identity_before)
    del base

    logger.info("quickstart: 2/4 fine-tuning (LoRA on embedding, all linear layers and lm_head; norms trained)")
    if zhtune(["sft", *SFT_RECIPE, "--output_dir", str(out_dir / "output"), *sft_extra]) != 0:
        raise SystemExit("[quickstart] zhtune sft failed")
    run_dir = sorted((out_dir / "output" / "gemma3-270m").glob("v*-*"))[-1]
    ckpt = sorted(run_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))[-1]
    identity_after = json.loads((run_dir / "identity_probe.json").read_text(encoding="utf-8"))  # sft's own probe

    logger.info("quickstart: 3/4 the merged checkpoint answers the probes")
    after = ask_probes(load_engine(resolve_model(ckpt_dir=str(ckpt)), engine_args), settings)

    logger.info("quickstart: 4/4 evaluation before and after")
    from zhtune.args import EvalArguments
    eval_args = EvalArguments(model_type="gemma3-270m", ckpt_dir=[str(ckpt)], merge_lora=True,
                              eval_dataset=["arc", "ceval", "gsm8k", "mmlu"],
                              eval_limit=str(eval_limit), eval_data_dir=str(bundled_samples_dir()),
                              eval_output_dir=str(out_dir / "eval_outputs"), name="quickstart",
                              model_name=NAME, model_author=AUTHOR, max_new_tokens=max_new_tokens)
    evaluation = run_evaluation(eval_args)
    report = write_report(out_dir, run_dir, ckpt, before, after, evaluation, (identity_before, identity_after),
                          time.time() - started)
    logger.info(f"quickstart: report: {report}")
    return report


def write_report(out_dir, run_dir, ckpt, before, after, evaluation, identity, seconds) -> Path:
    scores = evaluation["scores"]
    models = list(scores)
    datasets = list(next(iter(scores.values())))
    lines = [f"# zhtune quickstart report ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Model: embedded Gemma 3 270M (base), trained on a CPU; run folder `{run_dir}`, "
             f"checkpoint `{ckpt.name}`; total time {seconds / 60:.1f} min.", "",
             "## Probe answers", "", "| question | before | after |", "|---|---|---|"]
    for (q, a), (_, b) in zip(before, after):
        lines.append(f"| {q} | {_cell(a)} | {_cell(b)} |")
    lines += ["", "(The last two questions are one conversation: the second refers to the first.)", "",
              "## Benchmarks (bundled sample items, accuracy)", "",
              "| dataset | " + " | ".join(models) + " | change |", "|---|" + "---|" * (len(models) + 1)]
    for d in datasets:
        values = [scores[m].get(d) for m in models]
        change = values[-1] - values[0] if None not in values else None
        lines.append(f"| {d} | " + " | ".join(_num(v) for v in values) + f" | {_num(change, sign=True)} |")
    lines += ["", "## Identity", "",
              f"The {identity[1]['total']} held-out identity questions (never in the training rows), answered "
              f"with both {'/'.join(NAME)} and {'/'.join(AUTHOR)} in the question's language:", "",
              "| | correct | score | zh | en |", "|---|---:|---:|---:|---:|"]
    for label, result in zip(("before (base)", "after (trained)"), identity):
        tags = result["by_tag"]
        lines.append(f"| {label} | {result['correct']}/{result['total']} | {_pct(result['score'])} | "
                     f"{_pct(tags.get('zh'))} | {_pct(tags.get('en'))} |")
    lines += ["", "Every answer: `identity_before.json` here, `identity_probe.json` in the run folder.",
              "", "## Training loss", "", "![train loss](" + os.path.relpath(run_dir / "images" / "train_loss.png", out_dir) + ")",
              "", f"Per-item evaluation outputs: `{evaluation['output_dir']}`.", ""]
    report = out_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    write_json_atomic(out_dir / "summary.json", {"scores": scores, "seconds": round(seconds, 1), "checkpoint": str(ckpt),
                                           "identity": {"before": identity[0]["score"], "after": identity[1]["score"],
                                                        "total": identity[1]["total"]}})
    return report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")[:300] or "(empty)"


def _num(v, sign=False) -> str:
    return "n/a" if v is None else (f"{v:+.4f}" if sign else f"{v:.4f}")


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}".replace(".0%", "%")


def main() -> int:
    from zhtune.log import setup_logging
    setup_logging()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("quickstart_run")
    run(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
