"""zhtune: fine-tune, run, evaluate and serve open LLMs, with Chinese enhancement as its first job."""

__version__ = "0.1.0"

from zhtune import log as _log  # noqa: E402,F401 - quiets optional packages' import notices (zhtune/log.py)
