"""What one Gemma-2-9B decoder layer keeps for the backward pass, per token, under each memory lever
(CPU, seconds): the plain layer (PEFT LoRA, seed settings, bf16 autocast, bf16 LoRA inputs), fused
LoRA-A (zhtune/train/fused_lora.py), selective recomputation (zhtune/train/recompute.py) and both.

    python benchmarks/activation_memory.py [--tokens 512] [--out FILE.json]

Counted: the distinct storages autograd saves (torch.autograd.graph.saved_tensors_hooks) during the
layer's forward, parameters left out. Attention is eager here (flex_attention has no CPU backward):
its [heads, T, T] probabilities are reported apart, since flex_attention on the GPU keeps only O(T)
(its output and log-sum-exp). Caveat: on the CPU dropout keeps its mask in the input's dtype (bf16),
on CUDA as bool, so the GPU saves a little less per LoRA dropout than counted here. The projection
to 8192 tokens x 42 layers is per-token bytes x tokens x layers, attention excluded.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gemma2_9b

import gemma2_9b  # noqa: E402
from zhtune.train.fast_path import set_lora_input_casting  # noqa: E402
from zhtune.train.fused_lora import fuse_lora_projections  # noqa: E402
from zhtune.train.recompute import set_selective_recomputation  # noqa: E402

GEMMA2_9B_ONE_LAYER = dict(gemma2_9b.ARCHITECTURE, **dict(gemma2_9b.CONFIG, vocab_size=1024, num_hidden_layers=1))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def build():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**GEMMA2_9B_ONE_LAYER), dtype=torch.bfloat16,
                                             attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "norm" in name and "lora" not in name:
            p.requires_grad_(True)
    set_lora_input_casting(model, False)
    return model.train()


def saved(model, tokens: int) -> dict:
    base = model.get_base_model().model
    layer = base.layers[0]
    x = torch.randn(1, tokens, layer.self_attn.q_proj.in_features, dtype=torch.bfloat16, requires_grad=True)
    emb = base.rotary_emb(x, torch.arange(tokens)[None])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # attention's if any view of the storage is [..., T, T]
            attn = t.dim() >= 3 and t.shape[-1] == t.shape[-2] == tokens
            storages[ptr] = (t.untyped_storage().nbytes(), attn or storages.get(ptr, (0, False))[1])
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, position_embeddings=emb, attention_mask=None)
    attention = sum(n for n, is_attn in storages.values() if is_attn)
    total = sum(n for n, _ in storages.values())
    return {"bytes_per_token": (total - attention) / tokens, "attention_bytes_per_token": attention / tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    plain = build()
    variants = {"plain": plain}
    variants["fused_lora"] = copy.deepcopy(plain)
    fuse_lora_projections(variants["fused_lora"])
    variants["selective"] = copy.deepcopy(plain)
    set_selective_recomputation(variants["selective"])
    variants["fused_selective"] = copy.deepcopy(variants["fused_lora"])
    set_selective_recomputation(variants["fused_selective"])
    results = {"tokens": args.tokens, "variants": {}}
    base = None
    for name, model in variants.items():
        r = saved(model, args.tokens)
        r["gib_8192_tokens_42_layers"] = r["bytes_per_token"] * 8192 * 42 / 2**30
        base = base or r["bytes_per_token"]
        r["vs_plain"] = r["bytes_per_token"] / base
        results["variants"][name] = r
        print(f"{name:16s} {r['bytes_per_token'] / 1024:7.1f} KiB/token/layer  ({r['vs_plain']:.0%} of plain; "
              f"{r['gib_8192_tokens_42_layers']:5.1f} GiB for 8192 tokens x 42 layers; eager attention "
              f"+{r['attention_bytes_per_token'] / 1024:.1f} KiB/token at {args.tokens} tokens)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
