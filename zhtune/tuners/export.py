"""`zhtune export --ckpt_dir ... --merge_lora true`: fold a LoRA adapter into a standalone model folder.

The merged folder `<ckpt_dir>-merged/` holds safetensors, the tokenizer and config, loadable by plain
transformers and by vllm. Gemma ties its output head to its input embedding; when LoRA trained both,
the merge unties them first (each gets its own delta), and the saved config says so.
"""

import json
import os
import shutil
from pathlib import Path

from zhtune.checkpoint import is_lora_checkpoint, read_sft_args, sft_args_or_guess
from zhtune.dry_run import print_dry_run
from zhtune.errors import UserError
from zhtune.models.loader import model_dir, resolve_model


def merged_dir_for(ckpt_dir: str | Path) -> Path:
    ckpt = Path(ckpt_dir)
    return ckpt.parent / f"{ckpt.name}-merged"


def merge_checkpoint(ckpt_dir: str | Path, log=print) -> Path:
    """Merge once; later calls reuse the folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhtune.models.loader import load_tokenizer

    target = merged_dir_for(ckpt_dir)
    if (target / "config.json").is_file():
        log(f"[zhtune] using the merged model in {target}")
        return target
    if not is_lora_checkpoint(ckpt_dir):
        raise UserError(f"{ckpt_dir} holds no LoRA adapter (adapter_config.json): nothing to merge; "
                        "a full fine-tuning checkpoint is already a model folder.")
    sft = read_sft_args(ckpt_dir)
    resolved = resolve_model(sft.get("model_type"), sft.get("model_id_or_path"), sft.get("template_type", "AUTO"))
    base_dir = model_dir(resolved)
    log(f"[zhtune] merging {ckpt_dir} into {target}")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    untie_embeddings(model)
    model = PeftModel.from_pretrained(model, str(ckpt_dir)).merge_and_unload()
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dtype = _saved_dtype(base_dir)
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(base_dir).save_pretrained(tmp)
        shutil.copy(Path(ckpt_dir) / "sft_args.json", tmp / "sft_args.json") if (Path(ckpt_dir) / "sft_args.json").is_file() else None
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    config = json.loads((Path(base_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def export_main(args) -> int:
    if not args.ckpt_dir:
        raise UserError("zhtune export needs --ckpt_dir <checkpoint folder written by zhtune sft>.")
    if not args.merge_lora:
        raise UserError("zhtune export does one thing so far: merging. Add --merge_lora true.")
    if args.dry_run:
        sft = sft_args_or_guess(args.ckpt_dir)
        resolved = resolve_model(args.model_type or sft.get("model_type"),
                                 args.model_id_or_path or sft.get("model_id_or_path"),
                                 sft.get("template_type", args.template_type))
        print_dry_run("export", args, {**resolved.describe(), "ckpt_dir": args.ckpt_dir,
                                        "merged_dir": str(merged_dir_for(args.ckpt_dir))})
        return 0
    target = merge_checkpoint(args.ckpt_dir)
    print(f"[zhtune] merged model: {target}")
    return 0

