"""flex_attention's kernels for training, where measured better than inductor's default.

Two choices, per compute capability and head size, each only where it was measured:
- FLASH (`FLASH_KV_BLOCK`): flex_attention's FlashAttention-4 backend (`kernel_options={"BACKEND": "FLASH"}`;
  the CuTe DSL kernels of the optional package flash-attn-4, `pip install 'zhtune[flash]'`). For Gemma 2/3's
  head_dim 256 on compute capability 9.0 (H100/H200; measured on an H200) it ran the forward + backward of one
  layer's attention 1.77-1.81x as fast as the tiles below in the same run (1.51 against 2.75 ms per 8192-token
  packed row for a global layer, 1.51 against 2.68 for a sliding one; Gemma-2-9B's 16/8 heads, softcap and
  document mask; output and gradients within bf16 rounding of inductor's default, max |diff| 0.031), and the
  whole training step 1.074x (benchmarks/flex_attention_configs.py, sft_speed.py; benchmarks/RESULTS.md,
  seventeenth session). Its head_dim-256 backward tiles keys by 64, and its block sparsity needs the BlockMask's key
  block to match, so the fast path builds the document masks itself (`document_block_masks`) with key
  blocks of 64 instead of transformers' 128. Only on packed rows (position_ids), only for models whose
  layers are all full or sliding-window attention.
- Triton tiles (`MEASURED`): inductor picks one forward and one backward configuration per head size and GPU
  unless it autotunes (`max_autotune`: minutes of compilation, and its candidate list misses the best one
  here). For head_dim 256 in bf16 on compute capability 9.0 the configuration below ran the forward +
  backward 1.33x as fast as the default (2.80 against 3.73 ms per row; inductor's own autotuning reached
  1.17x), output and gradients within bf16 rounding (max |diff| 0.031; ninth session). On the whole training
  step of the 9B config (sft_speed.py, same run, 2026-11-30): 11,261 against 10,830 tokens/s (1.04x).
ZHTUNE_FLEX_FLASH=0 keeps the Triton tiles where FLASH would run; ZHTUNE_FLEX_TILES=0 turns both off
(inductor's default).
"""
import functools

import torch

from zhtune.env import env_switch

# (compute capability, head_dim) -> flex_attention kernel_options (fwd_/bwd_: that pass only)
MEASURED = {
    ((9, 0), 256): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2,
                    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                    "bwd_num_warps": 8, "bwd_num_stages": 2},
}
# (compute capability, head_dim) -> the BlockMask's key block under the FLASH backend (its query block: 128)
FLASH_KV_BLOCK = {((9, 0), 256): 64}
FLASH = {"BACKEND": "FLASH"}
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")  # what document_block_masks builds


@functools.cache
def flash_installed() -> bool:
    """flash-attn-4's CuTe DSL kernels import, and this torch's flex_attention has the FLASH backend's backward
    (torch 2.11 was measured)."""
    try:
        from torch._inductor.kernel.flex import flex_flash_attention
        import flash_attn.cute.interface  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a CUDA/CuTe DSL mismatch: the Triton kernels run
        return False
    return hasattr(flex_flash_attention, "create_flex_flash_attention_backward_kernel")


def training_kernel_options(config, device: str, dtype: torch.dtype, packed: bool = True) -> dict | None:
    """The measured kernel_options for this model's attention on this device: FLASH's where measured and
    usable (flash-attn-4 installed, packed rows, only full/sliding layers), else the Triton tiles, else None
    (inductor's default)."""
    if not env_switch("ZHTUNE_FLEX_TILES", True):
        return None
    if getattr(config, "_attn_implementation", None) != "flex_attention" or not str(device).startswith("cuda"):
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    key = _key(config, device)
    if key in FLASH_KV_BLOCK and packed and env_switch("ZHTUNE_FLEX_FLASH", True) and _masks_cover(config) \
            and flash_installed():
        return dict(FLASH)
    options = MEASURED.get(key)
    return dict(options) if options else None


def flash_kv_block(config, device: str) -> int:
    """The BlockMask key block FLASH's kernels need for this model on this device."""
    return FLASH_KV_BLOCK[_key(config, device)]


def document_block_masks(position_ids: torch.Tensor, config, kv_block: int) -> dict:
    """One BlockMask per layer type for packed rows (position_ids restarting at 0 where each sample starts),
    as transformers builds them (masking_utils: a token sees earlier tokens of its own sample; sliding
    layers only the last `sliding_window` of those), with key blocks of `kv_block`. Gemma 2/3's forward
    takes the dict as its attention_mask."""
    from torch.nn.attention.flex_attention import create_block_mask
    batch, length = position_ids.shape
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    doc = (step != 1).cumsum(-1)  # transformers' find_packed_sequence_indices
    window = getattr(config, "sliding_window", None)

    def same_doc_causal(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    def same_doc_window(b, h, q, kv):
        return same_doc_causal(b, h, q, kv) & (kv > q - window)

    mask_mods = {"full_attention": same_doc_causal, "sliding_attention": same_doc_window}
    return {kind: create_block_mask(mask_mods[kind], batch, None, length, length, device=position_ids.device,
                                    BLOCK_SIZE=(128, kv_block), _compile=position_ids.is_cuda)
            for kind in sorted(set(config.layer_types))}


def _key(config, device: str) -> tuple:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return tuple(torch.cuda.get_device_capability(torch.device(device))), head_dim


def _masks_cover(config) -> bool:
    """document_block_masks builds every mask this model's layers read."""
    kinds = getattr(config, "layer_types", None)
    if not kinds or not set(kinds) <= set(MASKED_LAYER_TYPES):
        return False
    return "sliding_attention" not in kinds or bool(getattr(config, "sliding_window", None))
