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
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{candidate} is not readable JSON ({type(e).__name__}): the checkpoint is "
                                "damaged; use another checkpoint-N folder of the run.") from e
    raise UserError(f"--ckpt_dir {ckpt_dir} has no sft_args.json: it was not written by `zhtune sft`. "
                    "For a plain model folder use --model_id_or_path instead.")


def is_lora_checkpoint(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / "adapter_config.json").is_file()
