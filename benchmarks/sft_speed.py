"""Speed, memory and exactness of `zhtune sft`'s training step on Gemma-2-9B: what a plain transformers +
PEFT user runs (per sample, packed with eager attention, and the best HF setup) beside the fast path and
its levers, on identical data, in one run.

    python benchmarks/sft_speed.py                      # one GPU: every variant below, in this order
    torchrun --nproc_per_node 4 benchmarks/sft_speed.py --variants chunked_nocast  # DDP scaling
    python benchmarks/sft_speed.py --smoke              # tiny Gemma 2 on the CPU, seconds
    python benchmarks/sft_speed.py --variants hf_best,compiled_fused_selective_closs_hashdrop --rounds 3
                                                        # each timed 3 times in turn: the ratio's spread
    bash scripts/gpu_train_speed.sh                     # the GPU run of issue 16 (wheels, variants, engines)

Model: the real Gemma-2-9B config (below), random weights made on the GPU in bf16. The seed's LoRA
settings: r=8, alpha=32, dropout 0.05 on every nn.Linear of the decoder, on embed_tokens and on the
(tied) lm_head; every Gemma2RMSNorm trained. The norms are trained by setting their weights'
requires_grad, not through PEFT's modules_to_save (which would copy each of the 169 norms and wrap
it; the gradients are the same). lora_B starts from N(0, 0.02) instead of zeros, as after some
training, so that every LoRA matrix gets a non-zero gradient for the agreement check.

Data: samples whose (tokens, trained tokens) are those of the 1000 rows of alpaca_zh_demo under the
Gemma tokenizer and chat template (benchmarks/alpaca_zh_lengths.json; mean 142 tokens), plus 40 long
samples of 1024..8192 tokens (log-uniform, half trained), random token ids. They are packed
(best-fit decreasing) into rows of --max_length, and --packs rows are drawn: the baseline trains on
their samples one by one (the seed's batch_size 1; --baseline_batch_size pads several; --baseline_rows
times only the samples of the first N rows, the baseline being slow), every other variant on the packed
rows. Tokens/s counts real tokens only (never padding).

Variants (each timed after a warm-up step; results in benchmarks/RESULTS.md). Every layer is
checkpointed (the seed's --gradient_checkpointing true) unless the variant says otherwise.
  What a transformers + PEFT user runs:
    baseline        per-sample batches (the seed's batch_size 1), eager attention, full logits, transformers' loss
    eager_packed    the fast path's packed rows (position_ids, document masks), eager attention, full logits,
                    transformers' loss
    hf_best         a careful HF user: attn_implementation="flex_attention", padding-free rows from transformers'
                    DataCollatorWithFlattening (position_ids; the row padded to a multiple of 128 with one dummy
                    sequence, without which transformers' flex packed mask reads past the row), liger-kernel's
                    Gemma 2 kernels that keep the seed's LoRA: RoPE, RMSNorm, GeGLU and cross-entropy. Not liger's
                    fused linear cross-entropy: it supports final_logit_softcapping but multiplies the hidden states
                    by `lm_head.weight`, which under PEFT is the frozen base weight, so the LoRA on the (tied)
                    lm_head would get no gradient and add nothing to the logits. GPU only (liger needs Triton).
  The fast path and its levers:
    packed_full     packing + flex_attention (softcap score_mod, document masks), full logits + transformers' loss
    chunked         + chunked softcapped loss (no full logits; lm_head only on trained tokens)
    chunked_nocast  + PEFT's LoRA inputs left in bf16 (no fp32 copy; bf16 autocast does the matmul either way)
    mem_lean        chunked_nocast with loss chunks of 256 tokens instead of 1024 (less memory for the logits)
    ckpt_auto       chunked_nocast + only as many layers checkpointed as --mem_budget_gib needs (measured)
    fused_lora      chunked_nocast + fused LoRA-A for q/k/v and gate/up (zhtune/train/fused_lora.py)
    selective       chunked_nocast + selective recomputation in the layers not checkpointed whole (norms, GeGLU
                    activation and down_proj's LoRA input recomputed; zhtune/train/recompute.py) + ckpt_auto's plan
    fused_selective fused_lora + selective (+ the plan)
    closs           chunked_nocast + the chunked loss's per-chunk arithmetic through torch.compile (compile_loss)
    compiled_all    chunked_nocast + torch.compile of each decoder layer (regional), every layer checkpointed
    compiled        compiled_all + only as many layers checkpointed as --mem_budget_gib needs (planned compiled)
    compiled_nockpt compiled_all with no layer checkpointed (no recomputation; needs ~90 GiB: an H200, not an H100)
    compiled_fused_all        compiled_all + fused LoRA-A (selective recomputation on, but idle: every layer is
                              checkpointed whole)
    compiled_fused_selective  compiled + fused LoRA-A + selective recomputation (+ the plan)
    compiled_fused_all_closs, compiled_fused_selective_closs
                              the two above + the chunked loss's per-chunk arithmetic through torch.compile
                              (FastPath.compile_loss: its ~10 elementwise fp32 passes over the logits fused)
    compiled_fused_all_closs_keepmlp, compiled_fused_all_closs_keepmlpN (N: any count, e.g. keepmlp24)
                              compiled_fused_all_closs, all 42 (the first N) checkpointed layers keeping their
                              MLP's output: the backward skips the down projection's matmul there (56 MiB each)
    compiled_fused_all_closs_chunkM, compiled_fused_all_closs_keepmlpN_chunkM
                              the same with loss chunks of M tokens (default --chunk_size)
    compiled_fused_plan24_closs
                              compiled_fused_selective_closs with zhtune's plan for 24 GiB (--memory_budget_gib 24)
    compiled_fused_selective_closs_stockflex, compiled_fused_selective_closs_tritonflex
                              compiled_fused_selective_closs with inductor's default flex_attention kernels, or
                              with the measured Triton tiles where the fast path would run flex_attention's
                              FlashAttention-4 backend (flash-attn-4 installed; without it every fast variant
                              runs those tiles; zhtune/train/flex_kernels.py)
    <any variant>_hashdrop    the same with LoRA dropout's masks hashed from element indices (zhtune/train/
                              hash_dropout.py; what `zhtune sft` runs wherever its layers compile)
    <any variant>_nodrop      the same with LoRA dropout off: not the seed's setting, the ceiling of any cheaper
                              dropout
All run under bf16 autocast, as transformers' Trainer does with bf16=True. The optimizer step (AdamW
on ~32M LoRA parameters, a few ms) is outside the timed region for every variant alike. The variants
that end with transformers' loss (baseline, eager_packed, hf_best, packed_full) keep PEFT's default
fp32 cast of LoRA inputs, as a user gets it.

Exactness: the reference is the baseline (per sample, eager, transformers' loss) on the first packed
row, dropout off. Every other variant computes the same row in its own form, dropout off, and its
`check` reports |loss - reference| and the cosine of all trainable gradients (LoRA + norms) and of the
LoRA ones alone (--check_compiled false skips it for the compiled variants: changing dropout's p
recompiles their layers).

FLOPs per token (model FLOPs, recomputation not counted), for utilisation against 989 TFLOP/s:
    decoder linear: 2 * L * (H*(Q + 2*KV) + Q*H + 3*H*I) per token forward, with Q = heads*head_dim,
            KV = kv_heads*head_dim; lm_head: 2 * H * V per token it runs on: every token for the
            variants with full logits (baseline, eager_packed, hf_best, packed_full), the trained tokens
            only for the chunked loss (the others; 77% of the tokens on this mix: 37.3 instead of 38.2
            GFLOP/token with attention); training with frozen base weights = forward + input
            gradients = 2x.
    attention: 4 * heads * head_dim * (keys attended) per token per layer forward (QK^T and PV),
            keys attended = position in its own sample + 1, at most sliding_window on sliding layers;
            training = 3x forward (backward computes dQ, dK, dV). Eager attention computes the masked
            scores of the whole row too; model FLOPs count only the useful ones.
    LoRA and norm FLOPs (< 1%) are left out. For Gemma-2-9B the decoder linear term is 33.3 GFLOP/token
    and the lm_head 3.7 GFLOP per token it runs on (36.9 with the lm_head on every token).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_profile, gemma2_9b

from zhtune.log import setup_logging  # noqa: E402
import gemma2_9b  # noqa: E402
from kernel_profile import device_profile  # noqa: E402
from zhtune.train.fast_path import (FastPath, compile_decoder_layers, set_checkpointed_layers,  # noqa: E402
                                    set_lora_input_casting)
from zhtune.train.fused_lora import fuse_lora_projections, unfuse_lora_projections  # noqa: E402
from zhtune.train.fold_lora import fold_lora_b, unfold_lora_b  # noqa: E402
from zhtune.train.hash_dropout import set_hash_dropout  # noqa: E402
from zhtune.train.memory_plan import PROBE_LAYERS, mlp_output_bytes, plan_checkpointed_layers  # noqa: E402
from zhtune.train.packing import (FLEX_BLOCK, IGNORE_INDEX, PackedCollator, PaddedCollator,  # noqa: E402
                                  pack_encoded)
from zhtune.train.recompute import set_selective_recomputation  # noqa: E402

GEMMA2_9B = dict(gemma2_9b.ARCHITECTURE, **gemma2_9b.CONFIG)
SMOKE = dict(GEMMA2_9B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
LORA_DROPOUT = 0.05  # the seed's (ms-swift's default); set back after every dropout-0 check and _nodrop variant
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]

# What each variant changes from the fast path's defaults (packed rows, the fast attention, chunked loss,
# bf16 LoRA inputs, every layer checkpointed); the order is the default run order.
DEFAULT_SPEC = dict(data="packed", attn="fast", loss="chunked", chunk=None, cast=False, fused=False, selective=False,
                    compiled=False, ckpt="all", liger=False, closs=False, fp8=None, flex=None, flash=True, keep=0,
                    budget=None, dropout=None, fp8_once=True, fp8_fast=True, fp8_head=False, fold=False)
VARIANT_SPECS = {
    "baseline": dict(data="samples", attn="eager", loss="full", cast=True),
    "eager_packed": dict(attn="eager", loss="full", cast=True),
    "hf_best": dict(data="flattened", loss="full", cast=True, liger=True),
    "packed_full": dict(loss="full", cast=True),
    "chunked": dict(cast=True),
    "chunked_nocast": dict(),
    "mem_lean": dict(chunk=256),
    "ckpt_auto": dict(ckpt="plan"),
    "fused_lora": dict(fused=True),
    "selective": dict(selective=True, ckpt="plan"),
    "fused_selective": dict(fused=True, selective=True, ckpt="plan"),
    "closs": dict(closs=True),
    "compiled_all": dict(compiled=True),
    "compiled": dict(compiled=True, ckpt="plan"),
    "compiled_nockpt": dict(compiled=True, ckpt="none"),
    # selective recomputation acts in the layers not checkpointed whole: none in compiled_fused_all, where it
    # is on only so that compiled_fused_selective's graphs of checkpointed layers serve it too
    "compiled_fused_all": dict(compiled=True, fused=True, selective=True),
    "compiled_fused_selective": dict(compiled=True, fused=True, selective=True, ckpt="plan"),
    # + the chunked loss's per-chunk arithmetic compiled (FastPath.compile_loss; zhtune/train/loss.py)
    "compiled_fused_all_closs": dict(compiled=True, fused=True, selective=True, closs=True),
    "compiled_fused_selective_closs": dict(compiled=True, fused=True, selective=True, ckpt="plan", closs=True),
    # every layer checkpointed, and `keep` of them keep their MLP's output (zhtune/train/recompute.py): the
    # backward skips the down projection there, for 56 MiB a layer (9B config, 8192 tokens)
    "compiled_fused_all_closs_keepmlp": dict(compiled=True, fused=True, selective=True, closs=True, keep=42),
    # zhtune's plan (what `zhtune sft --memory_budget_gib 24` does) within 24 GiB
    "compiled_fused_plan24_closs": dict(compiled=True, fused=True, selective=True, closs=True, ckpt="plan", budget=24),
    # + LoRA-B folded into the frozen projection's matmul ([x | a] @ [W | s·B]ᵀ; zhtune/train/fold_lora.py):
    # 1.00x on the H200 (fifteenth session), so not in `zhtune sft`
    "compiled_fused_selective_closs_fold": dict(compiled=True, fused=True, selective=True, ckpt="plan", closs=True,
                                                fold=True),
    # the same with inductor's default flex_attention tiles (FastPath.flex_kernels off; zhtune/train/flex_kernels.py)
    "compiled_fused_selective_closs_stockflex": dict(compiled=True, fused=True, selective=True, ckpt="plan",
                                                     closs=True, flex=False),
    # the same with the measured Triton tiles where flex_attention's FlashAttention-4 backend would run (flash-attn-4
    # installed: FastPath.flash_attention off; without it every variant runs these tiles)
    "compiled_fused_selective_closs_tritonflex": dict(compiled=True, fused=True, selective=True, ckpt="plan",
                                                      closs=True, flash=False),
    # not exact: the frozen base linears multiply in float8 (`zhtune sft --fp8 true`, zhtune/train/fp8.py), with
    # torchao's per-row scales or one scale per tensor (zhtune's default since the ninth session's measurement)
    "compiled_fused_selective_closs_fp8": dict(compiled=True, fused=True, selective=True, ckpt="plan", closs=True,
                                               fp8="rowwise"),
    "compiled_fused_selective_closs_fp8_tensorwise": dict(compiled=True, fused=True, selective=True, ckpt="plan",
                                                          closs=True, fp8="tensorwise"),
    # tensorwise with torchao's Float8Linear, the weight cast at every call (zhtune's default until the fourteenth
    # session; since then Float8FrozenLinear: the frozen weights cast once, their bf16 in host memory, the input
    # gradient's matmul with fast float8 accumulation)
    "compiled_fused_selective_closs_fp8_tensorwise_percall": dict(compiled=True, fused=True, selective=True,
                                                                  ckpt="plan", closs=True, fp8="tensorwise",
                                                                  fp8_once=False),
    # cast once, but the input-gradient matmuls accumulating as torchao's (precisely: no fast accumulation)
    "compiled_fused_selective_closs_fp8_tensorwise_precisegi": dict(compiled=True, fused=True, selective=True,
                                                                    ckpt="plan", closs=True, fp8="tensorwise",
                                                                    fp8_fast=False),
    # cast once, the lm_head's frozen weight in float8 too (ZHTUNE_FP8_LM_HEAD=1; named `…_tensorwise` in the
    # fifteenth session's call 2, where the bf16 head was `…_tensorwise_bf16head`)
    "compiled_fused_selective_closs_fp8_tensorwise_head": dict(compiled=True, fused=True, selective=True,
                                                               ckpt="plan", closs=True, fp8="tensorwise",
                                                               fp8_head=True),
    # scales from the last 16 micro-batches' amax (TransformerEngine's delayed scaling): one pass over each input
    "compiled_fused_selective_closs_fp8_delayed": dict(compiled=True, fused=True, selective=True, ckpt="plan",
                                                       closs=True, fp8="delayed"),
    "compiled_fused_all_closs_fp8": dict(compiled=True, fused=True, selective=True, closs=True, fp8="rowwise"),
    "compiled_fused_all_closs_fp8_tensorwise": dict(compiled=True, fused=True, selective=True, closs=True,
                                                    fp8="tensorwise"),
}
# any variant + _hashdrop: LoRA dropout with hashed masks (zhtune/train/hash_dropout.py); + _nodrop: LoRA dropout
# off (not the seed's setting: the ceiling of what any cheaper dropout can give)
DROPOUT_SUFFIXES = {"_hashdrop": "hash", "_nodrop": 0.0}
VARIANTS = list(VARIANT_SPECS)
# --fp8_curve's float8 curves by name: apply_fp8's arguments
FP8_CURVES = {"rowwise": dict(recipe="rowwise"), "tensorwise": dict(recipe="tensorwise"),
              "tensorwise_precisegi": dict(recipe="tensorwise", fast_grad_input=False),
              "tensorwise_percall": dict(recipe="tensorwise", cast_once=False),
              "tensorwise_head": dict(recipe="tensorwise", lm_head=True), "delayed": dict(recipe="delayed")}
REFERENCES = ("baseline", "eager_packed", "hf_best")  # the results report x each of these
H100_BF16_PEAK = 989e12
LENGTHS = Path(__file__).resolve().parent / "alpaca_zh_lengths.json"


# compiled_fused_all_closs with the first N checkpointed layers keeping their MLP output and/or loss chunks of M
# tokens: compiled_fused_all_closs_keepmlpN, ..._chunkM, ..._keepmlpN_chunkM
KEEP_N = re.compile(r"compiled_fused_all_closs(?:_keepmlp(\d+))?(?:_chunk(\d+))?")


def split_dropout_suffix(name: str) -> tuple[str, str | float | None]:
    """(the variant without a DROPOUT_SUFFIXES suffix, that suffix's dropout or None)."""
    for suffix, dropout in DROPOUT_SUFFIXES.items():
        if name.endswith(suffix):
            return name[:-len(suffix)], dropout
    return name, None


def known_variant(name: str) -> bool:
    base, _ = split_dropout_suffix(name)
    return base in VARIANT_SPECS or KEEP_N.fullmatch(base) is not None


def spec_of(name: str) -> dict:
    base, dropout = split_dropout_suffix(name)
    if base in VARIANT_SPECS:
        spec = {**DEFAULT_SPEC, **VARIANT_SPECS[base]}
    else:
        keep, chunk = KEEP_N.fullmatch(base).groups()
        spec = {**DEFAULT_SPEC, **VARIANT_SPECS["compiled_fused_all_closs"], "keep": int(keep or 0),
                "chunk": int(chunk) if chunk else None}
    return {**spec, "dropout": dropout}


# -- model -----------------------------------------------------------------------------------------

def build_model(config: dict, device: str, dtype, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=LORA_DROPOUT, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    gen = torch.Generator(device=device).manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:  # the zero-initialised halves
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)
        if "norm" in name and "lora" not in name:
            p.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def set_attention(model, attn: str):
    model.get_base_model().config._attn_implementation = attn


def set_dropout(model, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def trainable_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel(),
                      device=p.device) for p in model.parameters() if p.requires_grad])


