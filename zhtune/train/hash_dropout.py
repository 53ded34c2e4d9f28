"""LoRA dropout whose mask is a hash of each element's index: the same dropout, less work where compiled.

PEFT's `lora_dropout` is `nn.Dropout`: under torch.compile inductor draws each element's mask from Philox
(ten rounds of 32-bit multiplies for every element) and keeps the mask for the backward. Every LoRA input is
dropped out, the widest (down_proj's, [tokens, 14336] on Gemma-2-9B) twice where selective recomputation
redraws it in the backward.

`HashDropout` keeps dropout's meaning (each element zeroed with probability p, the rest scaled by
1 / (1 - p)) and draws the mask differently: two random 32-bit seeds per call (from torch's generator,
so `torch.manual_seed` and checkpoint recomputation repeat them; a compiled graph keeps the two), and for
element i the low 24 bits of `mix(i * (seed_0 | 1) + seed_1)`, where `mix` is a 32-bit integer hash
(lowbias32: two multiplies, three shift-xors). Inductor fuses that into the kernel that produces the input,
and may recompute a mask in the backward instead of keeping it. p is used to 24 bits (0.05 becomes
838861 / 2^24, 0.05000001). Element masks are not the Philox ones, so a run with it does not repeat one
without it bit for bit; their distribution is the same (tests/test_hash_dropout.py checks the rate, the
scale, that neighbouring elements, rows and calls do not correlate, and that recomputation repeats a mask).

Measured on an H200 (Gemma-2-9B config, the seed's LoRA, 8192-token rows, no layer checkpointed; benchmarks/
RESULTS.md, 2026-11-30, thirteenth session): 1.028x and 1.031x the tokens/s of the same step with nn.Dropout
in two runs (1.026x with a first, two-mix hash), and 2.5 GiB less at the peak (73.0 -> 70.5 GiB); with
dropout off the same step is 1.058x. Where the layers had first been compiled with another p (inductor
then takes p as a value, not a constant) the peak was 61.5 GiB: the backward recomputed the MLP's activation
([tokens, intermediate] per layer) that the constant-p graph kept. The cause was in train/recompute.py (two
checkpoints computing the same activation, merged by the compiler); changed after that measurement, the
compiled layer now keeps only gate and up with either dropout (61.5 GiB with hashed masks on the H200,
fourteenth session).

On by default where the decoder layers compile (`FastPath.hash_dropout`, a GPU); eager code keeps
`nn.Dropout` (the index tensor would be materialised there). `set_hash_dropout(model)` swaps every LoRA
dropout module of a PEFT model for one, `set_hash_dropout(model, False)` puts `nn.Dropout` back;
ZHTUNE_HASH_DROPOUT=0 in the environment keeps nn.Dropout in `zhtune sft`.
"""

import math

import torch

_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B - (1 << 32)  # lowbias32's multipliers, as int32 (multiplication wraps mod 2^32)
BITS = 24  # the mask compares 24 hashed bits with p * 2^24


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors (logical right shifts by masking the sign bits away)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX_1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MIX_2
    return x ^ ((x >> 16) & 0xFFFF)


def keep_mask(shape, seeds: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean mask of `shape`, True where an element is kept (probability 1 - p), from two int32 seeds."""
    index = torch.arange(math.prod(shape), device=seeds.device, dtype=torch.int32).view(shape)
    # an odd multiplier and an offset from the seeds (tensors: inductor would fold constant products into its
    # index arithmetic, which Triton then refuses as out of int32 range), then one mix: two calls' sequences
    # index * k + c do not overlap as shifted copies the way index + c would
    hashed = _mix(index * (seeds[0] | 1) + seeds[1])
    return (hashed & ((1 << BITS) - 1)) >= threshold(p)


def threshold(p: float) -> int:
    return round(p * (1 << BITS))


def draw_seeds(device) -> torch.Tensor:
    return torch.randint(-(1 << 31), (1 << 31) - 1, (2,), device=device, dtype=torch.int32)


def hash_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    if x.numel() >= 1 << 31:
        return torch.nn.functional.dropout(x, p, training)  # int32 indices would wrap
    keep = keep_mask(x.shape, draw_seeds(x.device), p)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


class HashDropout(torch.nn.Dropout):
    """`nn.Dropout` (same p, same place in the module tree) with hashed masks; `inplace` is kept as an
    attribute, but the output is always a new tensor (PEFT's LoRA dropout is not in place)."""

    def forward(self, x):
        return hash_dropout(x, self.p, self.training)


def set_hash_dropout(model, enabled: bool = True) -> int:
    """Swap every LoRA dropout of a PEFT model (`lora_dropout[adapter]`, an nn.Dropout) for a HashDropout
    of the same p (enabled), or back. Returns the number swapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None) if isinstance(module, BaseTunerLayer) else None
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for adapter, drop in drops.items():
            if enabled and type(drop) is torch.nn.Dropout:
                new = HashDropout(drop.p, drop.inplace)
            elif not enabled and type(drop) is HashDropout:
                new = torch.nn.Dropout(drop.p, drop.inplace)
            else:
                continue
            new.train(drop.training)
            drops[adapter] = new
            n += 1
    return n
