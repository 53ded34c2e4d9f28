"""The fast path computes what the exact plain path computes: packing, the chunked softcapped loss,
and FastPath.compute_loss on tiny Gemma 2 / Gemma 3 / Qwen2 models (fp32, CPU)."""

import functools
import pytest
import torch
from tiny_models import tiny_config
from torch import nn

from zhtune.templates.base import Encoded
from zhtune.train.fast_path import FastPath, set_checkpointed_layers
from zhtune.train.loss import chunked_causal_lm_loss, full_logits_loss
from zhtune.train.packing import IGNORE_INDEX, PackedCollator, PaddedCollator, pack_encoded

VOCAB = 300
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def tiny_model(arch: str, attn: str = "eager", lora: bool = True, seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(arch, VOCAB, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    if not lora:
        return model.train()
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:  # non-zero, so every LoRA matrix has a gradient
            nn.init.normal_(p, std=0.05)
        if "norm" in name and "lora" not in name:
            p.requires_grad_(True)  # the seed's --lora_modules_to_save LN
    return model.train()


def samples(lengths, seed=1, prompt_share=0.3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        p = max(1, int(n * prompt_share))
        out.append(Encoded(ids, [IGNORE_INDEX] * p + ids[p:]))
    return out


def n_targets(items) -> int:
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in items)


class _Args:
    fast_path, packing, deepspeed, max_length, dataset_seed, batch_size = True, None, None, 64, 42, 1


# -- packing -----------------------------------------------------------------------------------------

def test_pack_encoded_keeps_every_sample_whole_and_apart():
    items = samples([5, 17, 9, 30, 12, 3, 40, 1, 22])
    rows = pack_encoded(items, max_length=48, seed=7)
    assert rows == pack_encoded(items, max_length=48, seed=7)
    assert all(len(r["input_ids"]) <= 48 for r in rows)
    assert len(rows) == 3  # 139 tokens in 3 rows of 48: best-fit decreasing finds the fewest here
    seen = []
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE_INDEX  # a sample's first token is never a target
            seen.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a + 1:b])))
    expected = [(tuple(e.input_ids), tuple(e.labels[1:])) for e in items]
    assert sorted(seen) == sorted(expected)
    with pytest.raises(ValueError, match="max_length"):
        pack_encoded(samples([49]), max_length=48)


def test_collators():
    rows = pack_encoded(samples([5, 7, 20]), max_length=32)
    batch = PackedCollator(pad_id=0)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # an attention_mask would hide the packing
    assert batch["input_ids"].shape == (1, 128)
    assert (batch["labels"][0, 32:] == IGNORE_INDEX).all() and (batch["input_ids"][0, 32:] == 0).all()
    assert batch["position_ids"][0, 32] == 0  # the padding is a dummy sample of its own
    padded = PaddedCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                       {"input_ids": [8], "labels": [8]}])
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# -- the chunked loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap,lora_head,compiled", [(30.0, False, False), (None, False, False), (30.0, True, False),
                                                       (None, True, False), (30.0, True, True)])
