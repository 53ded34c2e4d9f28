"""GPU probe: where the plain training path's nan comes from.

On the H200 (2026-11-29) the seed's LoRA on the embedded Gemma 3 270M (bf16, `--fast_path false`, batch 8)
had grad_norm nan from its first logged step on; the same command on a CPU trains with finite norms. This
runs the seed's first batches through the same model, LoRA and collator, one variant at a time
(attention sdpa / eager x padding left / right x gradient checkpointing on / off x the Trainer's optimizer
or torch's plain AdamW), a few AdamW steps each,
and prints per step the loss and gradient norm, and at the first non-finite value the first module (in
forward order) whose output was not finite and the parameters whose gradient was not.

    python3 scripts/gpu_probe_training_nan.py [--steps 6] [--device cuda]
"""

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: the repository's zhtune

from zhtune.args import SftArguments, parse_args
from zhtune.data import encode_rows, load_datasets
from zhtune.models.loader import load_model_and_tokenizer
from zhtune.models.resolve import resolve_from_args
from zhtune.templates import get_template
from zhtune.train.sft import _wrap_model
from zhtune.train.trainer import plain_collator

SEED_SFT = ["--model_type", "gemma3-270m", "--dataset", "self-cognition#200", "zh-instruct",
            "--model_name", "小黄", "Xiao Huang", "--model_author", "魔搭", "ModelScope",
            "--lora_target_modules", "EMBEDDING", "ALL", "lm_head", "--lora_modules_to_save", "LN",
            "--learning_rate", "1e-3", "--batch_size", "8", "--fast_path", "false"]


def batches(args, tokenizer, template, steps: int, padding_side: str):
    split = load_datasets(args.dataset, seed=args.dataset_seed, test_ratio=args.dataset_test_ratio,
                          model_name=args.model_name, model_author=args.model_author)
    items = encode_rows(split.train, template, args.max_length, args.truncation_strategy, 1).items
    order = list(range(len(items)))
    random.Random(args.seed).shuffle(order)
    tokenizer.padding_side = padding_side
    rows = [{"input_ids": items[i].input_ids, "labels": items[i].labels} for i in order]
    return [rows[k * args.batch_size:(k + 1) * args.batch_size] for k in range(steps)]


def first_non_finite_module(model, batch, device) -> str:
    found = []

    def hook(module, _inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        if not found and torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.isfinite().all():
            found.append(f"{module_names[module]} ({type(module).__name__})")

    module_names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in module_names]
    try:
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "none (forward finite: the nan is in the backward)"


def make_optimizer(model, args, kind: str):
    """plain: torch's AdamW (foreach) on every trainable parameter, weight decay on all. trainer: what
    `zhtune sft`'s Trainer builds (its default optimizer, adamw_torch_fused on a GPU, weight decay off for
    biases and norms)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kind == "plain":
        return torch.optim.AdamW([p for _, p in trainable], lr=args.learning_rate, weight_decay=args.weight_decay)
    from transformers import Trainer, TrainingArguments
    hf = TrainingArguments(output_dir="/tmp/nan_probe_args", learning_rate=args.learning_rate,
                           weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                           adam_epsilon=args.adam_epsilon, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(hf, model)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
    print(f"[probe] trainer optimizer: {cls.__name__} {kwargs}", flush=True)
    return cls(groups, **kwargs)


def run_variant(cli, attention: str, padding_side: str, checkpointing: bool, steps: int, device: str,
                optimizer_kind: str = "plain") -> None:
    args = parse_args(SftArguments, cli + ["--gradient_checkpointing", str(checkpointing).lower()])
    resolved = resolve_from_args(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(resolved, "bf16", device=device, attn_implementation=attention)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _wrap_model(args, resolved, model)
    model.train()
    collate = plain_collator(tokenizer, model)
    optimizer = make_optimizer(model, args, optimizer_kind)
    name = f"attention={attention} padding={padding_side} checkpointing={checkpointing} optimizer={optimizer_kind}"
    for step, rows in enumerate(batches(args, tokenizer, get_template(resolved.template, tokenizer), steps,
                                        padding_side), 1):
        batch = collate(rows)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        print(f"[probe] {name} step {step}: loss {float(loss):.4f} grad_norm {norm:.4g}", flush=True)
        if not (torch.isfinite(loss) and norm == norm and abs(norm) != float("inf")):
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            print(f"[probe]   first non-finite forward output: {first_non_finite_module(model, batch, device)}")
            print(f"[probe]   {len(bad)} parameters with non-finite gradients, first: {bad[:3]}", flush=True)
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del model, optimizer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="", help="run variants whose name contains this, e.g. 'sdpa'")
    options = parser.parse_args()
    start = time.time()
    for kind, attention, padding_side, checkpointing in itertools.product(
            ("trainer", "plain"), ("sdpa", "eager"), ("left", "right"), (True, False)):
        if options.only and options.only not in f"{attention} {padding_side} {checkpointing} {kind}":
            continue
        run_variant(SEED_SFT, attention, padding_side, checkpointing, options.steps, options.device, kind)
    print(f"[probe] done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
