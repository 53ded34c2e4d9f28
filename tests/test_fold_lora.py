"""LoRA-B folded into the frozen projection's matmul (zhtune/train/fold_lora.py): PEFT's outputs and gradients,
alone and with the fused LoRA-A, selective recomputation and a compiled layer; B's updates reach the folded
matmul; one matmul fewer each way; undoing it gives the exact model back."""

import copy

import pytest
import torch
from test_fused_lora import VOCAB, loss_and_grads, lora_model

from zhtune.train.fold_lora import fold_lora_b, unfold_lora_b
from zhtune.train.fused_lora import fuse_lora_projections
from zhtune.train.recompute import set_selective_recomputation

PROJECTIONS = 7  # q, k, v, o, gate, up, down in each decoder layer


def ids():
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def assert_same(got, want, atol=1e-5):
    loss_g, logits_g, grads_g = got
    loss_w, logits_w, grads_w = want
    assert set(grads_g) == set(grads_w) and any("lora_B" in n for n in grads_g)
    torch.testing.assert_close(loss_g, loss_w, rtol=0, atol=atol)
    torch.testing.assert_close(logits_g, logits_w, rtol=1e-4, atol=atol)
    for name in grads_w:
        torch.testing.assert_close(grads_g[name], grads_w[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("levers", ["alone", "fused", "fused_selective"])
def test_same_loss_and_gradients_as_peft(levers):
    plain = lora_model(layers=2)
    folded = copy.deepcopy(plain)
    if levers != "alone":
        assert fuse_lora_projections(folded) == 4
    if levers == "fused_selective":
        assert set_selective_recomputation(folded)
    assert fold_lora_b(folded) == 2 * PROJECTIONS
    assert fold_lora_b(folded) == 0  # idempotent
    assert_same(loss_and_grads(folded, ids()), loss_and_grads(plain, ids()))


@pytest.mark.parametrize("copied", [False, True])
def test_updates_of_b_reach_the_folded_matmul_and_unfolding_restores_the_model(copied):
    """B's optimizer updates reach the folded matmul (also in a deep copy of a folded model: its own buffers)."""
    plain = lora_model(layers=2)
    folded = copy.deepcopy(plain)
    fold_lora_b(folded)
    if copied:
        folded = copy.deepcopy(folded)
    for model in (plain, folded):  # one optimizer step on each: B (and A) change
        loss_and_grads(model, ids())
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert_same(loss_and_grads(folded, ids()), loss_and_grads(plain, ids()))
    weights = {n: p.detach().clone() for n, p in folded.named_parameters()}
    assert unfold_lora_b(folded) == 2 * PROJECTIONS
    assert all(p.is_contiguous() for p in folded.parameters())
    assert folded.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(p, weights[n]) for n, p in folded.named_parameters())
    same_weights = copy.deepcopy(plain)
    same_weights.load_state_dict(folded.state_dict())
    folded.eval(), same_weights.eval()
    with torch.no_grad():  # PEFT's own computation again, bit for bit
        torch.testing.assert_close(folded(input_ids=ids()).logits, same_weights(input_ids=ids()).logits, rtol=0,
                                   atol=0)


def test_a_compiled_layer_runs_one_matmul_fewer_each_way():
    """A folded LoRA projection: forward A and [x | a] @ [W | s·B]ᵀ (2 matmuls, PEFT 3); backward [dx | da] in
    one, dB, dA and A's input gradient (4, PEFT 5). The compiled model's loss and gradients stay PEFT's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def count(module, x):
        graphs = {}

        def keep(name):
            def compiler(gm, _inputs):
                graphs[name] = sum(str(n.target).startswith(("aten.mm", "aten.addmm", "aten.bmm"))
                                   for n in gm.graph.nodes if n.op == "call_function")
                return make_boxed_func(gm)
            return compiler

        compiled = torch.compile(module, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")))
        compiled(x.clone().requires_grad_()).sum().backward()
        torch._dynamo.reset()
        return graphs

    model = lora_model(layers=1)
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 8, o_proj.in_features)
    peft = count(copy.deepcopy(o_proj), x)
    fold_lora_b(model)
    assert count(o_proj, x) == {"forward": peft["forward"] - 1, "backward": peft["backward"] - 1}, peft
    plain = lora_model(layers=2)
    folded = copy.deepcopy(plain)
    fuse_lora_projections(folded), set_selective_recomputation(folded), fold_lora_b(folded)
    for layer in folded.base_model.model.model.layers:
        layer.compile(backend="aot_eager")
    assert_same(loss_and_grads(folded, ids()), loss_and_grads(plain, ids()), atol=1e-5)
    torch._dynamo.reset()


def test_float8_leaves_folded_projections_alone():
    """--fp8 swaps frozen base linears for float8 ones; a folded projection's matmul is the folded bf16 one, so its
    base stays (and a float8 base is not folded)."""
    from zhtune.train.fp8 import apply_fp8, remove_fp8
    model = lora_model(layers=1)
    assert fold_lora_b(model) == PROJECTIONS and apply_fp8(model) == 0
    unfold_lora_b(model)
    assert apply_fp8(model) == PROJECTIONS and fold_lora_b(model) == 0
    assert remove_fp8(model) == PROJECTIONS