def test_chunked_loss_equals_full_logits_softcapped_ce(softcap, lora_head, compiled):
    """compiled: the per-chunk arithmetic through torch.compile (inductor), the `compile_loss` lever."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    nn.init.normal_(head.weight, std=2.0)  # logits well past the softcap, so the cap matters
    if lora_head:
        from peft import LoraConfig, get_peft_model

        class Wrap(nn.Module):
            def __init__(self):
                super().__init__()
                self.lm_head = head
        head = get_peft_model(Wrap(), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])).base_model.model.lm_head
        nn.init.normal_(head.lora_B["default"].weight, std=0.5)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :10] = IGNORE_INDEX
    labels[1, 30:] = IGNORE_INDEX
    params = [p for p in head.parameters() if p.requires_grad]

    ref, n_ref = full_logits_loss(head(hidden), labels, softcap)
    ref_grads = torch.autograd.grad(ref, [hidden] + params)
    if softcap is not None:  # the reference really is softcapped CE
        plain = full_logits_loss(head(hidden), labels, None)[0]
        assert abs(float(plain - ref)) > 1.0
    for chunk in (5, 1024):
        loss, n = chunked_causal_lm_loss(hidden, head, labels, softcap, chunk_size=chunk, compiled=compiled)
        assert n == n_ref == int((labels[:, 1:] != IGNORE_INDEX).sum())
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(loss * 0.5, [hidden] + params)  # the incoming gradient scales
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, 0.5 * r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked_causal_lm_loss(hidden, head, labels, softcap, chunk_size=7,
                                                          compiled=compiled)[0], ref.detach())


# -- FastPath vs the exact plain path ----------------------------------------------------------------

def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("arch,deepspeed", [("gemma2", None), ("gemma3_text", None), ("qwen2", None),
                                             ("gemma2", "default-zero3")])
def test_fast_path_matches_per_sample_eager(arch, deepspeed):
    """Under ZeRO-3 (deepspeed) the packed rows' loss is transformers' own on full logits: the same again."""
    model = tiny_model(arch)
    items = samples([5, 17, 9, 30, 12, 3, 21])  # 17, 30 and 21 tokens: longer than the sliding window (8)
    n_items = n_targets(items)

    model.zero_grad()
    baseline = 0.0
    for e in items:  # the exact plain path: one padded sample at a time, transformers' own loss
        batch = PaddedCollator()([{"input_ids": e.input_ids, "labels": e.labels}])
        out = model(**batch, num_items_in_batch=n_items, use_cache=False)
        out.loss.backward()
        baseline += float(out.loss)
    ref = _grads(model)

    args = type("Args", (_Args,), {"deepspeed": deepspeed})()
    fast = FastPath(chunk_size=16)
    assert fast.decide(model.get_base_model().config, "cpu", args)[0]
    assert fast.chunked_loss is (deepspeed is None)
    rows, collator = fast.prepare_data(items, args)
    assert len(rows) == 2
    model.zero_grad()
    total = 0.0
    for row in rows:  # two micro-batches of one accumulated batch
        loss = fast.compute_loss(model, collator([row]), num_items_in_batch=n_items)
        loss.backward()
        total += float(loss)
    got = _grads(model)

    assert abs(total - baseline) <= 1e-4
    assert set(got) == set(ref) and len(ref) > 20
    flat_ref = torch.cat([g.flatten() for g in ref.values()])
    flat_got = torch.cat([got[n].flatten() for n in ref])
    assert torch.nn.functional.cosine_similarity(flat_ref, flat_got, dim=0) > 0.9999
    torch.testing.assert_close(flat_got, flat_ref, rtol=1e-3, atol=1e-6)


def test_fast_path_with_gradient_checkpointing_and_mean_over_own_tokens():
    model = tiny_model("gemma2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert set_checkpointed_layers(model, 1) == [1]
    items = samples([20, 11])
    batch = PaddedCollator()([{"input_ids": e.input_ids, "labels": e.labels} for e in items])
    expected = float(model(**batch, use_cache=False).loss)  # mean over the batch's label tokens
    fast = FastPath()
    rows, collator = fast.prepare_data(items, _Args())
    loss = fast.compute_loss(model, collator(rows))
    loss.backward()
    assert abs(float(loss) - expected) <= 1e-4


def _logits(model, input_ids, position_ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@pytest.mark.parametrize("attn", ["eager", "flex_attention"])
def test_packing_never_mixes_documents(attn):
    """Attention probe: change document A's tokens and document B's logits stay the same; and each
    packed document's logits equal its own unpacked logits (softcaps and sliding window included)."""
    model = tiny_model("gemma2", attn=attn, lora=False).eval()
    a, b = samples([37, 50], seed=3)
    rows = pack_encoded([a, b], max_length=128)
    assert len(rows) == 1
    batch = PackedCollator()(rows)
    b_first = rows[0]["input_ids"][:50] == b.input_ids
    span_b = slice(0, 50) if b_first else slice(37, 87)
    span_a = slice(50, 87) if b_first else slice(0, 37)
    try:
        packed = _logits(model, batch["input_ids"], batch["position_ids"])
    except Exception as e:  # noqa: BLE001 - flex_attention needs a working compiler on the CPU
        if attn == "flex_attention":
            pytest.skip(f"flex_attention does not run on this CPU: {type(e).__name__}")
        raise
    changed = batch["input_ids"].clone()
    changed[0, span_a] = torch.randint(3, VOCAB, (37,))
    probe = _logits(model, changed, batch["position_ids"])
    torch.testing.assert_close(probe[0, span_b], packed[0, span_b], rtol=0, atol=1e-5)
    assert not torch.allclose(probe[0, span_a], packed[0, span_a])

    model.config._attn_implementation = "eager"  # the reference: each document alone
    for e, span in ((a, span_a), (b, span_b)):
        alone = _logits(model, torch.tensor([e.input_ids]))
        torch.testing.assert_close(packed[0, span], alone[0], rtol=1e-4, atol=1e-4)