def n_layers_of(model) -> int:
    return len(model.get_base_model().model.layers)


# -- data ------------------------------------------------------------------------------------------

def make_samples(vocab: int, max_length: int, seed: int = 0, scale: float = 1.0, n_long: int = 40) -> list[dict]:
    """The training mix: alpaca_zh lengths plus long samples, random token ids."""
    rng = random.Random(seed)
    shapes = json.loads(LENGTHS.read_text())["samples"]
    shapes = [(max(2, int(n * scale)), max(1, int(t * scale))) for n, t in shapes]
    lo, hi = math.log(max_length / 8), math.log(max_length)
    for _ in range(n_long):
        n = int(math.exp(rng.uniform(lo, hi)))
        shapes.append((n, n // 2))
    samples = []
    for n, trained in shapes:
        n = min(n, max_length)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = n - min(trained, n - 1)
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def split_row(row: dict) -> list[dict]:
    """A packed row back into its samples (for the per-sample baseline on the same tokens)."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [{"input_ids": row["input_ids"][a:b], "labels": [IGNORE_INDEX] + row["labels"][a + 1:b]}
            for a, b in zip(starts, starts[1:])]


def trained_count(labels) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def hf_flattened(docs: list[dict], pad_id: int = 0, multiple: int = FLEX_BLOCK) -> dict:
    """One padding-free row from transformers' own DataCollatorWithFlattening (input_ids, labels with
    -100 at each sequence start, position_ids restarting per sequence), then one dummy sequence of pad
    tokens (untrained) up to a multiple of flex_attention's block: without it transformers' packed-
    sequence mask function reads position_ids past the row's end (see zhtune/train/packing.py)."""
    from transformers import DataCollatorWithFlattening
    batch = DataCollatorWithFlattening(return_tensors="pt")([dict(d) for d in docs])
    pad = -batch["input_ids"].shape[1] % multiple
    if pad:
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, pad), pad_id)], dim=1)
        batch["labels"] = torch.cat([batch["labels"], torch.full((1, pad), IGNORE_INDEX)], dim=1)
        batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(pad)[None]], dim=1)
    return {k: batch[k].long() for k in ("input_ids", "labels", "position_ids")}


