"""What a checkpoint folder written by `zhtune sft` says about itself (its sft_args.json)."""

import json
from pathlib import Path

from zhtune.errors import UserError


def read_sft_args(ckpt_dir: str | Path) -> dict:
    """The training arguments saved with a checkpoint (in it, or in its run folder)."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise UserError(f"--ckpt_dir {ckpt_dir}: no such folder. Give a checkpoint folder written by "
                        "`zhtune sft`, e.g. output/<model_type>/v0-<time>/checkpoint-<step>.")
    for candidate in (ckpt / "sft_args.json", ckpt.parent / "sft_args.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise UserError(f"--ckpt_dir {ckpt_dir} has no sft_args.json: it was not written by `zhtune sft`. "
                    "For a plain model folder use --model_id_or_path instead.")


def is_lora_checkpoint(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / "adapter_config.json").is_file()


def model_type_from_path(ckpt_dir: str | Path) -> str | None:
    """output/<model_type>/vN-<time>/checkpoint-N -> model_type (for a folder that does not exist yet)."""
    from zhtune.models.registry import MODELS
    return next((part for part in Path(ckpt_dir).parts if part in MODELS), None)


def sft_args_or_guess(ckpt_dir: str | Path) -> dict:
    """For --dry_run: the saved arguments, or, for a folder not written yet, what its path says."""
    if Path(ckpt_dir).is_dir():
        return read_sft_args(ckpt_dir)
    return {"model_type": model_type_from_path(ckpt_dir), "ckpt_exists": False}