# -- choosing the path -------------------------------------------------------------------------------

def test_decide_logs_one_line_and_falls_back(zhtune_log):
    model = tiny_model("gemma2", lora=False)

    class A:
        fast_path, packing, deepspeed = None, None, None
    fast = FastPath()
    assert fast.decide(model.config, "cpu", A())[0] is False
    assert zhtune_log.messages == ["training path: exact plain path: no GPU (device cpu); --fast_path true forces it"]
    model.config._attn_implementation = "flex_attention"
    assert fast.decide(model.config, "cuda", A()) == (
        True, "packing + flex_attention with softcap + chunked softcapped loss")
    assert zhtune_log.messages[-1] == ("training path: fast (packing + flex_attention with softcap + "
                                       "chunked softcapped loss)")
    model.config._attn_implementation = "sdpa"
    assert fast.decide(model.config, "cuda", A())[0] is False  # sdpa would drop Gemma 2's attention softcap
    A.fast_path = False
    assert fast.decide(model.config, "cuda", A()) == (False, "--fast_path false")
    A.fast_path, A.deepspeed = None, "default-zero3"
    model.config._attn_implementation = "flex_attention"
    for engine in ("DeepSpeed ZeRO-3", "FSDP"):  # packing and flex_attention stay; the loss is transformers'
        sharded = FastPath()
        assert sharded.decide(model.config, "cuda", A()) == (
            True, f"packing + flex_attention with softcap + transformers' loss on full logits ({engine} shards the "
            "lm_head the chunked loss calls outside the model's forward; no compiled levers)")
        assert not (sharded.chunked_loss or sharded.compiles() or sharded.bf16_lora_inputs)
        A.deepspeed, A.fsdp = None, "fsdp2"
    A.fsdp = None
    llama = type("Cfg", (), {"model_type": "llama", "_attn_implementation": "sdpa"})()
    enabled, reason = fast.decide(llama, "cuda", A())
    assert not enabled and "llama" in reason
    assert len(zhtune_log.messages) == 7
    assert FastPath().chunked_loss and FastPath().decide(model.config, "cuda", A())[0]


def test_prepare_model_and_data_levers():
    from peft.tuners.tuners_utils import BaseTunerLayer
    model = tiny_model("gemma2").to(torch.bfloat16)
    fast = FastPath()
    fast.decide(model.get_base_model().config, "cpu", _Args())
    assert fast.prepare_model(model) == ["bf16 LoRA inputs"]  # no torch.compile on a CPU by default
    lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)
    fast.restore_model(model)
    assert all(m.cast_input_dtype_enabled for m in lora_layers)
    items = samples([20, 11])
    assert fast.prepare_data(items, _Args())[1](pack_encoded(items, 64))["input_ids"].shape == (1, 128)
    fast.compile = True  # one fixed shape for torch.compile: every micro-batch padded to --batch_size x --max_length
    _Args.max_length, _Args.batch_size = 256, 2
    try:
        rows, collator = fast.prepare_data(samples([200, 180, 150]), _Args())
        assert len(rows) == 3  # a full micro-batch of two rows, and the epoch's short last one: the same shape
        assert collator(rows[:2])["input_ids"].shape == collator(rows[2:])["input_ids"].shape == (1, 512)
    finally:
        _Args.max_length, _Args.batch_size = 64, 1


