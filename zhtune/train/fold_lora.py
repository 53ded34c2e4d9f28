"""LoRA-B folded into the frozen projection's matmul: out = [x | a] @ [W | s·B]ᵀ, one matmul instead of two.

PEFT computes a LoRA projection as base(x) + B(a)·s with a = A(dropout(x)): two matmuls producing
[tokens, N] each (N the projection's output size), then their sum. In bf16 B's [tokens, N] output is
written and read again, the sum rounds the small LoRA term against the base output (early LoRA updates
are rounded away: benchmarks/RESULTS.md, twelfth session), and the backward reads the output gradient once
more for a's gradient. Folded, the frozen weight W [N, K] lives in a buffer [N, K + r] whose last r columns
hold s·B, and

    out = [x | a] @ buffer^T = x Wᵀ + s · a Bᵀ        (one matmul: the LoRA term summed in its accumulator)
    [dx | da] = dout @ buffer                          (one matmul for both input gradients)
    dB = s · doutᵀ a

The buffer's last columns are refreshed from B before every forward of the decoder (a forward pre-hook,
outside any compiled layer: B changes only at optimizer steps, and a recomputation in the backward sees the
forward's B). The base layer's weight becomes a view of the buffer's first K columns (same values, no
second copy; `unfold_lora_b` gives it its own storage back). The LoRA parameters are PEFT's, so the state
dict and the saved adapter do not change.

Where it applies: every plain single-adapter PEFT LoRA Linear of the decoder layers whose frozen base is a
bias-free `nn.Linear`; the fused LoRA-A groups (train/fused_lora.py) and the selective recomputation's MLP
(train/recompute.py) call `lora_output`, which uses the fold, and a checkpointed layer that keeps its MLP
output keeps the folded matmul's. Not with `--fp8` (the frozen matmul is float8 there: apply_fp8 leaves folded
projections alone).

Measured on the CPU (benchmarks/lora_rounding_probe.py: the embedded Gemma 3 270M, the seed's LoRA, 8 AdamW
steps from B = 0 in bf16): the loss stays within 0.0011-0.0021 of fp32's on average, against 0.018-0.023 through
PEFT's eager layers, which miss most of the first update. Not used by `zhtune sft`: on the H200 (Gemma-2-9B
config, benchmarks/sft_speed.py's `…_fold` variants, fifteenth session) it ran as fast as the unfolded fast path
(1.00x: the [N, K + r] matmul takes a slower cuBLAS tile than the [N, K] one, which eats what the LoRA-B
matmuls gave back), and the fast path's compiled layers already add the LoRA term in fp32.
"""

import types

import torch
import torch.nn.functional as F

from zhtune.models.parts import base_model, decoder_layers
from zhtune.train.fused_lora import FOLDED_ATTR, _plain, lora_a_output, single_plain_adapter

_HOOK, _FOLDS = "_zhtune_fold_refresh", "_zhtune_folds"  # on the decoder: the hook's handle, the folds


class _FoldedMatmul(torch.autograd.Function):
    """[x | a] @ bufferᵀ with buffer = [W | s·B]; gradients for x, a and B (W is frozen)."""

    @staticmethod
    def forward(ctx, x, a, buffer, lora_b, scaling):
        xa = torch.cat([x, a.to(x.dtype)], dim=-1)
        ctx.save_for_backward(a, buffer, lora_b)
        ctx.scaling, ctx.in_features, ctx.a_dtype = scaling, x.shape[-1], a.dtype
        return F.linear(xa, buffer.to(xa.dtype))

    @staticmethod
    def backward(ctx, grad):
        a, buffer, lora_b = ctx.saved_tensors
        grad_xa = grad @ buffer.to(grad.dtype)
        grad_x, grad_a = grad_xa[..., :ctx.in_features], grad_xa[..., ctx.in_features:]
        rows = grad.reshape(-1, grad.shape[-1])
        grad_b = (rows.t() @ a.reshape(-1, a.shape[-1]).to(grad.dtype)) * ctx.scaling
        return grad_x, grad_a.to(ctx.a_dtype), None, grad_b.to(lora_b.dtype), None


