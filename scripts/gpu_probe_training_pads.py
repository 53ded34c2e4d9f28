"""GPU probe (one-off, 2026-11-29): why the plain training path failed on the H200.
1. Gemma 3 (sdpa, bf16): NaN gradients with left-padded rows? (the embedded tokenizer pads left)
2. Gemma 2 (flex_attention, head_dim 256): transformers' flex path on a short padded batch (< 128 tokens)
   picks inductor's flex-decoding kernel and fails with NoValidChoicesError; padded to a multiple of 128?
Random tiny models from the real configs' shapes; prints one line per case."""
import sys
import time

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

torch.manual_seed(0)
dev = "cuda"


def batch(lengths, side, total=None):
    total = total or max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[i, sl] = torch.randint(3, 1000, (n,))
        mask[i, sl] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(dev), mask.to(dev), labels.to(dev)


def grad_state(model, ids, mask, labels):
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    bad = sum(int(not torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return float(loss), bad


g3 = Gemma3TextConfig(vocab_size=1024, hidden_size=640, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                      layer_types=["sliding_attention", "full_attention"])
g3._attn_implementation = "sdpa"
m3 = AutoModelForCausalLM.from_config(g3, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
for side in ("left", "right"):
    loss, bad = grad_state(m3, *batch([20, 41, 96, 33], side))
    print(f"[probe] gemma3 sdpa bf16 {side}-padded: loss {loss:.3f}, params with non-finite grads {bad}", flush=True)

g2 = Gemma2Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=256, sliding_window=4096)
m2 = AutoModelForCausalLM.from_config(g2, dtype=torch.bfloat16, attn_implementation="flex_attention").to(dev)
for total in (None, 128):
    start = time.time()
    try:
        loss, bad = grad_state(m2, *batch([20, 41, 96, 33], "right", total))
        print(f"[probe] gemma2 flex bf16 padded to {total or 96}: loss {loss:.3f}, non-finite {bad} "
              f"({time.time() - start:.0f}s)", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"[probe] gemma2 flex bf16 padded to {total or 96}: {type(e).__name__}: {str(e)[:200]}", flush=True)
sys.exit(0)
