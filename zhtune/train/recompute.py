"""Selective recomputation: inside the decoder layers that are not checkpointed whole, recompute only
the cheap, memory-heavy parts in the backward pass instead of keeping their activations.

What a decoder layer keeps for the backward is dominated by a few elementwise pieces: every Gemma
RMSNorm computes in fp32 and keeps two fp32 copies of its [tokens, hidden] input (4 norms per
Gemma 2 layer: about a third of the layer's activations), and the gated MLP keeps act(gate) beside
gate and up, and the LoRA of down_proj keeps its dropped-out [tokens, intermediate] input and mask.
Recomputing those costs a few memory-bound elementwise kernels; recomputing a whole layer (gradient
checkpointing) costs its whole forward, matmuls included.

`set_selective_recomputation(model)` wraps, in every decoder layer, each *RMSNorm module in a
non-reentrant `torch.utils.checkpoint`, and the MLP's `act_fn(gate) * up` together with down_proj's LoRA-A
(dropout and the thin A matmul) in another, from gate and up (the big matmuls stay outside: their
outputs are kept as before; down_proj's frozen base weight keeps nothing of its input). A layer that is checkpointed whole at the time of the call
(`layer.gradient_checkpointing`, see fast_path.set_checkpointed_layers) runs unchanged, so the two
combine: checkpoint some layers whole, the others selectively. The computation is the same
operations in the same order (the MLP calls gate_proj before up_proj, as transformers does), so the
loss and gradients equal the plain layer's (tests/test_recompute.py), dropout included.
`set_selective_recomputation(model, False)` restores the modules' own forwards.

Between the two, for layers that must be checkpointed (memory is short): `set_keeps_mlp_output(layer)` (through
fast_path.set_checkpointed_layers, which also calls `allow_fused_lora_state`) checkpoints
the layer whole but keeps, beside its input, the output of the MLP's frozen down projection ([tokens,
hidden], bf16: 56 MiB per Gemma-2-9B layer at 8192 tokens). The backward then recomputes everything except
that matmul (a quarter of a Gemma 2 layer's forward FLOPs): its frozen weight needs nothing of its input,
and only the post-MLP norm needed its output. It is torch's selective activation checkpointing (one
`torch.utils.checkpoint` with a policy that saves that matmul's output) inside the layer's forward, so a
compiled layer traces it into its graph and the partitioner drops from the recomputation what the backward
does not need. Same operations, same order: same loss and gradients (tests/test_recompute.py).
"""

import functools
import types

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from zhtune.models.parts import decoder_layers
from zhtune.train.fused_lora import FOLDED_ATTR, lora_a_output, lora_output, single_plain_adapter

_ATTR = "_zhtune_recompute"
_KEEPS = "_zhtune_keeps_mlp_output"


class _Layer:
    """The decoder layer a wrapped module belongs to (a plain object: a Module attribute would
    register the layer as a submodule of its own child)."""

    def __init__(self, layer):
        self.layer = layer


def _selective(self) -> bool:
    layer = getattr(self, _ATTR).layer
    return self.training and torch.is_grad_enabled() and not (layer.gradient_checkpointing or keeps_mlp_output(layer))


def _norm_forward(self, *args, **kwargs):
    if not _selective(self):
        return type(self).forward(self, *args, **kwargs)
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def _act_mul(act_fn, gate, up):
    return act_fn(gate) * up


def _act_mul_and_lora_a(down, adapter, act_fn, gate, up):
    hidden = _act_mul(act_fn, gate, up)
    return hidden, lora_a_output(down, adapter, hidden)


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not _selective(self):
        return self.down_proj(self.act_fn(gate) * up)
    down = self.down_proj
    adapter = _single_lora(down)
    if adapter is None:
        return down(checkpoint(_act_mul, self.act_fn, gate, up, use_reentrant=False))
    # the activation and PEFT's LoRA-A of down_proj in one checkpoint, recomputed from gate and up: the frozen
    # base matmul keeps nothing of `hidden`, and the LoRA keeps its [tokens, r] output instead of the
    # dropped-out [tokens, intermediate] input and its mask. One region, not one for the activation and another
    # for the LoRA: compiled, the two identical activations were merged and the graph kept the result
    # ([tokens, intermediate]) for the backward unless the dropout's p came in as a value
    hidden, a = checkpoint(_act_mul_and_lora_a, down, adapter, self.act_fn, gate, up, use_reentrant=False)
    return lora_output(down, adapter, hidden, a)


