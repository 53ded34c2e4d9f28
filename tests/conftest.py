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


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """n short Chinese/English Q&A rows in the messages format."""
    import json
    import random
    rng = random.Random(seed)
    cities = [("浙江", "杭州"), ("江苏", "南京"), ("广东", "广州"), ("四川", "成都"), ("湖北", "武汉"), ("湖南", "长沙")]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            province, city = rng.choice(cities)
            row = {"messages": [{"role": "user", "content": f"{province}的省会在哪？({i})"},
                                {"role": "assistant", "content": f"{province}的省会是{city}。"}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


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
