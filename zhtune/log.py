"""zhtune's one logger. The CLI configures it once (`--log_level`); library code only calls
`logger.info(...)` / `logger.warning(...)`. Lines go to stderr as `[zhtune] ...`, so piped output on
stdout (replies, dry-run JSON) stays clean. Under torchrun only rank 0 logs below WARNING."""

import logging
import os
import sys
import threading
import time

logger = logging.getLogger("zhtune")

# Import-time notices of optional packages that say nothing to a zhtune user: torchao (zhtune[fp8], which peft
# and transformers import when it is installed) cannot load its CUDA-only extensions on a CPU, and torch's
# pytree calls its enum registration deprecated; one line each, on every command.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or int(os.environ.get("RANK", "0")) == 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "[zhtune] " + ("warning: " if record.levelno == logging.WARNING else
                                "error: " if record.levelno >= logging.ERROR else "")
        return prefix + record.getMessage()


def setup_logging(level: str = "INFO") -> None:
    """Idempotent: one stderr handler on the `zhtune` logger."""
    logger.setLevel(level.upper())
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, "_zhtune", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._zhtune = True
    handler.setFormatter(_Formatter())
    handler.addFilter(_RankZero())
    logger.addHandler(handler)


class still_running:
    """Context manager: while its block runs (a compilation, a conversion), log "still <what> (N s)" every
    `every` seconds from a daemon thread, so long silent work shows it is alive."""

    def __init__(self, what: str, every: float = 30.0):
        self.what, self.every = what, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        start = time.perf_counter()
        while not self._done.wait(self.every):
            logger.info(f"still {self.what} ({time.perf_counter() - start:.0f}s)")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
