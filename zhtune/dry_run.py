"""`--dry_run true`: show what a command would do, then one JSON line for scripts and tests."""

import dataclasses
import json

from zhtune.log import logger


def print_dry_run(command: str, args, resolved: dict) -> None:
    logger.info(f"{command} --dry_run: nothing is loaded or downloaded")
    for key, value in dataclasses.asdict(args).items():
        print(f"  {key} = {value!r}")
    for key, value in resolved.items():
        print(f"  resolved.{key} = {value!r}")
    print(json.dumps({"command": command, **resolved}, ensure_ascii=False))