class Workload:
    """The batches of one data form, and what they hold: real tokens, the lengths of their samples
    (for attention FLOPs) and the tokens with a label (where the chunked loss runs the lm_head)."""

    def __init__(self, batches: list[dict], docs: list[dict], check_batch: dict):
        self.batches = batches
        self.check_batch = check_batch
        self.doc_lengths = [len(d["input_ids"]) for d in docs]
        self.tokens = sum(self.doc_lengths)
        self.trained = sum(trained_count(d["labels"]) for d in docs)


# -- FLOPs -----------------------------------------------------------------------------------------

def model_flops(cfg: dict, docs: list[int], head_tokens: int | None = None) -> float:
    """Training model FLOPs for samples of these lengths, the lm_head running on `head_tokens` of
    them (None: on every token). See the module docstring."""
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    Q, KV = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    decoder = 2 * L * (H * (Q + 2 * KV) + Q * H + 3 * H * I)
    head = 2 * H * V
    tokens = sum(docs)
    head_tokens = tokens if head_tokens is None else head_tokens
    window = cfg.get("sliding_window") or 10**9
    keys_full = sum(n * (n + 1) / 2 for n in docs)
    keys_sliding = sum(_keys_sliding(n, window) for n in docs)
    n_sliding = L // 2  # Gemma 2 alternates sliding and full layers
    attn = 4 * Q * (keys_full * (L - n_sliding) + keys_sliding * n_sliding)
    return 2 * (decoder * tokens + head * head_tokens) + 3 * attn


