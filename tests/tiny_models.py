"""Tiny random models built from the real configs of Gemma 2, Gemma 3 and Qwen2, saved as model folders.

They use the real Gemma tokenizer (from the embedded model), so every template and data path runs on
real token ids; only the layer sizes are shrunk. `tiny_config` is the one definition of these configs
(the fast-path tests build models from it in memory, with a small vocabulary).
"""

import shutil
from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def gemma_tokenizer_dir() -> Path:
    from zhtune.models.embedded import embedded_model_dir
    return embedded_model_dir()


def tiny_config(architecture: str, vocab_size: int, layers: int = 2):
    """Gemma 2 (both softcaps, a sliding window shorter than most test samples), Gemma 3 text or Qwen2."""
    from transformers import Gemma2Config, Gemma3TextConfig, Qwen2Config
    tiny = {**TINY, "num_hidden_layers": layers}
    if architecture == "gemma2":  # Gemma-2-9B's own settings, shrunk
        return Gemma2Config(vocab_size=vocab_size, **tiny, sliding_window=8, query_pre_attn_scalar=16,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
                            pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if architecture == "gemma3_text":
        return Gemma3TextConfig(vocab_size=vocab_size, **tiny, sliding_window=8, query_pre_attn_scalar=16,
                                tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if architecture == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, **{k: v for k, v in tiny.items() if k != "head_dim"},
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    raise ValueError(architecture)


def make_tiny_model_dir(root: Path, architecture: str = "gemma2", seed: int = 0) -> Path:
    """A model folder (config, safetensors, Gemma tokenizer) with random weights."""
    from transformers import AutoModelForCausalLM
    tok_dir = gemma_tokenizer_dir()
    out = Path(root) / f"tiny-{architecture}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    import json
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, vocab), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    return out
