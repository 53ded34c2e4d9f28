"""The GPU fast path of `zhtune sft`: padding-free packing, document-masked attention that keeps
Gemma 2's attention softcap (flex_attention), and a chunked softcapped loss that never builds the
full logits. It computes the same loss as the exact plain path (transformers' own forward and loss on
padded batches) on the same tokens; benchmarks/sft_speed.py measures both, and RESULTS.md there
records each switch's effect.

Where it runs: on a GPU, for Gemma 2, Gemma 3 (text) and Qwen2, unless --fast_path false. Elsewhere
(CPU, other models) the exact plain path runs. `--fast_path true` forces it on a CPU too (with eager
attention: exact, slower; useful for tests). Under DeepSpeed ZeRO-3 and FSDP, which shard the lm_head the
chunked loss calls outside the model's forward, it keeps packing and flex_attention and takes
transformers' own loss on full logits, without the compiled levers (`chunked_loss` False): one sample
per step would otherwise recompile flex_attention for each new length. One log line says which path runs.

Switches (each measured in benchmarks/RESULTS.md): `packing` (--packing), `chunk_size` of the loss,
and levers on the model that `prepare_model` applies and `restore_model` undoes:
`compile` (torch.compile of each decoder layer; GPU only), `bf16_lora_inputs` (no fp32 copy of
each LoRA input under bf16 autocast), and, wherever the layers compile (by default: on a GPU), `fused_lora`
(train/fused_lora.py), `selective_recompute` (train/recompute.py) and `compile_loss` (train/loss.py): on
the H200 (9B config, seed LoRA, no layer checkpointed) the three together gave 10,504 tokens/s at 73 GiB,
10,020 without the compiled loss; compiled layers alone gave 9,999 at 89 GiB (another day); all exact
(benchmarks/RESULTS.md); and `flex_kernels` (train/flex_kernels.py: flex_attention's kernels where they
beat inductor's default; head_dim 256 on compute capability 9.0: its FlashAttention-4 backend where flash-attn-4
is installed (`flash_attention`; the document masks then built here, with its key blocks), 1.07x the Triton
tiles on the whole step on an H200, and those tiles 1.04x inductor's default) and
`hash_dropout` (train/hash_dropout.py: LoRA dropout masks from a hash of each element's index, which inductor
fuses and may recompute instead of drawing Philox numbers and keeping the masks; on the H200 1.028-1.031x and
2.5 GiB less at 80 GiB; ZHTUNE_HASH_DROPOUT=0 in the environment keeps nn.Dropout).
Each is also a field here: False turns it off. Not exact, off unless asked (`--fp8 true`): `fp8`, the frozen
base linears in float8 (train/fp8.py; ZHTUNE_FP8_FAST_ACCUM=0 in the environment: their input-gradient matmuls
accumulate precisely, as torchao's do: 0.97-0.98x on the H200, the same losses; ZHTUNE_FP8_LM_HEAD=1: the
lm_head's too).
`set_checkpointed_layers` checkpoints only as many decoder layers as memory needs.
"""

import contextlib
from dataclasses import dataclass, field

import torch

from zhtune.env import env_switch
from zhtune.log import logger
from zhtune.models.architectures import ARCHITECTURES, Architecture, get_architecture
from zhtune.models.parts import base_model, decoder_layers

from zhtune.train.fp8 import DEFAULT_RECIPE
from zhtune.train.loss import chunked_causal_lm_loss
from zhtune.train.packing import FLEX_BLOCK, PackedCollator, PaddedCollator, pack_encoded

LOG_PREFIX = "training path: "


def supported(architecture: str | None) -> bool:
    arch = get_architecture(architecture)
    return arch is not None and arch.fast_path


