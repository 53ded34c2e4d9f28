import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def gemma_tokenizer():
    from tiny_models import gemma_tokenizer_dir
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gemma_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders of tiny random Gemma 2, Gemma 3 and Qwen2 models (real configs, shrunk)."""
    from tiny_models import make_tiny_model_dir
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model_dir(root, arch) for arch in ("gemma2", "gemma3_text", "qwen2")}
