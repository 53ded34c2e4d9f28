"""`zhtune <command> ...`: maps command names to their entry functions, nothing else."""

import importlib
import os
import sys
import traceback

from zhtune import args as A
from zhtune.errors import UserError, closest
from zhtune.log import setup_logging

COMMANDS = {
    # name: (arguments class, module:function, one-line summary)
    "sft": (A.SftArguments, "zhtune.train.sft:sft_main", "fine-tune a model (LoRA or full) on a mix of datasets"),
    "infer": (A.InferArguments, "zhtune.infer.infer:infer_main", "chat with a model or checkpoint, or run batch inference"),
    "eval": (A.EvalArguments, "zhtune.eval.evaluate:eval_main", "score models on ARC, C-Eval, GSM8K, MMLU, self-cognition"),
    "export": (A.ExportArguments, "zhtune.tuners.export:export_main", "merge a LoRA checkpoint into a standalone model folder"),
    "deploy": (A.DeployArguments, "zhtune.serve.deploy:deploy_main", "serve a model over an OpenAI-compatible HTTP API"),
}


def usage() -> str:
    lines = ["usage: zhtune <command> [--name value ...]", "", "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "`zhtune <command> --help` lists a command's arguments and defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if name not in COMMANDS:
            raise UserError(f"unknown command '{name}'.{closest(name, COMMANDS)} Commands: {', '.join(COMMANDS)}.")
        cls, target, summary = COMMANDS[name]
        if "--help" in rest or "-h" in rest:
            print(A.format_help(cls, name, summary))
            return 0
        args = A.parse_args(cls, rest)
        setup_logging(args.log_level)
        args.argv = rest  # for commands that relaunch themselves (sft under torchrun)
        module, func = target.split(":")
        result = getattr(importlib.import_module(module), func)(args)
        return int(result or 0)
    except UserError as e:
        if os.environ.get("ZHTUNE_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()  # the chained cause included
        print(f"zhtune {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zhtune {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
