"""What LoRA dropout costs inside a compiled layer, and what hashed masks (zhtune/train/hash_dropout.py) save.

Two pieces of a Gemma-2-9B layer's training step, forward + backward through torch.compile, 8192 tokens, bf16:
  norm   RMSNorm of [tokens, 3584] (fp32 inside, as Gemma's), then LoRA-A (24 columns: q/k/v fused) of its
         dropped-out output; the normed output is also returned (the base projections read it)
  geglu  gelu_tanh(gate) * up over [tokens, 14336], then down_proj's LoRA-A (8 columns) of its dropped-out
         output; the activation is also returned (the base down projection reads it)
each with dropout: none, nn.functional.dropout (inductor's Philox), hash (zhtune's). Also checks that the hashed
mask is the same on the CPU, on the GPU eagerly and compiled, and its keep rate.

    python benchmarks/dropout_speed.py [--out results.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zhtune.train.hash_dropout import hash_dropout, keep_mask  # noqa: E402

P = 0.05
DROPS = {"none": lambda x: x, "philox": lambda x: F.dropout(x, P, True), "hash": lambda x: hash_dropout(x, P)}


def norm_piece(drop):
    def f(x, w, a):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).to(x.dtype)
        return y, drop(y) @ a.t()
    return f


def geglu_piece(drop):
    def f(gate, up, a):
        h = F.gelu(gate, approximate="tanh") * up
        return h, drop(h) @ a.t()
    return f


def time_piece(fn, inputs, grads, repeat: int) -> float:
    def step():
        outs = fn(*inputs)
        torch.autograd.backward(outs, grads)
        for t in inputs:
            t.grad = None
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 64
    dev, bf16, T = "cuda", torch.bfloat16, args.tokens
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "tokens": T, "p": P, "pieces": {}}

    seeds = torch.tensor([12345, -987654], dtype=torch.int32)
    cpu = keep_mask((64, 3584), seeds, P)
    gpu = keep_mask((64, 3584), seeds.to(dev), P)
    gpu_compiled = torch.compile(keep_mask)((64, 3584), seeds.to(dev), P)
    results["mask_same_cpu_gpu_compiled"] = bool(torch.equal(cpu, gpu.cpu()) and torch.equal(cpu, gpu_compiled.cpu()))
    big = torch.compile(keep_mask)((T, 14336), seeds.to(dev), P)
    results["keep_rate"] = float(big.float().mean())
    print(f"[dropout] mask CPU == GPU == compiled: {results['mask_same_cpu_gpu_compiled']}; keep rate over "
          f"[{T}, 14336]: {results['keep_rate']:.6f} (expected {1 - P})", flush=True)

    gen = torch.Generator(dev).manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=dev, dtype=bf16, generator=gen).requires_grad_(grad)

    pieces = {
        "norm": (norm_piece, lambda: [rand(T, 3584), rand(3584), rand(24, 3584)], lambda: [rand(T, 3584, grad=False),
                                                                                           rand(T, 24, grad=False)]),
        "geglu": (geglu_piece, lambda: [rand(T, 14336), rand(T, 14336), rand(8, 14336)],
                  lambda: [rand(T, 14336, grad=False), rand(T, 8, grad=False)]),
    }
    for piece, (make, inputs, grads) in pieces.items():
        row = {}
        x, g = inputs(), grads()
        for drop_name, drop in DROPS.items():
            fn = torch.compile(make(drop))
            ms = time_piece(fn, x, g, args.repeat)
            row[drop_name] = round(ms, 4)
            print(f"[dropout] {piece:6s} {drop_name:7s} {ms:7.3f} ms forward + backward", flush=True)
        row["philox_cost_ms"] = round(row["philox"] - row["none"], 4)
        row["hash_cost_ms"] = round(row["hash"] - row["none"], 4)
        results["pieces"][piece] = row
        print(f"[dropout] {piece}: dropout costs {row['philox_cost_ms']:.3f} ms with Philox, {row['hash_cost_ms']:.3f} "
              f"ms hashed (x42 layers: {42 * row['philox_cost_ms']:.0f} / {42 * row['hash_cost_ms']:.0f} ms a step)",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