def _keys_sliding(n: int, w: int) -> float:
    m = min(n, w)
    return m * (m + 1) / 2 + (n - m) * w


def gpu_state() -> str | None:
    """SM clock, power draw and temperature now (nvidia-smi), to tell a throttled GPU from a slow variant."""
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader",
                               "-i", str(torch.cuda.current_device())], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- steps -----------------------------------------------------------------------------------------

def baseline_step(model, batch, num_items=None):
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False, **kwargs)
    out.loss.backward()
    return out.loss.detach()


def packed_full_step(model, batch, num_items=None):
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False, **kwargs)
    out.loss.backward()
    return out.loss.detach()


def make_chunked_step(fast: FastPath):
    def step(model, batch, num_items=None):
        loss = fast.compute_loss(model, batch, num_items_in_batch=num_items)
        loss.backward()
        return loss.detach()
    return step


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


def run_steps(model, step, batches, device, autocast, timer: Timer, warmup: int = 1):
    """(seconds for the timed batches, peak GiB over warm-up and timed steps)."""
    timer.reset_peak()
    for batch in batches[:warmup]:
        with autocast():
            step(model, to_device(batch, device))
        model.zero_grad(set_to_none=True)
    timer.sync()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        with autocast():
            step(model, to_device(batch, device))
        model.zero_grad(set_to_none=True)
    timer.sync()
    return time.perf_counter() - start, timer.peak_gib()


