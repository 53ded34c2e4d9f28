"""From a ResolvedModel to a local folder and a loaded (model, tokenizer), with the right dtype and
the fastest attention that is exact for the architecture. Name resolution is models/resolve.py."""

import os
from pathlib import Path

from zhtune.log import logger
from zhtune.models.architectures import Architecture
from zhtune.models.resolve import ResolvedModel


def model_dir(resolved: ResolvedModel) -> Path:
    """A local folder holding the model: the embedded cache, the given folder, or a hub download."""
    if resolved.source == "embedded":
        from zhtune.models.embedded import embedded_model_dir
        return embedded_model_dir()
    if resolved.source == "local":
        return Path(resolved.location)
    from zhtune.hub import download_model
    return download_model(resolved.location, resolved.revision)


def pick_dtype(dtype: str, device: str):
    import torch
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "AUTO":
        return names[dtype]
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pick_attention(arch: Architecture, use_flash_attn: bool | None, device: str) -> str:
    """The fastest attention that is exact for this architecture: one with an attention softcap
    (Gemma 2) gets flex_attention on a GPU and eager elsewhere, never sdpa; others sdpa, or
    flash_attention_2 where installed and asked for."""
    on_gpu = device.startswith("cuda")
    if arch.attention_softcap:
        return "flex_attention" if (use_flash_attn and on_gpu) else "eager"
    if use_flash_attn and on_gpu:
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def default_device() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(resolved: ResolvedModel, dtype: str = "AUTO", use_flash_attn: bool | None = None,
                             device: str | None = None, attn_implementation: str | None = None):
    """(model, tokenizer) on `device`, in eval mode, the LoRA adapter of a checkpoint NOT applied.
    `attn_implementation` overrides `pick_attention` (the training fast path asks for flex_attention)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    path = model_dir(resolved)
    torch_dtype = pick_dtype(dtype, device)
    attn = attn_implementation or pick_attention(resolved.arch, use_flash_attn, device)
    logger.info(f"loading {resolved.model_type} from {path} ({str(torch_dtype).replace('torch.', '')}, "
                f"attention={attn}, device={device})")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    model.to(device)
    model.eval()
    return model, tokenizer
