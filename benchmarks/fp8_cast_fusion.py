"""GPU micro test (one H200, ~1 min): does inductor fuse a delayed-scale float8 cast with the amax that feeds the
next step's scale (one pass over the activation), against the dynamic cast (an amax pass, then a cast pass)?

    python benchmarks/fp8_cast_fusion.py

The activation is the GeGLU of Gemma-2-9B's MLP on 8192 tokens ([8192, 14336], gelu(gate) * up), cast to e4m3 for
down_proj's float8 matmul beside a bf16 copy for its LoRA. `delayed` takes the amax of the whole tensor (inductor
keeps it a separate reduction kernel: 2026-11-30, benchmarks/RESULTS.md), `delayed_rows` one per row then their
max (a row reduction, which inductor can fuse with the cast that reads the same rows).
"""
import time

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
FMAX = torch.finfo(E4M3).max
T, N = 8192, 14336
dev = "cuda"
g = torch.randn(T, N, device=dev, dtype=torch.bfloat16)
u = torch.randn(T, N, device=dev, dtype=torch.bfloat16)

def act_of(g, u):
    return F.gelu(g, approximate="tanh") * u

def dynamic(g, u):
    act = act_of(g, u)
    amax = act.abs().max().to(torch.float64)
    scale = (FMAX / torch.clamp(amax, min=1e-12)).to(torch.float32)
    act8 = (act.float() * scale).clamp(-FMAX, FMAX).to(E4M3)
    return act8, scale.reciprocal(), act * 1.05

def delayed_with(amax_of):
    """The delayed cast, recording the activation's amax as `amax_of` takes it."""
    def delayed(g, u, pending, recent):
        act = act_of(g, u)
        pending.copy_(torch.maximum(pending, amax_of(act).float()))
        scale = torch.where(recent > 0, FMAX / recent, torch.ones_like(recent))
        act8 = (act.float() * scale).clamp(-FMAX, FMAX).to(E4M3)
        return act8, scale.reciprocal(), act * 1.05
    return delayed

delayed = delayed_with(lambda act: act.abs().max())  # the whole tensor
delayed_rows = delayed_with(lambda act: act.abs().amax(dim=-1).max())  # per row, then over the rows


def bench(fn, *args, n=30):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3

def kernels(fn, *args):
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args); torch.cuda.synchronize()
    return [(e.key[:110], round(e.device_time_total / e.count, 1)) for e in prof.key_averages() if e.device_time_total > 0]

pending = torch.zeros((), device=dev); recent = torch.full((), 20.0, device=dev)
cd, cl = torch.compile(dynamic), torch.compile(delayed)
print("dynamic ms", round(bench(cd, g, u), 3), kernels(cd, g, u), flush=True)
print("delayed ms", round(bench(cl, g, u, pending, recent), 3), kernels(cl, g, u, pending, recent), flush=True)
cr = torch.compile(delayed_rows)
pending_rows = torch.zeros((), device=dev)
print("delayed_rows ms", round(bench(cr, g, u, pending_rows, recent), 3), kernels(cr, g, u, pending_rows, recent),
      flush=True)
a8, s, _ = cl(g, u, pending, recent)
ref = act_of(g, u).abs().max().float()
print("pending", pending.item(), "rows", pending_rows.item(), "true amax", ref.item(), flush=True)
