"""Eager attention for generation without copying K/V per head group.

transformers' eager attention (the one that keeps Gemma 2's attention softcap exact) first repeats
every key and value head for the query heads that share it (`repeat_kv`): with Gemma-2-9B's 16 query
and 8 key/value heads, every decode step copies the whole attended cache once more per layer. Here
the query heads of one group are stacked instead, so one matmul per key/value head reads the cache in
place. Same operations in the same order otherwise (scale, softcap, additive mask, float32 softmax
cast back, probabilities times values): the generation tests check the greedy tokens against
`generate` on the eager model.
"""

import contextlib

import torch

NAME = "zhtune_grouped_eager"


def grouped_eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            softcap=None, **kwargs):
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if scaling is None:
        scaling = module.head_dim ** -0.5
    q = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    weights = torch.matmul(q, key.transpose(2, 3)) * scaling
    weights = weights.view(batch, kv_heads, groups, q_len, kv_len)
    if softcap is not None:
        weights = weights / softcap
        weights = torch.tanh(weights)
        weights = weights * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :kv_len]
        mask = mask.unsqueeze(2) if mask.shape[1] == 1 else mask.view(batch, kv_heads, groups, q_len, kv_len)
        weights = weights + mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(batch, kv_heads, groups * q_len, kv_len), value)
    out = out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    return out, weights.view(batch, heads, q_len, kv_len)


@contextlib.contextmanager
def grouped_attention(config):
    """Within the block, a model on eager attention runs the grouped one (same results, no K/V copies).
    Only the generation scheduler's own forwards use it: a plain `generate` on the same model stays the
    eager reference the tests compare with."""
    if getattr(config, "_attn_implementation", None) != "eager":
        yield
        return
    register()  # idempotent; done once before any compiled step traces this block
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "eager"


_registered = False


def register():
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    AttentionInterface.register(NAME, grouped_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)  # the same additive masks eager gets
