"""How far does `--fp8 true` move the loss of a real model? (CPU, a few minutes.)

    python benchmarks/fp8_loss_probe.py [--data alpaca_zh_demo.json] [--steps 3] [--device cuda] [--out FILE.json]

The GPU benchmarks (sft_speed.py --fp8_curve) train Gemma-2-9B's config with random weights, whose activations
have none of a trained model's outliers; there float8 stayed within 0.2% of bf16's loss. Here the embedded
Gemma 3 270M (real weights) in bf16, the seed's LoRA (r=8, alpha=32, no dropout; every decoder linear and the
lm_head; B drawn small so the LoRA path is live), zhtune's chunked softcapped loss as the fast path runs it,
a few AdamW steps (lr 1e-4), each on 4 new rows of Chinese text (until 2026-11-30's fifteenth session: the
same 4 rows every step), from the same weights in each run: bf16, float8 tensorwise, delayed (scales from
earlier steps' maxima; zhtune's default), tensorwise with the lm_head in float8 too (ZHTUNE_FP8_LM_HEAD=1), and
torchao's rowwise (when torchao is installed; `--runs` picks). torch's own float8 kernels run on the CPU: the numerics a GPU computes,
slowly. Reported: each run's losses and their relative gap to bf16's.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_rounding_probe import TEXTS, curve  # noqa: E402

from zhtune.models.embedded import embedded_model_dir  # noqa: E402
from zhtune.train.fp8 import apply_fp8  # noqa: E402
from zhtune.train.loss import chunked_causal_lm_loss  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RUNS = {"bf16": None, "fp8_tensorwise": dict(recipe="tensorwise"), "fp8_delayed": dict(recipe="delayed"),
        "fp8_tensorwise_head": dict(recipe="tensorwise", lm_head=True), "fp8_rowwise": dict(recipe="rowwise")}


def texts_of(data: str | None) -> list[str]:
    """The built-in Chinese texts, or a dataset file's rows (any format `zhtune sft --dataset` reads), each its
    messages joined."""
    if not data:
        return TEXTS
    from zhtune.data.loaders import load_local
    return ["\n".join(m["content"] for m in row["messages"]) for row in load_local(Path(data))]


def batches(folder: Path, texts: list[str], length: int, steps: int) -> list[torch.Tensor]:
    """One batch of 4 rows of `length` tokens per step, each the next tokens of the texts (repeated if too few):
    every step sees new rows, as in training (delayed scales come from earlier batches)."""
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(folder)("\n".join(texts))["input_ids"]
    need = steps * 4 * length
    return list(torch.tensor((ids * (need // len(ids) + 1))[:need]).reshape(steps, 4, length))


def lora_model(folder: Path, seed: int, dtype: torch.dtype = torch.bfloat16):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model.train()


def chunked_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The mean token loss as the fast path computes it (zhtune/train/loss.py: chunked, softcapped, fp32)."""
    inner = model.get_base_model()
    hidden = inner.model(input_ids=ids).last_hidden_state
    loss_sum, n = chunked_causal_lm_loss(hidden, inner.lm_head, ids,
                                         getattr(inner.config, "final_logit_softcapping", None), 1024)
    return loss_sum / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="alpaca-style .json / .jsonl to take the text from (default: a "
                    "few built-in Chinese texts)")
    ap.add_argument("--length", type=int, default=512, help="tokens per row (4 rows)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU's float8 kernels, in seconds")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the model's and the "
                    "reference's precision: bfloat16 (the measurement: weights and autocast as on the GPU), or "
                    "float32 (only to check the wiring quickly on a CPU without bf16 matmuls; the run named bf16 is then "
                    "the float32 reference)")
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs (bf16 always first): " + ", ".join(RUNS))
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    names = ["bf16", *(n for n in args.runs.split(",") if n and n != "bf16")]
    unknown = set(names) - set(RUNS)
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(sorted(unknown))}; known: {', '.join(RUNS)}")
    start = time.perf_counter()
    folder = embedded_model_dir()
    ids = [rows.to(args.device) for rows in batches(folder, texts_of(args.data), args.length, args.steps)]
    bf16 = args.dtype == "bfloat16"
    base = lora_model(folder, args.seed, torch.bfloat16 if bf16 else torch.float32).to(args.device)
    curves = {}
    for name in names:
        float8 = RUNS[name]
        model = copy.deepcopy(base)
        if float8 is not None:
            try:
                apply_fp8(model, **float8)
            except ImportError:
                print(f"[probe] {name}: skipped (torchao not installed)")
                continue
        curves[name] = curve(model, ids, args.steps, bf16, name, start, loss_of=chunked_loss)
    ref = curves["bf16"]
    gaps = {name: [(a - b) / b for a, b in zip(c, ref)] for name, c in curves.items() if name != "bf16"}
    for name, gap in gaps.items():
        print(f"[probe] {name} against bf16, steps 1-{args.steps}: " + " ".join(f"{g:+.2%}" for g in gap))
    if args.out:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        Path(args.out).write_text(json.dumps({"device": device, "date": time.strftime("%Y-%m-%d"),
                                              "data": Path(args.data).name if args.data else "built-in",
                                              "dtype": args.dtype, "rows_per_step": 4, "length": args.length, "steps": args.steps,
                                              "seed": args.seed, "losses": curves, "relative_gap_to_bf16": gaps},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
