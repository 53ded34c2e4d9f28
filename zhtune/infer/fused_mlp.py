"""Generation lever, off by default until measured on a GPU (issue 17): each decoder layer's MLP reads its
gate and up projections as one weight, so a decode step runs one matrix-vector product of 2 x intermediate
rows instead of two (at batch 1 every step reads all the weights: fewer, larger reads use the memory
bandwidth better).

`fuse_gate_up(model)` concatenates gate_proj and up_proj once (the two Linear weights then become views
of the fused one: no extra memory) and gives each MLP a forward that splits the fused product; the
arithmetic per output element is that of the two separate products. `unfuse_gate_up` restores the
modules' own forward. Only MLPs of the form down(act(gate(x)) * up(x)) with plain bias-free nn.Linear
projections are fused (Gemma 2, Gemma 3, Qwen2); a LoRA-wrapped projection is left alone.
Compiled decode steps and captured CUDA graphs that saw the old forward must be rebuilt after either call.
"""

import types

import torch
import torch.nn.functional as F
from torch import nn

from zhtune.models.parts import decoder_layers


def _fused_forward(self, x):
    gate, up = F.linear(x, self._gate_up_weight).split(self.intermediate_size, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def _fusable(mlp) -> bool:
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(p) is nn.Linear and p.bias is None for p in parts) and hasattr(mlp, "act_fn")
            and parts[0].weight.shape == parts[1].weight.shape and "forward" not in mlp.__dict__)


@torch.no_grad()
def fuse_gate_up(model) -> int:
    """Fuse every fusable MLP's gate and up projections; returns how many were fused."""
    n = 0
    for layer in decoder_layers(model) or []:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not _fusable(mlp):
            continue
        gate, up = mlp.gate_proj, mlp.up_proj
        fused = torch.cat([gate.weight, up.weight])
        rows = gate.weight.shape[0]
        gate.weight.data, up.weight.data = fused[:rows], fused[rows:]
        mlp.intermediate_size = rows
        mlp._gate_up_weight = fused
        mlp.forward = types.MethodType(_fused_forward, mlp)
        n += 1
    return n


@torch.no_grad()
def unfuse_gate_up(model) -> int:
    """Give the fused MLPs their own forward and weights of their own back; returns how many."""
    n = 0
    for layer in decoder_layers(model) or []:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and "_gate_up_weight" in mlp.__dict__:
            mlp.gate_proj.weight.data = mlp.gate_proj.weight.data.clone()  # no storage shared (saving needs that)
            mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone()
            del mlp.forward, mlp._gate_up_weight
            n += 1
    return n
