"""Fused LoRA-A (zhtune/train/fused_lora.py) against PEFT's own modules: same outputs and gradients
(fp32, CPU, dropout off), the shared dropout draw when dropout is on, PEFT's path for what it does not
cover, and no graph break under torch.compile."""

import copy

import pytest
import torch
from tiny_models import tiny_config
from torch import nn

from zhtune.train.fused_lora import fuse_lora_projections, unfuse_lora_projections

VOCAB = 300
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def lora_model(arch: str = "gemma2", dropout: float = 0.0, layers: int = 2, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, layers=layers), dtype=torch.float32,
                                             attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:
            nn.init.normal_(p, std=0.05)
        if "norm" in name and "lora" not in name:
            p.requires_grad_(True)
    return model.train()


def loss_and_grads(model, ids, seed: int = 0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_same_outputs_and_gradients_as_peft(arch):
    plain = lora_model(arch)
    fused = copy.deepcopy(plain)
    assert fuse_lora_projections(fused) == 2 * 2  # q/k/v and gate/up in each of 2 layers
    assert fuse_lora_projections(fused) == 0  # idempotent
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_p, logits_p, grads_p = loss_and_grads(plain, ids)
    loss_f, logits_f, grads_f = loss_and_grads(fused, ids)
    assert set(grads_p) == set(grads_f) and any("lora_A" in n for n in grads_f)
    torch.testing.assert_close(loss_f, loss_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_f, logits_p, rtol=1e-5, atol=1e-5)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_gradient_checkpointing_and_call_order():
    plain = lora_model()
    fused = copy.deepcopy(plain)
    fuse_lora_projections(fused)
    for m in (plain, fused):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    _, _, grads_p = loss_and_grads(plain, ids)
    _, _, grads_f = loss_and_grads(fused, ids)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)
    # any call order is right (the group recomputes when its input or member order is not the usual)
    attn_p = plain.get_base_model().model.layers[0].self_attn
    attn_f = fused.get_base_model().model.layers[0].self_attn
    x = torch.randn(1, 5, attn_p.q_proj.in_features)
    for name in ("v_proj", "q_proj", "q_proj", "k_proj"):
        torch.testing.assert_close(getattr(attn_f, name)(x), getattr(attn_p, name)(x))
    other = torch.randn_like(x)
    attn_f.q_proj(x)
    torch.testing.assert_close(attn_f.k_proj(other), attn_p.k_proj(other))


def test_one_dropout_draw_per_group():
    model = lora_model(dropout=0.5)
    fuse_lora_projections(model)
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(1, 7, attn.q_proj.in_features)
    torch.manual_seed(3)
    outs = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the one draw the group makes
    for proj, out in zip((attn.q_proj, attn.k_proj, attn.v_proj), outs):
        expected = proj.base_layer(x) + proj.lora_B["default"](proj.lora_A["default"](dropped)) * \
            proj.scaling["default"]
        torch.testing.assert_close(out, expected)


def test_peft_path_where_fusion_does_not_apply():
    plain = lora_model()
    fused = copy.deepcopy(plain)
    fuse_lora_projections(fused)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with fused.disable_adapter(), plain.disable_adapter():  # disabled adapters: the base model
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    # a second adapter made active: PEFT's forward, same result
    from peft import LoraConfig
    for m in (plain, fused):
        torch.manual_seed(5)
        m.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
        for name, p in m.named_parameters():
            if "lora_B.other" in name:
                nn.init.constant_(p, 0.01)
        m.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert unfuse_lora_projections(fused) == 2 * 5
    assert not any("forward" in m.__dict__ for m in fused.modules())


def test_no_graph_break_under_torch_compile():
    model = lora_model(layers=1)
    fuse_lora_projections(model)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, 8, layer.self_attn.q_proj.in_features, requires_grad=True)
    rotary = model.get_base_model().model.rotary_emb
    emb = rotary(x, torch.arange(8)[None])
    explained = torch._dynamo.explain(layer)(x, position_embeddings=emb, attention_mask=None)
    assert explained.graph_break_count == 0, explained.break_reasons
