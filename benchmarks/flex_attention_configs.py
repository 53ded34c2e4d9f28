"""Which Triton configuration of flex_attention trains Gemma 2's attention fastest (issue 16).

The fast path's attention is flex_attention with Gemma 2's softcap (score_mod) and a document mask over packed
rows (BlockMask); inductor picks one kernel configuration per head dimension and GPU unless it autotunes
(`max_autotune`). Gemma-2-9B has head_dim 256, 16 query and 8 key/value heads. This script times the forward
and backward of one global (causal) layer's attention on the same packed rows as benchmarks/sft_speed.py
(8192-token rows of the alpaca_zh length mix plus long samples), bf16, under:
  default    inductor's own choice,
  autotune   `max_autotune` (inductor benchmarks its candidate list and prints the table, AUTOTUNE ...),
  each `--kernel_options` JSON given (flex_attention's kernel_options: BLOCK_M/BLOCK_N and num_warps/num_stages;
             fwd_ / bwd_ prefixes for one pass; BLOCK_M1/N1/M2/N2 for the backward),
and checks every output and gradient against the default's. Run on a GPU:

    python benchmarks/flex_attention_configs.py --kernel_options '{"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, ...}'
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma2_9b import CONFIG  # noqa: E402


def say(msg: str) -> None:
    print(msg, flush=True)


def doc_ids_of_rows(rows_wanted: int, seq: int, smoke: bool) -> list[torch.Tensor]:
    """Per packed row, the document index of each position (padding past the last document: its own doc)."""
    from sft_speed import make_samples, pack_encoded, split_row
    pool = make_samples(1000, seq, seed=0, scale=0.25 if smoke else 1.0, n_long=6 if smoke else 40)
    out = []
    for row in pack_encoded(pool, seq, seed=0)[:rows_wanted]:
        ids = torch.full((seq,), -1, dtype=torch.int32)
        pos = 0
        for i, doc in enumerate(split_row(row)):
            n = len(doc["input_ids"])
            ids[pos:pos + n] = i
            pos += n
        ids[pos:] = 10**6  # padding attends to itself only
        out.append(ids)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--heads", type=int, default=CONFIG["num_attention_heads"])
    ap.add_argument("--kv_heads", type=int, default=CONFIG["num_key_value_heads"])
    ap.add_argument("--head_dim", type=int, default=CONFIG["head_dim"])
    ap.add_argument("--softcap", type=float, default=CONFIG["attn_logit_softcapping"])
    ap.add_argument("--repeat", type=int, default=5, help="timed passes over the rows")
    ap.add_argument("--autotune", default="true", choices=["true", "false"])
    ap.add_argument("--kernel_options", action="append", default=[], help="a JSON dict; may be given again "
                    "(`{\"BACKEND\": \"FLASH\"}`: FlashAttention-4's CuTe DSL kernels, flash-attn-4 installed)")
    ap.add_argument("--block_kv", type=int, default=128, help="the BlockMask's key/value block (FLASH on sm90 with "
                    "head_dim 256 tiles keys by 64 and needs 64 here)")
    ap.add_argument("--window", type=int, default=0, help="a sliding window of this many keys (Gemma 2's local "
                    "layers: 4096); 0: a global layer")
    ap.add_argument("--smoke", action="store_true", help="on the CPU: builds the rows and the block mask only (flex_attention has no CPU backward, "
                    "so every configuration reports that error)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, hkv, d, cap = args.heads, args.kv_heads, args.head_dim, args.softcap
    docs = doc_ids_of_rows(args.rows, args.seq, args.smoke)
    say(f"[flex] {device} {torch.cuda.get_device_name() if device == 'cuda' else ''}, torch {torch.__version__}; "
        f"{len(docs)} rows of {args.seq}, heads {h}/{hkv}, head_dim {d}, softcap {cap}, mask blocks 128x{args.block_kv}"
        + (f", window {args.window}" if args.window else ", global"))

    ids = torch.stack(docs).to(device)  # one batch of all rows: one compiled graph, one block mask

    def same_doc_causal(b, hh, q, kv):
        keep = (q >= kv) & (ids[b, q] == ids[b, kv])
        return keep & (q - kv < args.window) if args.window else keep
    mask = create_block_mask(same_doc_causal, len(docs), None, args.seq, args.seq, device=device,
                             BLOCK_SIZE=(128, args.block_kv))
    flops = 0.0
    for row in docs:
        lengths = torch.bincount(row[row < 10**6].long()).double()
        m = lengths.clamp(max=args.window) if args.window else lengths  # keys per query: up to the window
        keys = m * (m + 1) / 2 + (lengths - m) * m
        flops += float(keys.sum()) * h * d * 2 * 2 * 3.5  # fwd 2 matmuls, bwd 2.5x
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = lambda heads: (len(docs), heads, args.seq, d)  # noqa: E731
    q0 = torch.randn(shape(h), generator=g).to(device, dtype)
    k0 = torch.randn(shape(hkv), generator=g).to(device, dtype)
    v0 = torch.randn(shape(hkv), generator=g).to(device, dtype)
    grad_out = torch.randn(shape(h), generator=g).to(device, dtype)

    def softcap(score, b, hh, q, kv):
        return torch.tanh(score / cap) * cap

    def make(options: dict | None, inductor: dict | None):
        def attn(q, k, v, block_mask):
            return flex_attention(q, k, v, score_mod=softcap, block_mask=block_mask, enable_gqa=True,
                                  scale=d ** -0.5, kernel_options=options)
        return torch.compile(attn, dynamic=False, options=inductor or {})

    def run(fn, mask):
        q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
        out = fn(q, k, v, mask)
        out.backward(grad_out)
        return out, q.grad, k.grad, v.grad

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    candidates = [("default", None, None)]
    if args.autotune == "true":
        candidates.append(("autotune", None, {"max_autotune": True, "max_autotune_gemm_backends": "ATEN"}))
    candidates += [(f"options {o}", json.loads(o), None) for o in args.kernel_options]
    results, ref = {}, None
    for name, options, inductor in candidates:
        torch._dynamo.reset()
        fn = make(options, inductor)
        start = time.perf_counter()
        say(f"[flex] {name}: compiling forward and backward ...")
        try:
            outs = run(fn, mask)
            sync()
        except Exception as e:  # noqa: BLE001 - a configuration that does not fit is a result too
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            say(f"[flex] {name}: failed: {results[name]['error']}")
            continue
        compile_s = time.perf_counter() - start
        sync()
        start = time.perf_counter()
        for _ in range(args.repeat):
            run(fn, mask)
        sync()
        seconds = (time.perf_counter() - start) / args.repeat / len(docs)
        if ref is None:
            ref = outs
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, ref))
        results[name] = {"ms_per_row": round(seconds * 1e3, 3), "tflops": round(flops / len(docs) / seconds / 1e12, 1),
                         "compile_s": round(compile_s, 1), "max_abs_diff_vs_default": diff,
                         "kernel_options": options, "inductor": inductor}
        say(f"[flex] {name}: {seconds * 1e3:.2f} ms per row (forward + backward, one layer), "
            f"{results[name]['tflops']} TFLOP/s, compiled in {compile_s:.0f}s, max |diff| vs default {diff:.2e}")
    base = results.get("default", {}).get("ms_per_row")
    for name, r in results.items():
        if base and "ms_per_row" in r:
            r["x_default"] = round(base / r["ms_per_row"], 3)
            say(f"[flex] {name:40s} {r['ms_per_row']:8.2f} ms  {r['x_default']:.2f}x default")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "block_kv": args.block_kv, "window": args.window, "seq": args.seq, "rows": len(docs), "heads": [h, hkv], "head_dim": d,
            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
