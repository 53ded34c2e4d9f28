"""Where a run writes, and `NPROC_PER_NODE=N zhtune sft ...` relaunching itself under torchrun."""

import os
import subprocess
import sys
import time
from pathlib import Path

from zhtune.args import env_world
from zhtune.log import logger

RUN_DIR_ENV = "ZHTUNE_RUN_DIR"


def is_distributed_child() -> bool:
    return "LOCAL_RANK" in os.environ


def close_process_group() -> None:
    """Destroy the process group before the process ends (also after a failure), rather than leaving it to
    the interpreter's teardown; a torchrun child then leaves through `leave_distributed_child`."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_distributed_child(code: int) -> None:
    """End a torchrun child now that its work is written: exit handlers and logs first, then `os._exit`,
    skipping the interpreter's teardown, where collective-library threads destroyed after the process
    group can still abort a finished rank ("terminate called without an active exception", exit -6, seen
    in CI on node 1 of the two-node test after close_process_group) and torchrun then fails the run."""
    import atexit
    import logging
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    world = env_world()
    return world["nproc_per_node"] * world["nnodes"]


def new_run_dir(output_dir: str, model_type: str, add_suffix: bool = True) -> Path:
    """output/<model_type>/v<N>-<YYYYmmdd-HHMMSS>, N counting the runs already there."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if not add_suffix:
        return Path(output_dir)
    base = Path(output_dir) / model_type
    n = len([p for p in base.glob("v*-*") if p.is_dir()]) if base.is_dir() else 0
    return base / f"v{n}-{time.strftime('%Y%m%d-%H%M%S')}"


def shared_run_dir(run_dir: Path) -> Path:
    """The run folder every rank writes into: rank 0's. Each node's launcher names its own folder
    (v<N>-<time> differs between nodes), so under torchrun rank 0 publishes its folder in torchrun's
    own key-value store (the agent's TCPStore at MASTER_ADDR:MASTER_PORT) and every other rank reads
    it there. Outside torchrun (one process) the folder is returned as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return run_dir
    from datetime import timedelta

    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=10))
    key = f"zhtune/run_dir/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if is_main_process():
        store.set(key, str(run_dir))
        return run_dir
    return Path(store.get(key).decode())


def relaunch_with_torchrun(argv: list[str], run_dir: Path) -> int:
    """Run `zhtune sft argv` in NPROC_PER_NODE processes; every rank writes into the same run_dir."""
    world = env_world()
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc_per_node={world['nproc_per_node']}", f"--nnodes={world['nnodes']}",
           f"--node_rank={world['node_rank']}", f"--master_addr={world['master_addr']}",
           f"--master_port={world['master_port']}", "-m", "zhtune.cli", "sft", *argv]
    logger.info(f"launching {world['nproc_per_node']} processes per node with torchrun")
    env = {**os.environ, RUN_DIR_ENV: str(run_dir)}
    return subprocess.call(cmd, env=env)
