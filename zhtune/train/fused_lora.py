"""Fused LoRA-A: one matmul for the LoRA A matrices of projections that read the same input.

q_proj, k_proj and v_proj of an attention block read the same hidden states, and so do gate_proj and
up_proj of a gated MLP. PEFT runs each projection's LoRA on its own: three (two) dropouts of the same
[tokens, hidden] input, three (two) thin matmuls with A (r columns each), and in the backward three
(two) [tokens, hidden] input gradients that autograd then sums. Here the first projection of a group
to run computes, for the whole group,

    a = dropout(x) @ cat(A_q, A_k, A_v)^T        # one dropout, one matmul with 3r columns

and each projection adds its own B: out_i = base_i(x) + B_i(a[..., slice_i]) * scaling_i (PEFT's
formula otherwise unchanged, PEFT's input casting included; `lora_output`, which folds B into the base
matmul where train/fold_lora.py has). The backward gives one input gradient
for the group. The LoRA weights stay where PEFT keeps them (same parameters, same state dict, same
saved adapter); only the forward of the projection modules is replaced, and `unfuse_lora_projections`
puts PEFT's back.

Exact: with dropout off the outputs and gradients equal PEFT's up to the order of floating-point
sums (tests/test_fused_lora.py). With dropout on, the group shares one dropout mask per input instead
of one per projection: each projection still sees dropout(p) of its input (the same distribution as
PEFT's), but the masks of q, k and v (gate and up) are the same draw. Memory: one dropout output and
one mask per group are kept for the backward instead of one per projection.

How the members share `a`: a `SharedSplit` (zhtune/models/parts.py) holds the input it was computed for
and which members have not used it yet; a member called with another tensor, or a second time,
recomputes it (so any call order is correct, only the fused saving needs the usual order). Anything PEFT does that this
does not (several active adapters, merged or disabled adapters, DoRA and other variants,
`adapter_names` batches) runs PEFT's own forward.
"""

import functools
import types

import torch
import torch.nn.functional as F

from zhtune.models.parts import SharedSplit

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_ATTR = "_zhtune_fused_lora"
FOLDED_ATTR = "_zhtune_folded_lora_b"  # set by train/fold_lora.py: LoRA-B folded into the frozen matmul


def _lora_a(members: list, x: torch.Tensor, adapter: str):
    """The group's LoRA-A outputs for input x, one per member; None when a member needs PEFT's path."""
    if not all(_plain(m, adapter) for m in members):
        return None
    first = members[0]
    weights = [m.lora_A[adapter].weight for m in members]
    xa = first._cast_input_dtype(x, weights[0].dtype)
    a = F.linear(first.lora_dropout[adapter](xa), torch.cat(weights, 0) if len(weights) > 1 else weights[0])
    return a.split([w.shape[0] for w in weights], dim=-1)


def single_plain_adapter(module) -> str | None:
    """The one active adapter of a plain PEFT LoRA Linear (no variant, not merged or disabled), else None."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    if type(module) is not LoraLinear or len(module.active_adapters) != 1:
        return None
    adapter = module.active_adapters[0]
    return adapter if _plain(module, adapter) else None


def lora_a_output(module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA-A of one projection: A(dropout(x)), x cast as PEFT casts it."""
    lora_a = module.lora_A[adapter]
    return lora_a(module.lora_dropout[adapter](module._cast_input_dtype(x, lora_a.weight.dtype)))


def _plain(module, adapter: str) -> bool:
    return (not module.disable_adapters and not module.merged and adapter in module.lora_A
            and adapter not in getattr(module, "lora_variant", {}))


def _fused_forward(self, x, *args, **kwargs):
    group, index = getattr(self, _ATTR)
    active = self.active_adapters
    if args or kwargs or len(active) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    adapter = active[0]
    a = group.take(index, x, adapter)
    if a is None:
        return type(self).forward(self, x, *args, **kwargs)
    return lora_output(self, adapter, x, a)


def lora_output(module, adapter: str, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The projection's output for input x and its LoRA-A output a: one matmul where LoRA-B is folded into
    the frozen one (train/fold_lora.py), else base(x) + B(a) * scaling."""
    fold = getattr(module, FOLDED_ATTR, None)
    if fold is not None and fold.adapter == adapter:
        return fold(x, a)
    return add_lora_b(module, adapter, module.base_layer(x), a)


def add_lora_b(module, adapter: str, result: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA output from the base output and the LoRA-A output `a`: result + B(a) * scaling, in
    the base output's dtype."""
    return (result + module.lora_B[adapter](a) * module.scaling[adapter]).to(result.dtype)


def _fusable(members: list) -> bool:
    """Same kind of PEFT LoRA Linear, same input, same adapters with the same dropout, no A bias."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    if len(members) < 2 or any(type(m) is not LoraLinear or getattr(m, "fan_in_fan_out", False) for m in members):
        return False
    first = members[0]
    if len({m.in_features for m in members}) != 1 or any(set(m.lora_A) != set(first.lora_A) for m in members):
        return False
    for adapter in first.lora_A:
        drops = [m.lora_dropout[adapter] for m in members]
        if len({(type(d), getattr(d, "p", None)) for d in drops}) != 1:
            return False
        weights = [m.lora_A[adapter].weight for m in members]
        if len({(w.dtype, w.device) for w in weights}) != 1 or any(m.lora_A[adapter].bias is not None
                                                                    for m in members):
            return False
    return True


def fuse_lora_projections(model, groups=GROUPS) -> int:
    """Fuse the LoRA-A of every group of sibling projections found in `model` (a PEFT model, maybe
    wrapped); returns the number of groups fused. Idempotent."""
    n = 0
    for parent in model.modules():
        for names in groups:
            members = [getattr(parent, name, None) for name in names]
            if any(m is None for m in members) or any(hasattr(m, _ATTR) for m in members):
                continue
            if not _fusable(members):
                continue
            group = SharedSplit(len(members), functools.partial(_lora_a, members))
            for i, m in enumerate(members):
                setattr(m, _ATTR, (group, i))
                m.forward = types.MethodType(_fused_forward, m)
            n += 1
    return n


def unfuse_lora_projections(model) -> int:
    """Give every fused projection PEFT's forward back; returns the number of modules restored."""
    n = 0
    for module in model.modules():
        if hasattr(module, _ATTR):
            delattr(module, _ATTR)
            if "forward" in module.__dict__:
                del module.forward
            n += 1
    return n