def _single_lora(module) -> str | None:
    """The one active adapter of a plain PEFT LoRA Linear running PEFT's computation, else None (PEFT's own
    forward then)."""
    own_forward = "forward" in module.__dict__ and not hasattr(module, FOLDED_ATTR)  # a folded one computes PEFT's
    return None if own_forward else single_plain_adapter(module)


def _is_norm(module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and "forward" not in module.__dict__


def _is_gated_mlp(module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
        "forward" not in module.__dict__


def set_selective_recomputation(model, enabled: bool = True) -> int:
    """Recompute the norms and the MLP activation of every decoder layer in the backward (enabled),
    or restore the modules' own forwards. Returns the number of modules changed."""
    n = 0
    if not enabled:
        for module in model.modules():
            if hasattr(module, _ATTR):
                delattr(module, _ATTR)
                module.__dict__.pop("forward", None)
                n += 1
        return n
    for layer in decoder_layers(model):
        holder = _Layer(layer)
        for module in layer.modules():
            if hasattr(module, _ATTR):
                continue
            if _is_norm(module):
                forward = _norm_forward
            elif _is_gated_mlp(module) and module is getattr(layer, "mlp", None):
                forward = _mlp_forward
            else:
                continue
            setattr(module, _ATTR, holder)
            module.forward = types.MethodType(forward, module)
            n += 1
    return n


# -- checkpointed layers that keep their MLP output ----------------------------------------------

def keeps_mlp_output(layer) -> bool:
    return getattr(layer, _KEEPS, None) is not None


def set_keeps_mlp_output(layer, enabled: bool = True) -> None:
    """Checkpoint `layer` whole, keeping its MLP's down-projection output (enabled; the layer's own
    `gradient_checkpointing` is then turned off: this checkpoint replaces transformers'), or not."""
    if not enabled:
        if keeps_mlp_output(layer):
            delattr(layer, _KEEPS)
            layer.__dict__.pop("forward", None)
        return
    layer.gradient_checkpointing = False
    if keeps_mlp_output(layer):
        return
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    fold = getattr(down, FOLDED_ATTR, None)  # LoRA-B folded (train/fold_lora.py): one matmul, mm([x | a], buffer.t())
    weight = fold.buffer if fold is not None else getattr(getattr(down, "base_layer", down), "weight", None)
    # the down projection's matmul, as autograd's dispatch sees it: mm(x, weight.t())
    setattr(layer, _KEEPS, tuple(weight.shape[::-1]) if weight is not None else ())
    layer.forward = types.MethodType(_checkpointed_layer_forward, layer)


_DYNAMO_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"
_flag_before = []  # the flag's value before allow_fused_lora_state(True), while it holds


def allow_fused_lora_state(enabled: bool) -> None:
    """While some layer keeps its MLP output (enabled): the fused LoRA-A (train/fused_lora.py) keeps the
    group's output in a SharedSplit that the layer's later members empty again, and torch.compile refuses
    such state changes inside a checkpoint unless told that not replaying them in the recomputation is fine,
    which it is (the split ends each layer call empty). A process-wide dynamo setting: set while needed,
    put back after (it changes how other compiled graphs split)."""
    import torch._dynamo
    config = torch._dynamo.config
    if not hasattr(config, _DYNAMO_FLAG):
        return
    if enabled and not _flag_before:
        _flag_before.append(getattr(config, _DYNAMO_FLAG))
        setattr(config, _DYNAMO_FLAG, True)
    elif not enabled and _flag_before:
        setattr(config, _DYNAMO_FLAG, _flag_before.pop())


def _checkpointed_layer_forward(self, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, *args, **kwargs)
    policy = functools.partial(_save_matmul_output, getattr(self, _KEEPS))
    return checkpoint(type(self).forward, self, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, policy), **kwargs)


def _save_matmul_output(weight_t_shape: tuple, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is torch.ops.aten.mm.default and len(args) == 2 and tuple(args[1].shape) == weight_t_shape:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE
