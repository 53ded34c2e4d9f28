"""Do bf16 LoRA runs miss their first updates? PEFT's eager layers against LoRA-B folded into the frozen matmul
(zhtune/train/fold_lora.py), with fp32 as the reference (CPU, a few minutes).

    python benchmarks/lora_rounding_probe.py [--steps 8] [--out FILE.json]

The embedded Gemma 3 270M (real weights) with the seed's LoRA on every decoder linear (r=8, alpha=32, no
dropout; A drawn alike in every run, B from zero as PEFT starts it), AdamW (lr 1e-4, weight decay 0.1, as
`zhtune sft`), the same batch of Chinese chat-like text at every step; three runs: fp32 weights, bf16 weights
with bf16 autocast through PEFT's eager layers (the plain path, ZeRO-3 and FSDP), and the same with B folded.
PEFT adds B's small output to the rounded bf16 base output and rounds again, so an update smaller than half a
bf16 step of the output does not show (benchmarks/RESULTS.md, twelfth session); folded, the LoRA term is summed
in the matmul's fp32 accumulator. Reported: each run's per-step loss and its gap to fp32's.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zhtune.models.embedded import embedded_model_dir  # noqa: E402
from zhtune.train.fold_lora import fold_lora_b  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["请用三句话介绍一下长城的历史。长城始建于春秋战国时期，秦始皇统一六国后将各国长城连接起来。"
         "明朝对长城进行了大规模的修缮，我们今天看到的大部分长城都是明长城。",
         "你是谁？我是小黄，由魔搭创建的人工智能助手，可以回答问题、写作和翻译。",
         "把下面的句子翻译成英文：今天天气很好，我们去公园散步吧。Today the weather is nice, let's take a walk in "
         "the park.",
         "写一首关于秋天的短诗。秋风吹过金色的田野，落叶在空中轻轻飞舞，远山静静地等待第一场雪。"]


def lora_model(folder: Path, dtype, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    torch.manual_seed(seed)  # the same A in every run
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    return model.train()


def batch(folder: Path, length: int) -> torch.Tensor:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        rows.append((ids * (length // len(ids) + 1))[:length])
    return torch.tensor(rows)


def model_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def curve(model, ids, steps: int, autocast: bool, name: str, start: float, loss_of=model_loss) -> list[float]:
    """`steps` AdamW steps (lr 1e-4, weight decay 0.1, as `zhtune sft`) on `ids` (one batch, or a list: step i
    trains on batch i modulo its length); the loss of each, printed as it comes. `loss_of(model, ids)`: the loss
    to train (default: the model's own)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    losses = []
    device = (ids[0] if isinstance(ids, list) else ids).device.type
    for step in range(steps):
        context = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            loss = loss_of(model, ids[step % len(ids)] if isinstance(ids, list) else ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        print(f"[probe] {name}: step {step + 1}/{steps}, loss {losses[-1]:.5f} ({time.perf_counter() - start:.0f}s)",
              flush=True)
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="tokens per row (4 rows)")
    ap.add_argument("--seed", type=int, default=0, help="draws LoRA-A (the same in the three runs)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    folder = embedded_model_dir()
    ids = batch(folder, args.length)
    curves = {}
    for name, dtype, fold in (("fp32", torch.float32, False), ("bf16_peft", torch.bfloat16, False),
                              ("bf16_folded", torch.bfloat16, True)):
        model = lora_model(folder, dtype, args.seed)
        if fold:
            fold_lora_b(model)
        curves[name] = curve(model, ids, args.steps, dtype == torch.bfloat16, name, start)
    ref = curves["fp32"]
    gaps = {name: [a - b for a, b in zip(c, ref)] for name, c in curves.items() if name != "fp32"}
    for name, gap in gaps.items():
        print(f"[probe] {name} minus fp32, steps 1-{args.steps}: " + " ".join(f"{g:+.4f}" for g in gap)
              + f"; mean |gap| over steps 2-{args.steps} {sum(abs(g) for g in gap[1:]) / (len(gap) - 1):.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": "cpu", "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
                                              "seed": args.seed, "rows": len(ids), "length": args.length, "losses": curves,
                                              "gap_to_fp32": gaps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