class _Fold:
    """One folded projection: its buffer [N, K + r], the adapter, and how to refresh s·B (a plain object: a
    Module attribute would register the projection as a submodule of itself)."""

    def __init__(self, module, adapter: str):
        weight = module.base_layer.weight
        n, k = weight.shape
        r = module.lora_B[adapter].weight.shape[1]
        self.module, self.adapter, self.in_features = module, adapter, k
        self.buffer = torch.empty(n, k + r, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.buffer[:, :k].copy_(weight)
        module.base_layer.weight = torch.nn.Parameter(self.buffer[:, :k], requires_grad=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        m = self.module
        self.buffer[:, self.in_features:].copy_(m.lora_B[self.adapter].weight * m.scaling[self.adapter])

    def __call__(self, x, a):
        m = self.module
        return _FoldedMatmul.apply(x, a, self.buffer, m.lora_B[self.adapter].weight, m.scaling[self.adapter])

    def unfold(self) -> None:
        base = self.module.base_layer
        base.weight = torch.nn.Parameter(self.buffer[:, :self.in_features].clone(), requires_grad=False)


def _folded_forward(self, x, *args, **kwargs):
    """PEFT's LoRA forward, folded (the projections no fused group or selective MLP calls: o_proj, and
    down_proj without selective recomputation)."""
    fold = getattr(self, FOLDED_ATTR)
    if args or kwargs or self.active_adapters != [fold.adapter] or not _plain(self, fold.adapter):
        return type(self).forward(self, x, *args, **kwargs)
    return fold(x, lora_a_output(self, fold.adapter, x))


def _foldable(module) -> str | None:
    """The adapter of a plain single-adapter PEFT LoRA Linear over a bias-free, frozen nn.Linear, else None."""
    adapter = None if hasattr(module, FOLDED_ATTR) else single_plain_adapter(module)
    base = getattr(module, "base_layer", None)
    if adapter is None or type(base) is not torch.nn.Linear or base.bias is not None or base.weight.requires_grad:
        return None
    return None if getattr(module, "fan_in_fan_out", False) else adapter


def fold_lora_b(model) -> int:
    """Fold LoRA-B into the frozen matmul of every foldable projection of `model`'s decoder layers (a PEFT
    model, maybe wrapped); returns how many. Idempotent."""
    folds = []
    for layer in decoder_layers(model) or []:
        for module in layer.modules():
            adapter = _foldable(module)
            if adapter is None:
                continue
            fold = _Fold(module, adapter)
            setattr(module, FOLDED_ATTR, fold)
            if "forward" not in module.__dict__:  # a fused group member keeps its forward: it calls lora_output
                module.forward = types.MethodType(_folded_forward, module)
            folds.append(fold)
    if folds:
        decoder = base_model(model).get_decoder()
        if not hasattr(decoder, _FOLDS):
            setattr(decoder, _FOLDS, [])
            setattr(decoder, _HOOK, decoder.register_forward_pre_hook(_refresh))
        getattr(decoder, _FOLDS).extend(folds)
    return len(folds)


def _refresh(decoder, _args) -> None:
    """The decoder's forward pre-hook: s·B into every folded buffer (stateless, so a deep copy of the model
    refreshes its own copies)."""
    for fold in getattr(decoder, _FOLDS, ()):
        fold.refresh()


def unfold_lora_b(model) -> int:
    """Undo `fold_lora_b`: each base weight gets its own storage back, PEFT's forward returns; returns how many."""
    n = 0
    for module in model.modules():
        fold = module.__dict__.get(FOLDED_ATTR)
        if fold is None:
            continue
        fold.unfold()
        delattr(module, FOLDED_ATTR)
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is _folded_forward:
            del module.forward
        n += 1
    decoder = base_model(model).get_decoder()
    if hasattr(decoder, _HOOK):
        getattr(decoder, _HOOK).remove()
        delattr(decoder, _HOOK)
        delattr(decoder, _FOLDS)
    return n
