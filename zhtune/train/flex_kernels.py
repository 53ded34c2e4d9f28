"""flex_attention's Triton tile sizes for training, where measured better than inductor's default.

Inductor picks one forward and one backward configuration per head size and GPU unless it autotunes
(`max_autotune`: minutes of compilation, and its candidate list misses the best one here). For Gemma 2/3's
head_dim 256 in bf16 on compute capability 9.0 (H100/H200; measured on an H200) the configuration below ran
the forward + backward of one layer's attention 1.33x as fast as the default (2.80 against 3.73 ms per
8192-token packed row, Gemma-2-9B's 16/8 heads, softcap and document mask; inductor's own autotuning reached
1.17x), output and gradients within bf16 rounding of the default's (max |diff| 0.031; the backward tiles alone
changed nothing): benchmarks/flex_attention_configs.py, results in
benchmarks/RESULTS.md (2026-11-29, ninth session). On the whole training step of the 9B config (sft_speed.py,
same run, 2026-11-30): 11,261 against 10,830 tokens/s with the default tiles (1.04x). Elsewhere, or with
ZHTUNE_FLEX_TILES=0 in the environment: None, inductor's default.
"""
import torch

from zhtune.env import env_switch

# (compute capability, head_dim) -> flex_attention kernel_options (fwd_/bwd_: that pass only)
MEASURED = {
    ((9, 0), 256): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2,
                    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                    "bwd_num_warps": 8, "bwd_num_stages": 2},
}


def training_kernel_options(config, device: str, dtype: torch.dtype) -> dict | None:
    """The measured kernel_options for this model's attention on this device, or None (inductor's default)."""
    if not env_switch("ZHTUNE_FLEX_TILES", True):
        return None
    if getattr(config, "_attn_implementation", None) != "flex_attention" or not str(device).startswith("cuda"):
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    capability = torch.cuda.get_device_capability(torch.device(device))
    options = MEASURED.get((tuple(capability), head_dim))
    return dict(options) if options else None
