"""Fixtures only; the helpers they use live in helpers.py and tiny_models.py."""

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import write_chat_jsonl  # noqa: E402
from tiny_models import gemma_tokenizer_dir, make_tiny_model_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_zhtune_logger():
    """`zhtune.cli.main` attaches a stderr handler bound to the sys.stderr of its test; drop it after
    the test, so a later test never logs into a closed capture stream."""
    logger = logging.getLogger("zhtune")
    level, propagate = logger.level, logger.propagate
    yield
    for handler in [h for h in logger.handlers if getattr(h, "_zhtune", False)]:
        logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def zhtune_log(caplog):
    """caplog for the `zhtune` logger at INFO, also after setup_logging (which stops propagation).
    `zhtune_log.messages` are the messages without the `[zhtune] ` prefix."""
    logger = logging.getLogger("zhtune")
    propagate = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="zhtune")
    yield caplog
    logger.propagate = propagate


@pytest.fixture(scope="session")
def gemma_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gemma_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders of tiny random Gemma 2, Gemma 3 and Qwen2 models (real configs, shrunk)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model_dir(root, arch) for arch in ("gemma2", "gemma3_text", "qwen2")}


@pytest.fixture(scope="session")
def trained_run(tiny_models, tmp_path_factory):
    """A short real `zhtune sft` run on the tiny Gemma 2 (tied embeddings, LoRA on embedding + lm_head)."""
    from zhtune.cli import main
    root = tmp_path_factory.mktemp("sft_run")
    data = write_chat_jsonl(root / "train.jsonl", 24)
    argv = ["sft", "--model_id_or_path", str(tiny_models["gemma2"]), "--dataset", str(data),
            "--lora_target_modules", "EMBEDDING", "ALL", "lm_head", "--lora_modules_to_save", "LN",
            "--learning_rate", "5e-3", "--max_steps", "6", "--eval_steps", "3", "--batch_size", "2",
            "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--output_dir", str(root / "output"),
            "--dataset_test_ratio", "0.1", "--save_total_limit", "-1"]
    assert main(argv) == 0
    run_dir = next((root / "output" / "gemma2-9b-instruct").glob("v0-*"))
    return {"root": root, "run_dir": run_dir, "argv": argv, "data": data}
