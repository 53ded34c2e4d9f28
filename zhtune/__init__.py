"""zhtune: fine-tune, run, evaluate and serve open LLMs, with Chinese enhancement as its first job."""

__version__ = "0.1.0"
