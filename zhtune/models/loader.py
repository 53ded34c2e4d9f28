"""From a ResolvedModel to a local folder and a loaded (model, tokenizer), with the right dtype and
the fastest attention that is exact for the architecture. Name resolution is models/resolve.py."""

import os
from pathlib import Path

from zhtune.errors import UserError
from zhtune.files import reading
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def folder_fix(resolved: ResolvedModel | None) -> str:
    """What to do about a model folder that does not load: its checkpoint, or the folder itself."""
    if resolved is not None and resolved.ckpt_dir and not resolved.adapter_dir:
        return f"The checkpoint --ckpt_dir {resolved.ckpt_dir} is damaged; use another checkpoint-N folder of the run."
    return "Re-download or re-export the model folder (config.json, *.safetensors, tokenizer files)."


def load_tokenizer(path: Path, fix: str | None = None):
    from transformers import AutoTokenizer
    fix = fix or folder_fix(None)
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the config alone
        raise UserError(f"{path}: has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). {fix}")
    with reading(path, "the tokenizer", fix):
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
    fix = folder_fix(resolved)
    tokenizer = load_tokenizer(path, fix)
    with reading(path, "the model", fix):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    model.to(device)
    model.eval()
    return model, tokenizer
