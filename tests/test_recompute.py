"""Selective recomputation (zhtune/train/recompute.py): the same loss and gradients as the plain
model, dropout on (same seed), alone and beside whole-layer checkpointing; less kept for the
backward; no graph break under torch.compile; restored on request."""

import copy

import pytest
import torch
from test_fused_lora import lora_model, loss_and_grads

from zhtune.train.fast_path import set_checkpointed_layers
from zhtune.train.fused_lora import fuse_lora_projections
from zhtune.train.hash_dropout import set_hash_dropout
from zhtune.train.fold_lora import fold_lora_b
from zhtune.train.recompute import set_selective_recomputation

VOCAB = 300


def saved_bytes(model, tokens: int = 64) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of decoder layer 0 (bf16
    autocast, as in training), parameters left out."""
    base = model.get_base_model().model
    layer = base.layers[0]
    x = torch.randn(1, tokens, layer.self_attn.q_proj.in_features, requires_grad=True)
    emb = base.rotary_emb(x, torch.arange(tokens)[None])
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, position_embeddings=emb, attention_mask=None)
    return sum(v for k, v in storages.items() if k not in params)


@pytest.mark.parametrize("hashed", [False, True])
def test_same_loss_and_gradients_with_dropout(hashed):
    """nn.Dropout or hashed masks (train/hash_dropout.py): the recomputation draws the forward's masks again."""
    plain = lora_model(dropout=0.1, layers=3)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hashed:
        assert set_hash_dropout(plain) == 3 * 7 + 2  # every projection of 3 layers, embed_tokens and lm_head
    selective = copy.deepcopy(plain)
    assert set_selective_recomputation(selective) == 3 * 5  # 4 norms and the MLP in each of 3 layers
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    for whole in (0, 1, 3):  # layers checkpointed whole; the others selectively
        set_checkpointed_layers(plain, whole)
        set_checkpointed_layers(selective, whole)
        loss_p, _, grads_p = loss_and_grads(plain, ids, seed=7)
        loss_s, _, grads_s = loss_and_grads(selective, ids, seed=7)
        assert torch.equal(loss_p, loss_s), whole
        for name in grads_p:
            torch.testing.assert_close(grads_s[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)
    other_seed, _, _ = loss_and_grads(plain, ids, seed=8)
    assert not torch.equal(other_seed, loss_p)  # the masks act


def test_keeps_less_for_the_backward():
    plain = lora_model(dropout=0.05, layers=2)
    set_checkpointed_layers(plain, 0)
    fused, selective, both = (copy.deepcopy(plain) for _ in range(3))
    fuse_lora_projections(fused)
    set_selective_recomputation(selective)
    fuse_lora_projections(both)
    set_selective_recomputation(both)
    sizes = {name: saved_bytes(m) for name, m in
             (("plain", plain), ("fused", fused), ("selective", selective), ("both", both))}
    assert sizes["fused"] < sizes["plain"]
    assert sizes["selective"] < 0.85 * sizes["plain"], sizes
    assert sizes["both"] < sizes["selective"], sizes


def test_no_graph_break_and_restore():
    model = lora_model(layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_checkpointed_layers(model, 0)
    set_selective_recomputation(model)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, 8, layer.self_attn.q_proj.in_features, requires_grad=True)
    emb = model.get_base_model().model.rotary_emb(x, torch.arange(8)[None])
    explained = torch._dynamo.explain(layer)(x, position_embeddings=emb, attention_mask=None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert set_selective_recomputation(model, False) == 5
    assert not any("forward" in m.__dict__ for m in model.modules())


class _ForwardMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the forward matmuls x @ weight.t() of the given weights (aten.mm calls)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = {w.untyped_storage().data_ptr(): tuple(w.T.shape) for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default and \
                self.weights.get(args[1].untyped_storage().data_ptr()) == tuple(args[1].shape):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("folded", [False, True])
def test_checkpointed_layers_keeping_the_mlp_output_train_the_same_and_skip_its_matmul(folded):
    """With LoRA-B folded into the frozen matmul (train/fold_lora.py) the kept output is that one matmul's."""
    plain = lora_model(dropout=0.1, layers=4)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fuse_lora_projections(plain)
    set_selective_recomputation(plain)
    keeping = copy.deepcopy(plain)
    if folded:  # each copy its own: a deep copy would keep the original's refresh hook
        fold_lora_b(plain), fold_lora_b(keeping)
    set_checkpointed_layers(plain, 3)
    assert set_checkpointed_layers(keeping, 3, keep_mlp_output=2) == [1, 2, 3]
    layers = keeping.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [False, False, False, True]  # the first two keep it
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    loss_p, _, grads_p = loss_and_grads(plain, ids, seed=7)
    torch.manual_seed(7)
    keeping.zero_grad(set_to_none=True)
    loss_k = keeping(input_ids=ids, labels=ids, use_cache=False).loss
    downs = [layer.mlp.down_proj for layer in layers]
    weights = [d._zhtune_folded_lora_b.buffer if folded else d.base_layer.weight for d in downs]
    with _ForwardMatmuls(weights) as backward:
        loss_k.backward()
    assert torch.equal(loss_p, loss_k.detach())
    for name, p in keeping.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads_p[name], rtol=1e-5, atol=1e-7, msg=name)
    # the backward reruns the down projection only in the layer checkpointed the usual way
    assert backward.count == 1
    set_checkpointed_layers(keeping, 0)
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_checkpoint_keeping_the_mlp_output_compiles_without_graph_break():
    model = lora_model(layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fuse_lora_projections(model)
    set_checkpointed_layers(model, 1, keep_mlp_output=1)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, 8, layer.self_attn.q_proj.in_features, requires_grad=True)
    emb = model.get_base_model().model.rotary_emb(x, torch.arange(8)[None])
    explained = torch._dynamo.explain(layer)(x, position_embeddings=emb, attention_mask=None)
    set_checkpointed_layers(model, 1)  # dynamo's process-wide setting goes back when no layer keeps it
    assert explained.graph_break_count == 0, explained.break_reasons
    assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is False


@pytest.mark.parametrize("hashed", [False, True])
def test_compiled_layer_keeps_gate_and_up_but_not_the_activation(hashed):
    """Compiled (inductor, CPU), with dropout on: of the MLP's [tokens, intermediate] tensors the backward keeps
    gate and up only; the activation and down_proj's dropped-out LoRA input are recomputed from them. With the
    activation and the LoRA-A in two checkpoints the graph also kept the activation (on the H200, 9.2 GiB for
    Gemma-2-9B's 42 layers)."""
    model = lora_model(dropout=0.05, layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_checkpointed_layers(model, 0)
    if hashed:
        set_hash_dropout(model)
    fuse_lora_projections(model)
    set_selective_recomputation(model)
    base = model.get_base_model().model
    layer = base.layers[0]
    tokens, width = 512, layer.mlp.gate_proj.out_features
    x = torch.randn(1, tokens, layer.self_attn.q_proj.in_features, requires_grad=True)
    emb = base.rotary_emb(x, torch.arange(tokens)[None])
    compiled = torch.compile(layer, backend="inductor")
    kept = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and tuple(t.shape[-2:]) == (tokens, width):
            kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x, position_embeddings=emb, attention_mask=None)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert len({t.untyped_storage().data_ptr() for t in kept}) == 2
