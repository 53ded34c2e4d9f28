"""`make quickstart` / `zhtune-quickstart`: the seed's Chinese-enhancement story, end to end, on the
embedded Gemma 3 270M and a CPU, with a before/after report of the fine-tune's trade-off.

1. the base model: the seed's probes, identity, leakage, follow-ups, general ability (loglik)
2. `zhtune sft` with SFT_RECIPE: a new identity inside a larger mix of Chinese (and some English)
   instruction rows, multi-turn conversations included
3. the merged checkpoint: the same measurements
4. report.md and summary.json (zhtune/eval/quickstart_report.py says what each number means)
"""

import sys
import time
from pathlib import Path

from zhtune.cli import main as zhtune
from zhtune.eval.quickstart_report import AUTHOR, GENERAL, NAME, measure, summary, write_outputs
from zhtune.log import logger

# The seed's recipe (LoRA on the embedding, every linear layer and lm_head; norms trained) scaled down to
# a CPU. The mix: 220 identity rows (the 167 of self-cognition, 53 of them twice) among 599, i.e. 37% of
# the rows and ~32% of the tokens (the seed: 2% of a large mix; the first quickstart: 78%), the rest
# zhtune's own Chinese and English instruction rows, 102 multi-turn conversations. Measured on 2026-11-29
# (README): with 143 identity rows among 522 the held-out identity fell to 65%. Two epochs at 1e-3 over
# rows packed to 512 tokens (2e-3: more leakage and repeated follow-ups).
SFT_RECIPE = ["--model_type", "gemma3-270m",
              "--dataset", "self-cognition#220", "zh-instruct", "en-instruct",
              "--model_name", *NAME, "--model_author", *AUTHOR,
              "--lora_target_modules", "EMBEDDING", "ALL", "lm_head", "--lora_modules_to_save", "LN",
              "--lora_rank", "16", "--lora_alpha", "32", "--learning_rate", "1e-3", "--num_train_epochs", "2",
              "--batch_size", "1", "--gradient_accumulation_steps", "1", "--max_length", "512",
              "--gradient_checkpointing", "false", "--fast_path", "true", "--logging_steps", "5",
              "--eval_steps", "1000", "--save_total_limit", "1", "--dataset_test_ratio", "0.01",
              "--identity_probe", "false"]  # the quickstart asks the probe itself, before and after alike


def cpu_dtype() -> str:
    """bf16 where the CPU multiplies it natively (AVX512-BF16 or AMX: measured 3.5x faster forward, 2x
    faster LoRA training than fp32 on a 2-core EPYC), else AUTO (fp32 on a CPU, bf16 on a GPU)."""
    import torch
    if torch.cuda.is_available():
        return "AUTO"
    try:
        return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "AUTO"
    except AttributeError:  # private helpers: gone in some torch version, fall back to the safe choice
        return "AUTO"


def run(out_dir: Path, eval_limit: int | None = None, sft_extra: list[str] = (), max_new_tokens: int = 48) -> Path:
    """The whole quickstart into out_dir; returns report.md. `eval_limit`: general items per benchmark
    (None: all); `sft_extra`: flags after the recipe's (they win); `max_new_tokens`: per reply."""
    from zhtune.args import EvalArguments, InferArguments
    from zhtune.eval import quickstart_items_dir
    from zhtune.infer.base import GenerationSettings
    from zhtune.infer.engine import load_engine
    from zhtune.models.resolve import resolve_model

    out_dir.mkdir(parents=True, exist_ok=True)
    started, phases = time.time(), {}
    dtype = cpu_dtype()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1)
    engine_args = InferArguments(merge_lora=True, infer_backend="pt", dtype=dtype)

    def general_args(name: str, ckpt: Path | None = None) -> EvalArguments:
        # the checkpoint alone (with --model_type too, eval would score the base model first again)
        return EvalArguments(model_type=None if ckpt else "gemma3-270m", ckpt_dir=[str(ckpt)] if ckpt else [],
                             merge_lora=True,
                             eval_dataset=list(GENERAL), eval_mode="loglik", eval_data_dir=str(quickstart_items_dir()),
                             eval_limit=None if eval_limit is None else str(eval_limit), dtype=dtype,
                             eval_output_dir=str(out_dir / "eval_outputs"), name=name, infer_backend="pt")

    logger.info(f"quickstart: 1/4 the base model ({dtype}): probes, identity, leakage, follow-ups, general ability")
    base = load_engine(resolve_model("gemma3-270m"), engine_args)
    before = measure(base, "gemma3-270m", settings, general_args("quickstart-before"))
    del base
    phases["base model"] = time.time() - started

    logger.info("quickstart: 2/4 fine-tuning (LoRA on embedding, all linear layers and lm_head; norms trained)")
    mark = time.time()
    recipe = [*SFT_RECIPE, "--dtype", dtype, *sft_extra]
    if zhtune(["sft", *recipe, "--output_dir", str(out_dir / "output")]) != 0:
        raise SystemExit("[quickstart] zhtune sft failed")
    run_dir = sorted((out_dir / "output" / "gemma3-270m").glob("v*-*"))[-1]
    ckpt = sorted(run_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))[-1]
    phases["training"] = time.time() - mark

    logger.info("quickstart: 3/4 the merged checkpoint: the same measurements")
    mark = time.time()
    tuned = load_engine(resolve_model(ckpt_dir=str(ckpt)), engine_args)
    after = measure(tuned, f"{run_dir.name}/{ckpt.name}", settings, general_args("quickstart-after", ckpt))
    del tuned
    phases["trained model"] = time.time() - mark

    logger.info("quickstart: 4/4 report")
    data = summary(before, after, seconds=time.time() - started, checkpoint=str(ckpt), recipe=recipe,
                   dtype=dtype, phases={k: round(v, 1) for k, v in phases.items()})
    report = write_outputs(out_dir, before, after, run_dir, ckpt, data)
    logger.info(f"quickstart: identity {data['identity']['after']:.0%}, leakage {data['identity']['leakage']:.0%}, "
                f"repeated follow-ups {data['followup_repeat']:.0%}, {data['seconds'] / 60:.1f} min; report: {report}")
    return report


def main() -> int:
    from zhtune.log import setup_logging
    setup_logging()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("quickstart_run")
    run(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
