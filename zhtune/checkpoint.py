"""What a checkpoint folder written by `zhtune sft` says about itself (its sft_args.json)."""

from pathlib import Path

from zhtune.errors import UserError
from zhtune.files import read_json_file


def read_sft_args(ckpt_dir: str | Path) -> dict:
    """The training arguments saved with a checkpoint (in it, or in its run folder)."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise UserError(f"--ckpt_dir {ckpt_dir}: no such folder. Give a checkpoint folder written by "
                        "`zhtune sft`, e.g. output/<model_type>/v0-<time>/checkpoint-<step>.")
    for candidate in (ckpt / "sft_args.json", ckpt.parent / "sft_args.json"):
        if candidate.is_file():
            return read_json_file(candidate, "the checkpoint's training arguments", "The checkpoint is damaged; "
                                  "use another checkpoint-N folder of the run.", arg="--ckpt_dir")
    raise UserError(f"--ckpt_dir {ckpt_dir} has no sft_args.json: it was not written by `zhtune sft`. "
                    "For a plain model folder use --model_id_or_path instead.")


ADAPTER_FIX = ("The checkpoint is damaged (adapter_config.json, adapter_model.safetensors); use another checkpoint-N "
               "folder of the run.")


def is_lora_checkpoint(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / "adapter_config.json").is_file()