def test_fused_lora_and_selective_recompute_levers_apply_and_undo():
    model = tiny_model("gemma2")
    fast = FastPath(fused_lora=True, selective_recompute=True)
    fast.decide(model.get_base_model().config, "cpu", _Args())
    assert fast.prepare_model(model) == ["fused LoRA-A", "selective recomputation"]
    assert sum("forward" in m.__dict__ for m in model.modules()) == 2 * (3 + 2 + 4 + 1)
    fast.restore_model(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    # by default the levers go with compilation (on a GPU): the configuration measured on the H200
    plain = FastPath()
    plain.decide(model.get_base_model().config, "cpu", _Args())
    assert plain.prepare_model(model) == []
    compiled = FastPath(compile=True)
    compiled.decide(model.get_base_model().config, "cpu", _Args())
    assert compiled.prepare_model(model) == ["fused LoRA-A", "selective recomputation",
                                             "torch.compile per decoder layer"]
    compiled.restore_model(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    no_fuse = FastPath(compile=True, fused_lora=False)
    no_fuse.decide(model.get_base_model().config, "cpu", _Args())
    assert no_fuse.prepare_model(model) == ["selective recomputation", "torch.compile per decoder layer"]
    no_fuse.restore_model(model)


def test_checkpoint_planner_leaves_out_what_memory_allows(zhtune_log):
    from zhtune.train.memory_plan import CheckpointPlanner, keeping_peak, plan_checkpointed_layers
    gib = 2**30
    # Gemma-2-9B on one H200 (RESULTS.md): 23.5 GiB with all 42 checkpointed, +1.57 GiB per layer left out
    assert plan_checkpointed_layers(42, 23.5, 23.5 + 4 * 1.57, 4, 72.0) == (12, 0)
    assert plan_checkpointed_layers(42, 23.5, 23.5 + 4 * 1.57, 4, 200.0) == (0, 0)
    assert plan_checkpointed_layers(42, 23.5, 23.5 + 4 * 1.57, 4, 20.0) == (42, 0)  # no room: keep every layer
    # with kept MLP outputs (54 MiB each; 22.27 GiB with all checkpointed, +1.21 per layer out): the room goes
    # to keeping first; measured on the H200 (twelfth session): the first 25 keeping peaked at 23.88 GiB, 26 would
    # pass 24 by the backward of the last keeping layer (about one un-checkpointed layer's worth more, less the
    # later layers' saved inputs)
    plan = functools.partial(plan_checkpointed_layers, 42, 22.27, 22.27 + 4 * 1.21, 4, keep_cost=0.054)
    assert plan(24.0) == (42, 25)
    assert keeping_peak(25, 42, 1.21, 0.054) <= 24.0 - 22.27 < keeping_peak(26, 42, 1.21, 0.054)
    assert plan(23.0) == (42, 13)  # the first 13: their backward runs when 29 later layers' inputs are freed
    assert plan(22.3) == (42, 0)  # room for no kept output
    assert plan(30.0) == (39, 39)  # every checkpointed layer keeps it, and 3 go un-checkpointed
    assert plan(80.0) == (0, 0)

    class Memory:  # what torch.cuda reports, for a 4-layer model: 10 GiB with all checkpointed, +1 per layer
        def __init__(self):
            self.resets = 0

        def peak(self):
            layers = decoder_layers(model)
            return (10 + sum(not layer.gradient_checkpointing for layer in layers)) * gib

        def reset_peak(self):
            self.resets += 1

        def total(self):
            return 15 * gib  # budget 80%: 12 GiB -> 2 layers may go un-checkpointed

    from zhtune.models.parts import decoder_layers
    model = tiny_model("gemma2", layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    memory = Memory()
    planner = CheckpointPlanner(model, probe=2, memory=memory)
    state = type("State", (), {"global_step": 1})()
    planner.on_step_begin(None, state, None)
    planner.on_step_end(None, state, None)  # step 1: measured with all 4, then 2 fewer
    assert sum(layer.gradient_checkpointing for layer in decoder_layers(model)) == 2 and not zhtune_log.messages
    state.global_step = 2
    planner.on_step_begin(None, state, None)
    assert memory.resets == 1
    planner.on_step_end(None, state, None)
    assert sum(layer.gradient_checkpointing for layer in decoder_layers(model)) == 2
    lines = zhtune_log.messages
    assert len(lines) == 1 and "2 of 4 decoder layers checkpointed from step 3" in lines[0]
    planner.on_step_end(None, state, None)  # later steps change nothing
    assert len(zhtune_log.messages) == 1

    # --memory_budget_gib 13: 3 layers may go un-checkpointed, whatever the GPU's size
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = True
    planner = CheckpointPlanner(model, probe=2, memory=memory, budget_gib=13)
    for step in (1, 2):
        state.global_step = step
        planner.on_step_begin(None, state, None)
        planner.on_step_end(None, state, None)
    assert sum(layer.gradient_checkpointing for layer in decoder_layers(model)) == 1
    assert "1 of 4 decoder layers checkpointed" in zhtune_log.messages[-1]
    assert "budget 13 GiB = --memory_budget_gib" in zhtune_log.messages[-1]

    # a budget under the all-checkpointed peak: no probe step (it would go over), every layer stays checkpointed
    set_checkpointed_layers(model, 4)
    planner = CheckpointPlanner(model, memory=memory, budget_gib=9.5)
    state.global_step = 1
    planner.on_step_begin(None, state, None)
    planner.on_step_end(None, state, None)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert "all 4 decoder layers checkpointed (peak 10.0 GiB, budget 9.5 GiB: no room" in zhtune_log.messages[-1]
    planner.on_step_end(None, state, None)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))

    # kept MLP outputs of 0.25 GiB: 1.6 GiB of room holds 3 of them, in the first layers (the third's backward
    # holds 1 GiB more, less the fourth layer's freed input: 0.75 + 0.75), not 4 (1.0 + 1.0)
    from zhtune.train.recompute import keeps_mlp_output
    set_checkpointed_layers(model, 4)
    planner = CheckpointPlanner(model, probe=2, memory=memory, budget_gib=11.6, keep_cost=0.25 * gib)
    for step in (1, 2):
        state.global_step = step
        planner.on_step_begin(None, state, None)
        planner.on_step_end(None, state, None)
    layers = decoder_layers(model)
    assert [keeps_mlp_output(layer) for layer in layers] == [True, True, True, False]
    assert [layer.gradient_checkpointing for layer in layers] == [False, False, False, True]
    assert "4 of 4 decoder layers checkpointed, the first 3 keeping their MLP output" in zhtune_log.messages[-1]


def test_token_counts_leave_out_padding():
    from zhtune.train.packing import count_tokens
    items = samples([20, 11], prompt_share=0.5)
    packed = PackedCollator(pad_id=0, pad_to_multiple_of=128)(pack_encoded(items, 64))
    assert packed["input_ids"].shape == (1, 128)
    assert count_tokens(packed, pad_id=0) == (31, n_targets(items))
    padded = PaddedCollator()([{"input_ids": e.input_ids, "labels": e.labels} for e in items])
    assert count_tokens(padded, pad_id=0) == (31, n_targets(items))


# -- flex_attention's measured tiles -------------------------------------------------------------------

def test_flex_kernel_options_only_where_measured(monkeypatch):
    """The measured tiles go to head_dim 256 in bf16/fp16 under flex_attention on compute capability 9.0;
    every other case keeps inductor's default (None)."""
    from types import SimpleNamespace

    from zhtune.train.flex_kernels import MEASURED, training_kernel_options
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    gemma = SimpleNamespace(_attn_implementation="flex_attention", head_dim=256, hidden_size=3584,
                            num_attention_heads=16)
    options = training_kernel_options(gemma, "cuda:0", torch.bfloat16)
    assert options == MEASURED[((9, 0), 256)] and options is not MEASURED[((9, 0), 256)]
    assert options["bwd_num_warps"] == 8 and options["fwd_BLOCK_M"] == 128
    assert training_kernel_options(gemma, "cuda", torch.float16) == options
    assert training_kernel_options(gemma, "cuda:0", torch.float32) is None
    assert training_kernel_options(gemma, "cpu", torch.bfloat16) is None
    qwen = SimpleNamespace(_attn_implementation="flex_attention", head_dim=None, hidden_size=1536,
                           num_attention_heads=12)  # head_dim 128
    assert training_kernel_options(qwen, "cuda:0", torch.bfloat16) is None
    sdpa = SimpleNamespace(**{**vars(gemma), "_attn_implementation": "sdpa"})
    assert training_kernel_options(sdpa, "cuda:0", torch.bfloat16) is None
    monkeypatch.setenv("ZHTUNE_FLEX_TILES", "0")  # the user's way back to inductor's default
    assert training_kernel_options(gemma, "cuda:0", torch.bfloat16) is None
    monkeypatch.delenv("ZHTUNE_FLEX_TILES")
    capability["value"] = (8, 0)  # A100: not measured
    assert training_kernel_options(gemma, "cuda:0", torch.bfloat16) is None


def test_flash_backend_only_where_measured_installed_and_masks_built(monkeypatch):
    """FlashAttention-4's backend (kernel_options BACKEND FLASH) is chosen on compute capability 9.0 with
    head_dim 256, with flash-attn-4 importable, on packed rows, for models of full/sliding layers only;
    otherwise the measured Triton tiles; ZHTUNE_FLEX_FLASH=0 keeps the tiles."""
    from types import SimpleNamespace

    import zhtune.train.flex_kernels as flex_kernels
    from zhtune.train.flex_kernels import FLASH, MEASURED, flash_kv_block, training_kernel_options
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    installed = {"value": True}
    monkeypatch.setattr(flex_kernels, "flash_installed", lambda: installed["value"])
    gemma = SimpleNamespace(_attn_implementation="flex_attention", head_dim=256, hidden_size=3584,
                            num_attention_heads=16, sliding_window=4096,
                            layer_types=["sliding_attention", "full_attention"] * 21)
    tiles = MEASURED[((9, 0), 256)]
    assert training_kernel_options(gemma, "cuda:0", torch.bfloat16) == FLASH
    assert flash_kv_block(gemma, "cuda:0") == 64
    assert training_kernel_options(gemma, "cuda:0", torch.bfloat16, packed=False) == tiles
    assert training_kernel_options(gemma, "cuda:0", torch.float32) is None
    chunked = SimpleNamespace(**{**vars(gemma), "layer_types": ["chunked_attention", "full_attention"]})
    assert training_kernel_options(chunked, "cuda:0", torch.bfloat16) == tiles  # no mask of ours for it
    monkeypatch.setenv("ZHTUNE_FLEX_FLASH", "0")
    assert training_kernel_options(gemma, "cuda:0", torch.bfloat16) == tiles
    monkeypatch.delenv("ZHTUNE_FLEX_FLASH")
    installed["value"] = False
    assert training_kernel_options(gemma, "cuda:0", torch.bfloat16) == tiles


def test_flash_document_masks_train_as_transformers_own_masks(monkeypatch):
    """Under the FLASH backend the fast path builds the packed rows' document masks itself (key blocks of 64):
    through the model (a sliding layer with a window shorter than the samples, and a full layer), the loss and
    gradients equal those under transformers' own masks. On the CPU the spy runs eager attention on the
    BlockMask made dense."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask
    from transformers.models.gemma2 import modeling_gemma2

    import zhtune.train.flex_kernels as flex_kernels
    eager = modeling_gemma2.eager_attention_forward
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        if isinstance(attention_mask, BlockMask):
            seen.append((attention_mask.BLOCK_SIZE, kwargs.get("kernel_options")))
            b, _, q_len, kv_len = attention_mask.shape
            dense = create_mask(attention_mask.mask_mod, b, 1, q_len, kv_len, device=query.device)
            attention_mask = torch.zeros(dense.shape, dtype=query.dtype).masked_fill(~dense, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", spy)
    monkeypatch.setattr(flex_kernels, "training_kernel_options",
                        lambda config, device, dtype, packed=True: dict(flex_kernels.FLASH) if packed else None)
    monkeypatch.setattr(flex_kernels, "flash_kv_block", lambda config, device: 64)
    model = tiny_model("gemma2")
    model.get_base_model().config.sliding_window = 6
    assert set(model.get_base_model().config.layer_types) == {"sliding_attention", "full_attention"}
    items = samples([30, 21, 9, 40])
    results = {}
    for flash in (True, False):
        fast = FastPath(flex_kernels=True, flash_attention=flash)
        rows, collator = fast.prepare_data(items, _Args())
        batch = collator(rows[:1])
        model.zero_grad()
        loss = fast.compute_loss(model, batch)
        loss.backward()
        results[flash] = (float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    n_layers = model.get_base_model().config.num_hidden_layers
    assert seen == [((128, 64), {"BACKEND": "FLASH"})] * n_layers, seen
    assert abs(results[True][0] - results[False][0]) < 1e-6
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)


def test_compute_loss_hands_the_tiles_to_every_layers_attention(monkeypatch):
    """Through PEFT and transformers' forward, kernel_options reach each decoder layer's attention call
    (where flex_attention reads them); the loss is the same, and with the lever off nothing is passed."""
    from transformers.models.gemma2 import modeling_gemma2

    import zhtune.train.flex_kernels as flex_kernels
    seen = []
    eager = modeling_gemma2.eager_attention_forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return eager(*args, **kwargs)
    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", spy)
    monkeypatch.setattr(flex_kernels, "training_kernel_options",
                        lambda config, device, dtype, packed=True: {"fwd_BLOCK_M": 128})
    model = tiny_model("gemma2")
    items = samples([9, 14])
    losses = {}
    for lever in (True, False):
        fast = FastPath(flex_kernels=lever)
        rows, collator = fast.prepare_data(items, _Args())
        seen.clear()
        with torch.no_grad():
            losses[lever] = float(fast.compute_loss(model, collator(rows)))
        n_layers = model.get_base_model().config.num_hidden_layers
        assert seen == ([{"fwd_BLOCK_M": 128}] * n_layers if lever else [None] * n_layers), seen
    assert losses[True] == losses[False]
    assert "flex_attention tiles measured for this GPU" in FastPath(flex_kernels=True).prepare_model(model)


def test_levers_and_sharded_mode_train_the_same_trajectory():
    """Eight AdamW steps (clipped, as Trainer does) from the same LoRA weights: the fast path with its CPU
    levers (fused LoRA-A, selective recomputation) and its ZeRO-3 / FSDP mode (transformers' loss on full
    logits) follow the plain fast path's losses (dropout off: the fused LoRA-A shares one mask per group)."""
    def train(deepspeed=None, levers=False):
        model = tiny_model("gemma2", seed=0)
        args = type("Args", (_Args,), {"deepspeed": deepspeed})()
        fast = FastPath(chunk_size=16, fused_lora=levers, selective_recompute=levers)
        assert fast.decide(model.get_base_model().config, "cpu", args)[0]
        applied = fast.prepare_model(model)
        assert ("fused LoRA-A" in applied) is levers
        rows, collator = fast.prepare_data(samples([5, 17, 9, 30, 12, 3, 21, 40, 11, 25, 8, 19] * 2), args)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
        losses = []
        for step in range(8):
            loss = fast.compute_loss(model, collator([rows[step % len(rows)]]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    plain = train()
    assert plain[-1] != plain[0]
    assert train(levers=True) == pytest.approx(plain, abs=1e-4)
    assert train(deepspeed="default-zero3") == pytest.approx(plain, abs=1e-4)