def attn_implementation(arch: Architecture | None, device: str) -> str | None:
    """The attention the fast path wants at load time, or None to keep the loader's choice.

    On a GPU: flex_attention for every supported model (a fused kernel with document masks; for
    Gemma 2 also the attention softcap, which sdpa drops). On a CPU: None (eager, exact; flex_attention
    has no backward on CPU)."""
    if not str(device).startswith("cuda") or arch is None or not arch.fast_path:
        return None
    return "flex_attention"


@dataclass
class FastPath:
    packing: bool = True
    chunk_size: int = 1024
    pad_to_multiple_of: int | None = None  # None: --batch_size x --max_length on a GPU (one shape), else 128
    compile: bool | None = None  # None: on a GPU
    bf16_lora_inputs: bool = True
    # the four levers below: None = on wherever the decoder layers compile (the measured configuration)
    fused_lora: bool | None = None  # one matmul for the LoRA-A of q/k/v and of gate/up (train/fused_lora.py)
    selective_recompute: bool | None = None  # norms/activations recomputed in un-checkpointed layers (train/recompute.py)
    compile_loss: bool | None = None  # the chunked loss's per-chunk arithmetic through torch.compile (train/loss.py)
    flex_kernels: bool | None = None  # flex_attention's kernels measured for this GPU and head size (train/flex_kernels.py)
    flash_attention: bool = True  # among those, FlashAttention-4's (flex's FLASH backend) where flash-attn-4 is installed
    hash_dropout: bool | None = None  # LoRA dropout masks hashed from element indices (train/hash_dropout.py)
    fp8: str | None = None  # --fp8 true: the frozen base linears in float8 with this recipe (train/fp8.py)
    chunked_loss: bool = True  # False under ZeRO-3 / FSDP (set by decide()): transformers' loss, no levers
    softcap: float | None = None  # the model's final_logit_softcapping, set by decide()
    device: str = "cpu"  # set by decide()
    _tiles: dict | None = field(default=None, init=False, repr=False)  # _flex_kernel_options, once looked up
    _tiles_known: bool = field(default=False, init=False, repr=False)
    _mask_kv_block: int | None = field(default=None, init=False, repr=False)  # FLASH: our document masks' key block

    # -- choosing the path -----------------------------------------------------------------------
    @classmethod
    def create(cls, model, device: str, args) -> "FastPath | None":
        """The recipe's entry: a FastPath for this (already loaded, maybe PEFT-wrapped) model, or None
        for the exact plain path. Logs the one line."""
        fast = cls(packing=getattr(args, "packing", None) is not False,
                   fp8=(getattr(args, "fp8_recipe", None) or DEFAULT_RECIPE) if getattr(args, "fp8", False) else None)
        enabled, _ = fast.decide(base_model(model).config, device, args)
        return fast if enabled else None

    def decide(self, model_config, device: str, args) -> tuple[bool, str]:
        """(enabled, reason), and one log line saying which path runs."""
        sharded = sharded_head(args)
        enabled, reason = self._decide(model_config, str(device), args, sharded)
        self.softcap = getattr(model_config, "final_logit_softcapping", None)
        self.device = str(device)
        if enabled and sharded:  # the model's own loss; PEFT's own LoRA input casting (bf16_lora_inputs
            # assumes autocast, which DeepSpeed's bf16 mode does not use)
            self.chunked_loss, self.compile, self.bf16_lora_inputs = False, False, False
        logger.info(LOG_PREFIX + (f"fast ({reason})" if enabled else f"exact plain path: {reason}"))
        return enabled, reason

    def _decide(self, config, device: str, args, sharded: str | None) -> tuple[bool, str]:
        wanted = getattr(args, "fast_path", None)
        arch = getattr(config, "model_type", None)
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if wanted is False:
            return False, "--fast_path false"
        if not device.startswith("cuda") and wanted is not True:
            return False, f"no GPU (device {device}); --fast_path true forces it"
        if not supported(arch):
            names = ", ".join(a.name for a in ARCHITECTURES.values() if a.fast_path)
            return False, f"the fast path supports {names}, not {arch}"
        if self.packing and attn not in ("flex_attention", "eager", "sdpa", "flash_attention_2"):
            return False, f"packing needs flex_attention, eager, sdpa or flash_attention_2, not {attn}"
        softcap_attn = getattr(config, "attn_logit_softcapping", None) is not None
        if softcap_attn and attn not in ("flex_attention", "eager"):
            return False, f"{arch} caps attention logits and {attn} would drop that; load with flex_attention"
        if softcap_attn and attn == "eager" and device.startswith("cuda") and wanted is not True:
            return False, f"{arch} loaded with eager attention; load with flex_attention for the fast path"
        parts = []
        if self.packing:
            parts.append("packing")
        parts.append(attn + (" with softcap" if softcap_attn else ""))
        if sharded:
            parts.append(f"transformers' loss on full logits ({sharded} shards the lm_head the chunked loss "
                         "calls outside the model's forward; no compiled levers)")
            return True, " + ".join(parts)
        softcap_loss = getattr(config, "final_logit_softcapping", None) is not None
        parts.append("chunked softcapped loss" if softcap_loss else "chunked loss")
        return True, " + ".join(parts)

    # -- data ------------------------------------------------------------------------------------
    def prepare_data(self, items, args, tokenizer=None):
        """(train rows, collator). With packing: rows of up to --max_length tokens from
        `pack_encoded` (the --dataset_seed shuffles their order) and a PackedCollator; else one sample
        per row and a PaddedCollator."""
        pad_id = _pad_id(tokenizer)
        if self.packing:
            rows = pack_encoded(items, args.max_length, seed=getattr(args, "dataset_seed", 42))
            logger.info(f"packing: {len(items)} samples into {len(rows)} rows of at most "
                     f"{args.max_length} tokens")
            multiple = self.pad_to_multiple_of
            if multiple is None:  # on a GPU every micro-batch one shape, a short last one included (compiled
                # layers and flex_attention compile once per shape: on the H200 a second shape cost the
                # embedded model's first step minutes)
                one_shape = self.compiles() or self.device.startswith("cuda")
                multiple = self.one_shape_tokens(args) if one_shape else FLEX_BLOCK
            return rows, PackedCollator(pad_id=pad_id, pad_to_multiple_of=multiple)
        rows = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in items]
        return rows, PaddedCollator(pad_id=pad_id)

    @staticmethod
    def one_shape_tokens(args) -> int:
        """The tokens of every micro-batch where all are padded to one shape (on a GPU)."""
        return _round_up(args.max_length, FLEX_BLOCK) * args.batch_size

    # -- model levers ----------------------------------------------------------------------------
    def prepare_model(self, model) -> list[str]:
        """Apply the model levers before training; returns their names (for the log).

        compile: each decoder layer through torch.compile (a slow first step, then faster ones; see
        benchmarks/RESULTS.md); on a GPU only. bf16_lora_inputs: PEFT's fp32 copy of every LoRA input is
        skipped; only while the model runs under bf16 autocast (Trainer with bf16=True),
        so call `restore_model` before generating without autocast."""
        applied = []
        if self.bf16_lora_inputs and _is_bf16(model) and set_lora_input_casting(model, False):
            applied.append("bf16 LoRA inputs")
        if self._lever(self.hash_dropout) and env_switch("ZHTUNE_HASH_DROPOUT", True):
            from zhtune.train.hash_dropout import set_hash_dropout
            if set_hash_dropout(model):
                applied.append("hashed LoRA dropout masks")
        if self._lever(self.fused_lora):
            from zhtune.train.fused_lora import fuse_lora_projections
            if fuse_lora_projections(model):
                applied.append("fused LoRA-A")
        if self._lever(self.selective_recompute):
            from zhtune.train.recompute import set_selective_recomputation
            if set_selective_recomputation(model):
                applied.append("selective recomputation")
        if self.fp8:
            from zhtune.train.fp8 import apply_fp8
            if apply_fp8(model, self.fp8, fast_grad_input=env_switch("ZHTUNE_FP8_FAST_ACCUM", True),
                         lm_head=env_switch("ZHTUNE_FP8_LM_HEAD", False)):
                applied.append(f"float8 base weights ({self.fp8}, not exact)")
        options = self._flex_kernel_options(model)
        if options:
            applied.append("flex_attention's FlashAttention-4 kernels (flash-attn-4)" if self._mask_kv_block
                           else "flex_attention tiles measured for this GPU")
        if self.compiles():
            compile_decoder_layers(model, "layer")
            applied.append("torch.compile per decoder layer")
        return applied

    def restore_model(self, model) -> None:
        """Undo `prepare_model` (for evaluation or generation outside the training loop)."""
        from zhtune.train.fused_lora import unfuse_lora_projections
        from zhtune.train.hash_dropout import set_hash_dropout
        from zhtune.train.recompute import set_selective_recomputation
        set_hash_dropout(model, False)
        if self.fp8:
            from zhtune.train.fp8 import remove_fp8
            remove_fp8(model)
        set_lora_input_casting(model, True)
        unfuse_lora_projections(model)
        set_selective_recomputation(model, False)
        for layer in decoder_layers(model):
            layer._compiled_call_impl = None
            layer.mlp._compiled_call_impl = None

    def compiles(self) -> bool:
        return self.compile if self.compile is not None else self.device.startswith("cuda")

    def _lever(self, value: bool | None) -> bool:
        return self.compiles() if value is None else bool(value)

    def _flex_kernel_options(self, model) -> dict | None:
        """flex_attention's kernel_options for the forward (None: inductor's default tiles); looked up on the
        first call (the model, device and dtype stay those of the run), not at every step."""
        if not self._tiles_known:
            self._tiles_known = True
            if self._lever(self.flex_kernels):
                from zhtune.train.flex_kernels import FLASH, flash_kv_block, training_kernel_options
                base = base_model(model)
                self._tiles = training_kernel_options(base.config, self.device, base.dtype,
                                                      packed=self.packing and self.flash_attention)
                if self._tiles == FLASH:
                    self._mask_kv_block = flash_kv_block(base.config, self.device)
        return self._tiles

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The mean token loss, like transformers Trainer.compute_loss: loss_sum / num_items_in_batch
        when given (the label count of the whole accumulated batch; Trainer counts labels[..., 1:]),
        else over this batch's own label tokens. No multiplication by the world size: Trainer's
        `average_tokens_across_devices` scaling, if wanted, is the caller's.

        `model` may be wrapped (DDP, accelerate, PEFT): the forward goes through every wrapper, with
        no logits computed (logits_to_keep selects none), and a hook on the decoder takes its final
        hidden states for the chunked loss against the (possibly LoRA-wrapped) lm_head."""
        inputs = dict(inputs)
        if not self.chunked_loss:  # ZeRO-3 / FSDP: the model's own loss (its lm_head's shards gathered in its forward)
            counted = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            return model(**inputs, use_cache=False, **counted).loss
        labels = inputs.pop("labels")
        base = base_model(model)
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        captured = {}

        def keep_hidden(_module, _args, output):
            captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        options = self._flex_kernel_options(model)
        if options:
            inputs["kernel_options"] = options  # transformers passes it down to flex_attention
        if self._mask_kv_block:  # FLASH: the document masks with its key block (transformers' have 128)
            from zhtune.train.flex_kernels import document_block_masks
            inputs["attention_mask"] = document_block_masks(inputs["position_ids"], base.config, self._mask_kv_block)
        hook = decoder.register_forward_hook(keep_hidden)
        try:
            model(**inputs, use_cache=False,
                  logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
        finally:
            hook.remove()
        softcap = getattr(base.config, "final_logit_softcapping", None)
        hidden = captured["hidden"]
        with _head_autocast(hidden):
            loss_sum, n_tokens = chunked_causal_lm_loss(hidden, head, labels, softcap, self.chunk_size,
                                                        compiled=self._lever(self.compile_loss))
        denominator = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss_sum.device)
        return loss_sum / denominator


# -- levers outside the loss ---------------------------------------------------------------------

def set_checkpointed_layers(model, n: int, keep_mlp_output: int = 0) -> list[int]:
    """Checkpoint only n of the decoder layers (spread evenly); the others keep their activations.
    The first `keep_mlp_output` of the n keep their MLP's output for the backward (train/recompute.py:
    56 MiB more per Gemma-2-9B layer at 8192 tokens, a quarter of its recomputation less; the first, whose
    backward runs last, when the later layers' saved activations are freed). Call after
    `gradient_checkpointing_enable()`. Returns the checkpointed indices."""
    from zhtune.train.recompute import allow_fused_lora_state, set_keeps_mlp_output
    layers = decoder_layers(model)
    total = len(layers)
    chosen = _spread(total, n)
    keeping = set(chosen[:max(0, keep_mlp_output)])
    for i, layer in enumerate(layers):
        set_keeps_mlp_output(layer, i in keeping)
        layer.gradient_checkpointing = i in chosen and i not in keeping
    allow_fused_lora_state(bool(keeping))
    return chosen


def _spread(total: int, n: int) -> list[int]:
    """n of range(total), spread evenly."""
    n = max(0, min(n, total))
    return [i for i in range(total) if (i + 1) * n // total > i * n // total]


def set_lora_input_casting(model, enabled: bool) -> int:
    """PEFT casts each LoRA input to the adapter's dtype (fp32 adapters on a bf16 model: a full fp32
    copy of every input, then autocast casts it back for the matmul). Under bf16 autocast that copy
    is waste: `enabled=False` keeps inputs in bf16 (the LoRA matmul is bf16 under autocast either way).
    Only for code that runs the model under autocast (Trainer with bf16 does); turn it back on before
    running the model without autocast (generation). Returns the number of LoRA layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled
            n += 1
    return n


