"""`zhtune export --ckpt_dir ... --merge_lora true`: merge a LoRA checkpoint into `<ckpt_dir>-merged/`."""

from zhtune.dry_run import print_dry_run
from zhtune.errors import UserError
from zhtune.log import logger
from zhtune.models.resolve import resolve_from_args
from zhtune.tuners.merge import merge_checkpoint, merged_dir_for


def export_main(args) -> int:
    if not args.ckpt_dir:
        raise UserError("zhtune export needs --ckpt_dir <checkpoint folder written by zhtune sft>.")
    if not args.merge_lora:
        raise UserError("zhtune export does one thing so far: merging. Add --merge_lora true.")
    resolved = resolve_from_args(args)
    if args.dry_run:
        print_dry_run("export", args, {**resolved.describe(), "merged_dir": str(merged_dir_for(args.ckpt_dir))})
        return 0
    target = merge_checkpoint(resolved)
    logger.info(f"merged model: {target}")
    return 0
