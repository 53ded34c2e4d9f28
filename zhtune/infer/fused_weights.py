"""Generation levers (issue 17; on by default for the engine that infer, eval and deploy load, with CUDA
graphs: `Scheduler(fuse_weights=True)`): projections that read the same
input read their weights as one matrix, so a decode step runs one larger matrix-vector product instead
of two or three (at batch 1 every step reads all the weights: fewer, larger reads use the memory
bandwidth better).

- `fuse_gate_up(model)`: each MLP's gate_proj and up_proj as one weight, with a forward of its own for
  MLPs of the form down(act(gate(x)) * up(x)) (Gemma 2, Gemma 3, Qwen2).
- `fuse_qkv(model)`: each attention block's q_proj, k_proj and v_proj as one weight (and bias, Qwen2's).
  The attention's own forward is kept (a `SharedSplit`): the first of the three projections to run
  computes the fused product for its input, and each projection returns its slice of it (a projection
  called with another input, or twice, computes it again: any call order gives the same result).

The fused weight is made once by concatenation; the modules' weights then become views of it (no extra
memory). The arithmetic per output element is that of the separate products. Only plain nn.Linear
projections are fused (a LoRA-wrapped one is left alone). `unfuse_gate_up` / `unfuse_qkv` give the modules
their own forward and weights back. Compiled decode steps and captured CUDA graphs that saw the old
forward must be rebuilt after any of these calls.
"""

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from zhtune.models.parts import SharedSplit, layer_blocks

QKV = ("q_proj", "k_proj", "v_proj")


def _plain_linears(module, names) -> list | None:
    parts = [getattr(module, name, None) for name in names]
    if not all(type(p) is nn.Linear and "forward" not in p.__dict__ for p in parts):
        return None
    if len({p.bias is None for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
        return None
    return parts


@torch.no_grad()
def _concatenate(parts: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for `parts`; each part's own become views of it."""
    weight = torch.cat([p.weight for p in parts])
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    start = 0
    for p in parts:
        rows = p.weight.shape[0]
        p.weight.data = weight[start:start + rows]
        if bias is not None:
            p.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


@torch.no_grad()
def _own_storage(parts: list) -> None:
    for p in parts:  # no storage shared (saving needs that)
        p.weight.data = p.weight.data.clone()
        if p.bias is not None:
            p.bias.data = p.bias.data.clone()


# -- gate and up -----------------------------------------------------------------------------------

def _fused_mlp_forward(self, x):
    gate, up = F.linear(x, self._gate_up_weight).split(self.intermediate_size, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def fuse_gate_up(model) -> int:
    """Fuse every fusable MLP's gate and up projections; returns how many were fused."""
    n = 0
    for mlp in layer_blocks(model, "mlp"):
        parts = _plain_linears(mlp, ("gate_proj", "up_proj"))
        if (parts is None or parts[0].bias is not None or not hasattr(mlp, "act_fn") or "forward" in mlp.__dict__
                or parts[0].weight.shape != parts[1].weight.shape):
            continue
        mlp._gate_up_weight, _ = _concatenate(parts)
        mlp.intermediate_size = parts[0].weight.shape[0]
        mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
        n += 1
    return n


def unfuse_gate_up(model) -> int:
    """Give the fused MLPs their own forward and weights of their own back; returns how many."""
    n = 0
    for mlp in layer_blocks(model, "mlp"):
        if "_gate_up_weight" in mlp.__dict__:
            _own_storage([mlp.gate_proj, mlp.up_proj])
            del mlp.forward, mlp._gate_up_weight
            n += 1
    return n


# -- q, k and v ------------------------------------------------------------------------------------

def _fused_product(weight, bias, sizes, x):
    return F.linear(x, weight, bias).split(sizes, dim=-1)


def _member_forward(self, x):
    return self._zhtune_shared.take(self._zhtune_index, x)


def fuse_qkv(model) -> int:
    """Fuse every attention block's q, k and v projections; returns how many blocks were fused."""
    n = 0
    for attention in layer_blocks(model, "self_attn"):
        parts = _plain_linears(attention, QKV)
        if parts is None:
            continue
        weight, bias = _concatenate(parts)
        shared = SharedSplit(len(parts), functools.partial(_fused_product, weight, bias,
                                                           [p.weight.shape[0] for p in parts]))
        for index, p in enumerate(parts):
            p._zhtune_shared, p._zhtune_index = shared, index
            p.forward = types.MethodType(_member_forward, p)
        n += 1
    return n


def unfuse_qkv(model) -> int:
    """Give the fused q/k/v projections their own forward and weights back; returns how many blocks."""
    n = 0
    for attention in layer_blocks(model, "self_attn"):
        parts = [getattr(attention, name, None) for name in QKV]
        if all(p is not None and "_zhtune_shared" in p.__dict__ for p in parts):
            _own_storage(parts)
            for p in parts:
                del p.forward, p._zhtune_shared, p._zhtune_index
            n += 1
    return n