def compile_decoder_layers(model, part: str = "layer", **compile_kwargs) -> int:
    """torch.compile each decoder layer (part="layer") or only its MLP (part="mlp"): identical
    layers share one compiled graph (regional compilation), and a checkpointed layer recomputes the
    compiled forward. Returns the number of modules compiled."""
    n = 0
    for layer in decoder_layers(model):
        target = layer if part == "layer" else layer.mlp
        target.compile(**compile_kwargs)
        n += 1
    return n


# -- helpers -------------------------------------------------------------------------------------

def _head_autocast(hidden: torch.Tensor):
    """The autocast the lm_head would have run under inside the model's forward.

    Trainer (through accelerate) puts bf16/fp16 autocast around the model's forward only; the chunked
    loss calls the lm_head outside it. A half-precision hidden state means mixed precision: run the head
    (and its fp32 LoRA, whose inputs stay bf16 under `bf16_lora_inputs`) under the same autocast."""
    kind = hidden.device.type
    if hidden.dtype not in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=hidden.dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_bf16(model) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


SHARDING_FLAGS = {"FSDP": "--fsdp", "DeepSpeed ZeRO-3": "--deepspeed"}  # engine -> the flag that asks for it


def sharded_head(args) -> str | None:
    """The engine that shards the lm_head (a key of SHARDING_FLAGS), or None."""
    if getattr(args, "fsdp", None):
        return "FSDP"
    return "DeepSpeed ZeRO-3" if is_zero3(getattr(args, "deepspeed", None)) else None


def is_zero3(deepspeed) -> bool:
    if not deepspeed:
        return False
    if isinstance(deepspeed, str):
        if deepspeed.endswith("zero3"):
            return True
        try:
            import json
            with open(deepspeed, encoding="utf-8") as f:
                deepspeed = json.load(f)
        except (OSError, ValueError):
            return False
    return isinstance(deepspeed, dict) and deepspeed.get("zero_optimization", {}).get("stage") == 3