# -- the run ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny Gemma 2 on the CPU")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--max_length", type=int, default=8192)
    ap.add_argument("--packs", type=int, default=4, help="packed rows of data (per process)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes over the fast path's rows")
    ap.add_argument("--slow_repeat", type=int, default=1, help="timed passes for eager_packed and hf_best")
    ap.add_argument("--baseline_batch_size", type=int, default=1)
    ap.add_argument("--baseline_rows", type=int, default=None, help="time the baseline on the samples of the "
                    "first N rows only (default: all --packs rows)")
    ap.add_argument("--chunk_size", type=int, default=1024)
    ap.add_argument("--mem_budget_gib", type=float, default=80.0, help="the planned variants' memory budget (the issue's 80 GiB)")
    ap.add_argument("--check", default="true", choices=["true", "false"], help="exactness check of every variant")
    ap.add_argument("--profile", default="", help="comma-separated variants to profile for one more step "
                    "(torch.profiler): device time by kind of kernel (matmul, attention, compiled, eager elementwise) "
                    "and the top kernels, in the log and the JSON")
    ap.add_argument("--check_compiled", default="true", choices=["true", "false"],
                    help="also check the compiled variants (recompiles their layers once for dropout 0)")
    ap.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the compiled variants "
                    "(aot_eager: the same graphs without code generation, for a CPU check of the flow)")
    ap.add_argument("--time_budget_s", type=float, default=400.0, help="skip variants that would start later")
    ap.add_argument("--rounds", type=int, default=1, help="time every variant this many times, in turn (one process, "
                    "one GPU): tokens/s and ratios per round, their median; checks and profiles in the first round")
    ap.add_argument("--fresh_compile", action="store_true", help="clear torch.compile's caches (torch._dynamo.reset) "
                    "before every variant and round: each then compiles its graphs anew, none left from the variants "
                    "before (variants timed after others ran 10-20%% slower on the H200; cause not found)")
    ap.add_argument("--fp8_curve", type=int, default=0, metavar="N", help="after the variants: N AdamW steps from "
                    "the same LoRA weights in bf16 and with each float8 recipe (the headline levers), and the "
                    "largest relative gap between their per-step losses")
    ap.add_argument("--fp8_curve_recipes", default="rowwise,tensorwise", help="the float8 curves of --fp8_curve, "
                    f"comma-separated, of: {', '.join(FP8_CURVES)}")
    ap.add_argument("--uncompiled_curve", action="store_true", help="with --fp8_curve: first one more bf16 curve "
                    "without the levers (transformers' own loss, no compilation, fused LoRA-A or selective "
                    "recomputation; every layer checkpointed): does the fast path learn as the plain computation?")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    setup_logging()

    world, rank, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), \
        int(os.environ.get("LOCAL_RANK", "0"))
    unknown_curves = set(args.fp8_curve_recipes.split(",")) - set(FP8_CURVES)
    if unknown_curves:
        raise SystemExit(f"--fp8_curve_recipes: unknown {', '.join(sorted(unknown_curves))}; known: "
                         f"{', '.join(FP8_CURVES)}")
    if args.rounds < 1 or (args.rounds > 1 and world > 1):
        raise SystemExit(f"--rounds {args.rounds}: give 1 or more, and more than 1 only in one process")
    t0 = time.perf_counter()
    if args.smoke:
        device, dtype, attn_fast, config = "cpu", torch.float32, "eager", dict(SMOKE)
        args.max_length = min(args.max_length, 256)
        args.packs, args.repeat = min(args.packs, 2), 1
    else:
        device, dtype, attn_fast, config = f"cuda:{local}", torch.bfloat16, "flex_attention", dict(GEMMA2_9B)
        torch.cuda.set_device(local)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else \
        (lambda: torch.autocast("cpu", enabled=False))
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if not known_variant(v)]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}, each also with "
                         f"{' or '.join(DROPOUT_SUFFIXES)} appended")
    if args.smoke and args.variants == ",".join(VARIANTS):
        variants = [v for v in variants if not spec_of(v)["compiled"]]  # inductor on a CPU: minutes
    if args.fp8_curve or any(spec_of(v)["compiled"] for v in variants):  # the curves compile the layers too
        _raise_recompile_limits()  # fused / selective / checkpointed / dropout-0 graphs of one layer code
    timer = Timer(device)
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(local) if cuda else "cpu",
               "world_size": world, "versions": _versions(), "args": vars(args), "variants": {}}
    say(f"[bench] {results['device']} x{world}, {results['versions']}")

    torch.manual_seed(0)
    model = build_model(config, device, dtype, attn_fast)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"[bench] model built in {time.perf_counter() - t0:.1f}s; trainable {trainable / 1e6:.1f}M; "
        f"GPU memory {torch.cuda.memory_allocated() / 2**30 if cuda else 0:.1f} GiB")

    scale = 1.0 if not args.smoke else 0.25
    pool = make_samples(config["vocab_size"], args.max_length, seed=0, scale=scale,
                        n_long=40 if not args.smoke else 6)
    rows = pack_encoded(pool, args.max_length, seed=0)
    rows = rows[rank * args.packs:(rank + 1) * args.packs]
    if len(rows) < args.packs:
        raise SystemExit(f"only {len(rows)} packed rows for rank {rank}; lower --packs")
    docs = [d for r in rows for d in split_row(r)]
    packed = PackedCollator(pad_id=0, pad_to_multiple_of=args.max_length)
    padded = PaddedCollator(pad_id=0)
    b = args.baseline_batch_size
    base_rows = rows[:args.baseline_rows] if args.baseline_rows else rows
    base_docs = [d for r in base_rows for d in split_row(r)]
    workloads = {
        "packed": Workload([packed([r]) for r in rows], docs, packed(rows[:1])),
        "flattened": Workload([hf_flattened(split_row(r)) for r in rows], docs, hf_flattened(split_row(rows[0]))),
        "samples": Workload([padded(base_docs[i:i + b]) for i in range(0, len(base_docs), b)], base_docs, None),
    }
    tokens = workloads["packed"].tokens
    say(f"[bench] data: {len(docs)} samples, {tokens} tokens ({tokens / len(rows) / args.max_length:.1%} of "
        f"{len(rows)} rows of {args.max_length}; {workloads['packed'].trained} trained), longest "
        f"{max(workloads['packed'].doc_lengths)}, "
        f"{model_flops(config, workloads['packed'].doc_lengths) / tokens / 1e9:.1f} GFLOP/token with the lm_head "
        f"on every token, {model_flops(config, workloads['packed'].doc_lengths, workloads['packed'].trained) / tokens / 1e9:.1f} "
        f"on trained tokens only (model FLOPs, training)"
        + (f"; the baseline times the {len(base_docs)} samples of {len(base_rows)} rows" if args.baseline_rows else ""))
    fast = FastPath(chunk_size=args.chunk_size)  # its one line goes to the zhtune logger (stderr)

    class _Args:
        fast_path, packing, deepspeed = (True if args.smoke else None), True, None
    fast.decide(model.get_base_model().config, device, _Args())

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(model, device_ids=[local] if cuda else None, find_unused_parameters=False)

    # -- the exactness reference: the first packed row, per sample, eager, transformers' loss, dropout off
    reference = None
    if world == 1 and args.check == "true" and any(v != "baseline" for v in variants):
        reference = make_reference(model, rows[0], device, autocast, attn_fast)
        results["reference"] = {k: v for k, v in reference.items() if k not in ("grads", "lora_mask")}
        say(f"[bench] reference (first row, {reference['samples']} samples, {reference['trained_tokens']} trained "
            f"tokens, per sample, eager, dropout off): loss {reference['loss']:.5f}")

    for name in variants:
        elapsed = time.perf_counter() - t0
        if elapsed > args.time_budget_s:
            say(f"[bench] {name}: skipped (time budget: {elapsed:.0f}s used of {args.time_budget_s:.0f}s)")
            results["variants"][name] = {"skipped": "time budget"}
            continue
        spec = spec_of(name)
        if spec["liger"] and not cuda:
            say(f"[bench] {name}: skipped on the CPU (liger-kernel's kernels need Triton on a GPU, and "
                "flex_attention has no CPU backward)")
            results["variants"][name] = {"skipped": "needs a GPU"}
            continue
        work = workloads[spec["data"]]

        def record(r, name=name, spec=spec, work=work):
            """Tokens/s, MFU and ratios of a timed variant, into the results file (also before its check:
            a run cut short keeps the timing)."""
            if "passes" in r:
                head_tokens = work.trained if spec["loss"] == "chunked" else None
                flops = model_flops(config, work.doc_lengths, head_tokens)
                passes = r.pop("passes")
                tok, fl = work.tokens * passes, flops * passes
                if world > 1:
                    import torch.distributed as dist
                    t = torch.tensor([tok, fl, r["seconds"], r["peak_gib"]], dtype=torch.float64, device=device)
                    parts = [torch.zeros_like(t) for _ in range(world)]
                    dist.all_gather(parts, t)
                    tok, fl = sum(float(p[0]) for p in parts), sum(float(p[1]) for p in parts)
                    r["seconds"] = max(float(p[2]) for p in parts)
                    r["peak_gib"] = max(float(p[3]) for p in parts)
                r["tokens"] = int(tok)
                r["lm_head_tokens"] = "trained" if head_tokens is not None else "all"
                r["gflop_per_token"] = flops / work.tokens / 1e9
                r["tokens_per_s"] = tok / r["seconds"]
                r["mfu"] = fl / r["seconds"] / (H100_BF16_PEAK * world)
            if cuda and "tokens_per_s" in r and "gpu_after" not in r:
                r["gpu_after"] = gpu_state()  # clock, power and temperature at the end of its timed steps
            results["variants"][name] = r
            add_ratios(results)
            if rank == 0 and args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))

        try:
            r = run_variant(name, spec, train_model, model, fast, work, device, autocast, timer, args, attn_fast,
                            say, reference, on_timed=record)
        except Exception as e:  # noqa: BLE001 - a failed lever is a result, the others still run
            import traceback
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if cuda:
                torch.cuda.empty_cache()
        record(r)
        if "tokens_per_s" in r:
            check = r.get("check") or {}
            say(f"[bench] {name:15s} {r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:6.1%}  peak {r['peak_gib']:6.2f} GiB"
                + (f"  |dloss| {check['loss_abs_diff']:.1e} cos {check['grad_cosine']:.5f}"
                   if "loss_abs_diff" in check else f"  check: {check['error']}" if check else "")
                + (f"  ({r['note']})" if r.get("note") else "")
                + (f"  [GPU after: {r['gpu_after']}]" if r.get("gpu_after") else ""))
        else:
            say(f"[bench] {name}: {r}")

    for round_no in range(1, args.rounds):  # again, in turn: the spread of tokens/s and ratios on this machine
        for name in [n for n in variants if "tokens_per_s" in results["variants"].get(n, {})]:
            elapsed = time.perf_counter() - t0
            if elapsed > args.time_budget_s:
                say(f"[bench] round {round_no + 1}: {name} skipped (time budget: {elapsed:.0f}s used)")
                continue
            spec, r0 = spec_of(name), results["variants"][name]
            work = workloads[spec["data"]]
            try:
                r = run_variant(name, spec, train_model, model, fast, work, device, autocast, timer, args, attn_fast,
                                say, None, profile=False)
            except Exception as e:  # noqa: BLE001 - the first round's timing stands
                say(f"[bench] round {round_no + 1}: {name} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            tokens_per_s = work.tokens * r["passes"] / r["seconds"]
            r0.setdefault("rounds", [r0["tokens_per_s"]]).append(tokens_per_s)
            say(f"[bench] round {round_no + 1}: {name:15s} {tokens_per_s:9.0f} tok/s  peak {r['peak_gib']:6.2f} GiB")
        add_round_ratios(results)
        if rank == 0 and args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    if args.fp8_curve and world == 1:
        try:
            results["fp8_curve"] = fp8_loss_curve(train_model, model, fast, workloads["packed"], device, autocast,
                                                  timer, args, say)
        except Exception as e:  # noqa: BLE001 - the variants above stand
            import traceback
            traceback.print_exc()
            results["fp8_curve"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    results["seconds_total"] = time.perf_counter() - t0
    if rank == 0:
        summary(results, say)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def run_variant(name, spec, train_model, model, fast, work: Workload, device, autocast, timer, args, attn_fast,
                say, reference, on_timed=lambda r: None, profile: bool = True) -> dict:
    """Time one variant on its workload (after a warm-up step; `on_timed(r)` then records it), then check
    it against the reference (and profile it, if asked and `profile`)."""
    if spec["loss"] == "full":
        step = baseline_step if spec["data"] == "samples" else packed_full_step
    else:
        # a copy per variant: its attention kernels are looked up anew (FastPath keeps them once looked up)
        chunked = dataclasses.replace(fast, chunk_size=spec["chunk"] or fast.chunk_size, compile_loss=spec["closs"],
                                      flex_kernels=spec["flex"], flash_attention=spec["flash"])
        step = make_chunked_step(chunked)
    repeat = 1 if spec["data"] == "samples" else args.slow_repeat if spec["loss"] == "full" else args.repeat
    batches = work.batches[:1] + work.batches * repeat
    n_layers = n_layers_of(model)
    note = [f"loss chunks of {spec['chunk']} tokens"] if spec["chunk"] else []
    if args.fresh_compile:
        import torch._dynamo as dynamo  # (binds `dynamo`, not a function-local `torch`)
        dynamo.reset()
    with contextlib.ExitStack() as undo:
        if spec["attn"] == "eager":
            set_attention(model, "eager")
            undo.callback(set_attention, model, attn_fast)
        set_lora_input_casting(model, spec["cast"])
        undo.callback(set_lora_input_casting, model, True)
        if spec["liger"]:
            note.append(apply_liger(model, undo))
        # fused LoRA-A and selective recomputation stay on (or off) from one variant to the next, not
        # undone after each: the compiled variants then find their layers' graphs already compiled
        if spec["fused"]:
            fuse_lora_projections(model)
            note.append("LoRA-A of q/k/v and gate/up fused")
        else:
            unfuse_lora_projections(model)
        set_selective_recomputation(model, spec["selective"])
        undo.callback(set_checkpointed_layers, model, n_layers)
        if spec["fold"]:
            fold_lora_b(model)
            undo.callback(unfold_lora_b, model)
            note.append("LoRA-B folded into the frozen matmul")
        if spec["fp8"]:
            from zhtune.train.fp8 import apply_fp8, casts_once, remove_fp8
            apply_fp8(model, spec["fp8"], cast_once=spec["fp8_once"], fast_grad_input=spec["fp8_fast"],
                      lm_head=spec["fp8_head"])
            undo.callback(remove_fp8, model)
            once = casts_once(spec["fp8"], spec["fp8_once"])
            how = ("weights cast once" + (", fast accumulation" if spec["fp8_fast"] else "")
                   + (", the lm_head's too" if spec["fp8_head"] else "")) if once else "torchao, per call"
            note.append(f"float8 base weights ({spec['fp8']} scales, {how}; not exact)")
        if spec["dropout"] == "hash":
            set_hash_dropout(model)
            undo.callback(set_hash_dropout, model, False)
            note.append("LoRA dropout with hashed masks")
        elif spec["dropout"] is not None:
            set_dropout(model, spec["dropout"])
            undo.callback(set_dropout, model, LORA_DROPOUT)
            note.append(f"LoRA dropout {spec['dropout']} (not the seed's {LORA_DROPOUT})")
        if spec["keep"]:
            set_checkpointed_layers(model, n_layers, keep_mlp_output=spec["keep"])
            note.append(f"{min(spec['keep'], n_layers)}/{n_layers} checkpointed layers keep their MLP output")
        if spec["compiled"]:
            compile_decoder_layers(model, "layer", backend=args.compile_backend)
            undo.callback(_uncompile, model)
            start = time.perf_counter()
            run_steps(train_model, step, work.batches[:2], device, autocast, timer, warmup=2)
            note.append(f"compile warm-up {time.perf_counter() - start:.0f}s")
        if spec["ckpt"] == "plan":
            note.append(auto_checkpointing(train_model, model, step, work.batches[0], device, autocast, timer,
                                           spec["budget"] or args.mem_budget_gib, say))
        elif spec["ckpt"] == "none":
            set_checkpointed_layers(model, 0)
            note.append(f"0/{n_layers} layers checkpointed")
        secs, peak = run_steps(train_model, step, batches, device, autocast, timer)
        r = {"seconds": secs, "peak_gib": peak, "passes": 1 if spec["data"] == "samples" else repeat,
             "note": "; ".join(n for n in note if n)}
        on_timed(r)
        if profile and name in args.profile.split(","):
            try:
                r["profile"] = profile_step(train_model, step, work.batches[0], device, autocast, timer, name, say)
            except Exception as e:  # noqa: BLE001 - the timing stands
                r["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if reference is not None and name != "baseline" and (not spec["compiled"] or args.check_compiled == "true"):
            try:
                r["check"] = check_variant(model, step, work.check_batch, reference, device, autocast)
            except Exception as e:  # noqa: BLE001 - the timing stands; the check's failure is reported
                import traceback
                traceback.print_exc()
                r["check"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return r


def fp8_loss_curve(train_model, model, fast, work: Workload, device, autocast, timer, args, say) -> dict:
    """`--fp8_curve N`: N optimizer steps over the packed rows (AdamW as `zhtune sft`'s defaults: lr 1e-4,
    weight decay 0.1, gradients clipped to 0.5) from the same LoRA weights, in bf16 and then with each float8
    recipe, under the headline levers (compiled layers, fused LoRA-A, selective recomputation, compiled loss,
    planned checkpointing); dropout draws alike (seeded per step). With --uncompiled_curve first one more bf16
    curve without any lever ("bf16_uncompiled": transformers' loss, every layer checkpointed; its dropout masks
    are drawn per projection, the fused LoRA-A's per group). Per-step losses and the largest relative gap;
    `seconds` is each curve's wall time, any compilation of new graphs included (compare speed in the variants)."""
    from zhtune.train.fp8 import apply_fp8, remove_fp8
    chunked = FastPath(chunk_size=fast.chunk_size, softcap=fast.softcap, compile_loss=True)
    step = make_chunked_step(chunked)
    params = [p for p in model.parameters() if p.requires_grad]
    start_weights = [p.detach().clone() for p in params]
    curves, seconds = {}, {}

    def restart():
        with torch.no_grad():
            for p, w in zip(params, start_weights):
                p.copy_(w)

    def curve(name, step):
        restart()
        model.zero_grad(set_to_none=True)
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
        losses, start = [], time.perf_counter()
        for i in range(args.fp8_curve):
            torch.manual_seed(1000 + i)
            with autocast():
                loss = step(train_model, to_device(work.batches[i % len(work.batches)], device))
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if (i + 1) % 10 == 0 or i + 1 == args.fp8_curve:
                say(f"[bench] fp8 curve, {name}: step {i + 1}/{args.fp8_curve}, loss {losses[-1]:.4f}")
        curves[name], seconds[name] = losses, round(time.perf_counter() - start, 1)

    try:
        if args.uncompiled_curve:  # the plain computation: the model's own loss, no levers
            set_checkpointed_layers(model, n_layers_of(model))
            curve("bf16_uncompiled", make_chunked_step(FastPath(chunked_loss=False)))
        fuse_lora_projections(model)
        set_selective_recomputation(model, True)
        compile_decoder_layers(model, "layer", backend=args.compile_backend)
        for name in ("bf16", *args.fp8_curve_recipes.split(",")):
            if name != "bf16":
                apply_fp8(model, **FP8_CURVES[name])
            try:
                auto_checkpointing(train_model, model, step, work.batches[0], device, autocast, timer,
                                   args.mem_budget_gib, say)
                curve(name, step)
            finally:
                if name != "bf16":
                    remove_fp8(model)
    finally:
        restart()
        _uncompile(model)
        unfuse_lora_projections(model)
        set_selective_recomputation(model, False)
        set_checkpointed_layers(model, n_layers_of(model))
    ref = curves["bf16"]
    gaps = {name: max(abs(a - b) / abs(b) for a, b in zip(c, ref)) for name, c in curves.items() if name != "bf16"}
    for name, gap in gaps.items():
        say(f"[bench] fp8 curve: {name} against bf16 over {len(ref)} steps: largest relative loss gap {gap:.2%}; "
            f"last loss {curves[name][-1]:.4f} against {ref[-1]:.4f} (wall {seconds[name]}s against {seconds['bf16']}s, "
            f"compilation included)")
    return {"steps": args.fp8_curve, "losses": curves, "largest_relative_gap": gaps, "seconds": seconds}


def profile_step(train_model, step, batch, device, autocast, timer, name, say) -> dict:
    """One more step of a variant under torch.profiler: its device time by kind of kernel and the top kernels."""
    with device_profile(timer.cuda) as kernels:
        seconds, _ = run_steps(train_model, step, [batch], device, autocast, timer, warmup=0)
    busy, kinds = kernels.busy_us, kernels.by_kind()
    say(f"[bench] {name} profile: one step {seconds:.2f}s wall, device busy {busy / 1e6:.2f}s; by kind: " +
        ", ".join(f"{k} {v / max(busy, 1):.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    top = kernels.top(20)
    for row in top:
        say(f"[bench]   {row['device_ms']:9.1f} ms x{row['calls']:<5} {row['name']}")
    return {"wall_s": round(seconds, 3), "device_busy_s": round(busy / 1e6, 3),
            "by_kind_share": {k: round(v / max(busy, 1), 3) for k, v in kinds.items()}, "top_kernels": top}


def apply_liger(model, undo: contextlib.ExitStack) -> str:
    """liger-kernel's Gemma 2 kernels that keep the seed's LoRA (see the module docstring), on this model
    instance; everything it patches (module globals, torch.nn.functional.cross_entropy, instance
    attributes) is put back when `undo` closes."""
    import torch.nn.functional as F
    from liger_kernel.transformers import apply_liger_kernel_to_gemma2
    from transformers.models.gemma2 import modeling_gemma2
    base = model.get_base_model()
    saved_globals = {name: getattr(modeling_gemma2, name) for name in
                     ("apply_rotary_pos_emb", "Gemma2RMSNorm", "Gemma2MLP")}
    saved_ce = F.cross_entropy
    saved_dicts = {m: set(m.__dict__) for m in base.modules()}

    def restore():
        for name, value in saved_globals.items():
            setattr(modeling_gemma2, name, value)
        F.cross_entropy = saved_ce
        for m, keys in saved_dicts.items():
            for key in set(m.__dict__) - keys:
                del m.__dict__[key]

    undo.callback(restore)
    apply_liger_kernel_to_gemma2(rope=True, rms_norm=True, geglu=True, cross_entropy=True,
                                 fused_linear_cross_entropy=False, model=base)
    return "liger-kernel: rope, rms_norm, geglu, cross_entropy"


def auto_checkpointing(train_model, model, step, batch, device, autocast, timer, budget_gib, say) -> str:
    """zhtune's plan (zhtune/train/memory_plan.py): measure the peak with every layer checkpointed and with
    one fewer; kept MLP outputs first, then as many layers left out as the per-layer cost allows."""
    n_layers = n_layers_of(model)
    if not timer.cuda:
        set_checkpointed_layers(model, n_layers - 1)
        return "cpu: one layer not checkpointed"
    set_checkpointed_layers(model, n_layers)
    _, peak_all = run_steps(train_model, step, [batch], device, autocast, timer, warmup=0)
    probe = PROBE_LAYERS
    set_checkpointed_layers(model, n_layers - probe)
    _, peak_probe = run_steps(train_model, step, [batch], device, autocast, timer, warmup=0)
    per_layer = max((peak_probe - peak_all) / probe, 1e-3)
    keep_cost = mlp_output_bytes(model, batch["input_ids"].numel()) / 2**30
    checkpointed, keeping = plan_checkpointed_layers(n_layers, peak_all, peak_probe, probe, budget_gib, keep_cost)
    set_checkpointed_layers(model, checkpointed, keep_mlp_output=keeping)
    note = (f"{checkpointed}/{n_layers} layers checkpointed, {keeping} keeping their MLP output (peak "
            f"{peak_all:.1f} GiB with all, +{per_layer:.2f} GiB per layer left out, budget {budget_gib:.0f} GiB)")
    say(f"[bench] plan: {note}")
    return note


def _uncompile(model):
    for layer in model.get_base_model().model.layers:
        layer._compiled_call_impl = None


def _raise_recompile_limits():
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(512, torch._dynamo.config.accumulated_cache_size_limit)


def make_reference(model, row, device, autocast, attn_fast) -> dict:
    """Loss and trainable gradients of one packed row through the per-sample eager baseline (PEFT's
    default LoRA input cast, every layer checkpointed), dropout off."""
    set_dropout(model, 0.0)
    docs = split_row(row)
    n_items = sum(trained_count(d["labels"]) for d in docs)
    padded = PaddedCollator(pad_id=0)
    model.zero_grad(set_to_none=True)
    set_attention(model, "eager")
    set_lora_input_casting(model, True)
    set_checkpointed_layers(model, n_layers_of(model))
    loss = 0.0
    try:
        for d in docs:
            with autocast():
                loss += float(baseline_step(model, to_device(padded([d]), device), num_items=n_items))
    finally:
        set_attention(model, attn_fast)
        set_dropout(model, LORA_DROPOUT)
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    lora_mask = torch.cat([torch.full((p.numel(),), "lora" in n, device=grads.device)
                           for n, p in model.named_parameters() if p.requires_grad])
    return {"samples": len(docs), "trained_tokens": n_items, "loss": loss, "grads": grads, "lora_mask": lora_mask}


def check_variant(model, step, batch, reference: dict, device, autocast) -> dict:
    """The variant's loss and gradients on the reference row (in its own data form), dropout off,
    against the reference."""
    set_dropout(model, 0.0)
    model.zero_grad(set_to_none=True)
    try:
        with autocast():
            loss = float(step(model, to_device(batch, device), reference["trained_tokens"]))
        grads = trainable_grads(model)
    finally:
        model.zero_grad(set_to_none=True)
        set_dropout(model, LORA_DROPOUT)
    g_ref, mask = reference["grads"], reference["lora_mask"]
    cos = torch.nn.functional.cosine_similarity
    return {"loss": loss, "loss_abs_diff": abs(loss - reference["loss"]),
            "grad_cosine": float(cos(g_ref, grads, dim=0)),
            "grad_cosine_lora": float(cos(g_ref[mask], grads[mask], dim=0)),
            "grad_norm_ratio": float(grads.norm() / g_ref.norm())}


def add_ratios(results: dict) -> None:
    """x_<reference> = tokens/s over the reference variant's, for each reference measured."""
    v = results["variants"]
    for ref in REFERENCES:
        base = v.get(ref, {}).get("tokens_per_s")
        if not base:
            continue
        for r in v.values():
            if "tokens_per_s" in r:
                r[f"x_{ref}"] = r["tokens_per_s"] / base


def add_round_ratios(results: dict) -> None:
    """With --rounds: each variant's median tokens/s, x_<reference>_rounds = its tokens/s over the reference
    variant's, round by round (the rounds both ran), and x_<reference>_best = its median over the reference's
    fastest round: the ratio to claim where the reference drifts (hf_best lost 16-22% in rounds 2-3 after the
    compiled variant, and not when timed alone: benchmarks/RESULTS.md, fourteenth session)."""
    v = results["variants"]
    for r in v.values():
        if r.get("rounds"):
            r["tokens_per_s_median"] = statistics.median(r["rounds"])
    for ref in REFERENCES:
        base = v.get(ref, {}).get("rounds")
        if not base:
            continue
        for r in v.values():
            if r.get("rounds"):
                r[f"x_{ref}_rounds"] = [a / b for a, b in zip(r["rounds"], base)]
                r[f"x_{ref}_best"] = statistics.median(r["rounds"]) / max(base)


def summary(results: dict, say) -> None:
    v = results["variants"]
    refs = [ref for ref in REFERENCES if v.get(ref, {}).get("tokens_per_s")]
    say("[bench] summary: variant, tokens/s, " + ", ".join(f"x {ref}" for ref in refs)
        + ", MFU, peak GiB, |dloss|, grad cosine")
    for name, r in v.items():
        if "tokens_per_s" not in r:
            say(f"  {name:24s} {r.get('error') or r.get('skipped') or 'skipped'}")
            continue
        ratios = " ".join(f"{r[f'x_{ref}']:6.2f}x" for ref in refs)
        check = r.get("check")
        exact = f"{check['loss_abs_diff']:.1e} {check['grad_cosine']:.5f}" if check and "loss_abs_diff" in check \
            else f"check: {check['error']}" if check else "   -"
        say(f"  {name:24s} {r['tokens_per_s']:9.0f} {ratios} {r['mfu']:6.1%} {r['peak_gib']:7.2f} {exact}")
        if r.get("rounds"):
            say(f"  {'':24s} rounds: " + " ".join(f"{t:.0f}" for t in r["rounds"])
                + "".join(f"; x {ref} " + " ".join(f"{x:.3f}" for x in r[f"x_{ref}_rounds"])
                          + f" (median over its best round {r[f'x_{ref}_best']:.3f})"
                          for ref in refs if r.get(f"x_{ref}_rounds")))
    say("[bench] json " + json.dumps({k: results[k] for k in ("date", "device", "world_size", "versions")}
                                     | {"reference": results.get("reference"),
                                        "variants": {n: {k: r.get(k) for k in ("tokens_per_s", "mfu", "peak_gib",
                                                                               "note", "error", "skipped", "check")
                                                         + tuple(f"x_{ref}" for ref in refs)}
                                                     for n, r in v.items()}}
                                     | ({"fp8_curve": {k: results["fp8_curve"].get(k) for k in
                                                       ("steps", "largest_relative_gap", "seconds", "error")}}
                                        if "fp8_curve" in results else {})))


def _versions() -> dict:
    import peft
    import transformers
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    from importlib.metadata import PackageNotFoundError, version
    for name in ("triton", "liger-kernel", "torchao"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
