"""Fold a LoRA checkpoint into a standalone model folder `<ckpt_dir>-merged/` (safetensors, tokenizer,
config), loadable by plain transformers and by vllm. Gemma ties its output head to its input
embedding; when LoRA trained both, the merge unties them first (each keeps its own delta) and the
saved config says so."""

import json
import shutil
from pathlib import Path

from zhtune.errors import UserError
from zhtune.files import reading, staged_folder
from zhtune.log import logger
from zhtune.models.resolve import ResolvedModel


def merged_dir_for(ckpt_dir: str | Path) -> Path:
    ckpt = Path(ckpt_dir)
    return ckpt.parent / f"{ckpt.name}-merged"


def merge_checkpoint(resolved: ResolvedModel) -> Path:
    """Merge once; later calls reuse the folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhtune.checkpoint import ADAPTER_FIX
    from zhtune.models.loader import folder_fix, load_tokenizer, model_dir

    ckpt_dir = resolved.ckpt_dir
    target = merged_dir_for(ckpt_dir)
    if (target / "config.json").is_file():
        logger.info(f"using the merged model in {target}")
        return target
    if not resolved.adapter_dir:
        raise UserError(f"{ckpt_dir} holds no LoRA adapter (adapter_config.json): nothing to merge; "
                        "a full fine-tuning checkpoint is already a model folder.")
    base_dir = model_dir(resolved)
    logger.info(f"merging {ckpt_dir} into {target}")
    tokenizer = load_tokenizer(base_dir)  # before the slow part: a folder without one fails fast
    with reading(base_dir, "the base model", folder_fix(None)):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    untie_embeddings(model)
    with reading(f"--ckpt_dir {ckpt_dir}", "the LoRA adapter", ADAPTER_FIX):
        model = PeftModel.from_pretrained(model, str(ckpt_dir))
    model = model.merge_and_unload()
    with staged_folder(target) as tmp:
        model.to(_saved_dtype(base_dir)).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if (Path(ckpt_dir) / "sft_args.json").is_file():
            shutil.copy(Path(ckpt_dir) / "sft_args.json", tmp / "sft_args.json")
    return target


def untie_embeddings(model) -> None:
    """Give the output head its own copy of the tied embedding weight."""
    import torch
    if not getattr(model.config, "tie_word_embeddings", False) and not getattr(
            model.config.get_text_config(), "tie_word_embeddings", False):
        return
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


def _saved_dtype(base_dir: Path):
    import torch
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)
