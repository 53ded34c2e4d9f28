"""A random-initialised Gemma-2-9B of the real config (google/gemma-2-9b-it's config.json) as a model folder,
with the carried Gemma tokenizer, for the GPU scripts (no hub, no weights needed):

    python3 scripts/random_gemma2.py OUT_DIR TOKENIZER_DIR [--layers 42] [--device cuda]

TOKENIZER_DIR holds tokenizer.json.gz and tokenizer_config.json. No Gemma 2 tokenizer is reachable offline, so
the carried one is the embedded Gemma 3's (262,144 ids, the same chat-template tokens); the model's vocab_size
is raised to it. Nothing is done when OUT_DIR already holds a config.json.
"""

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gemma2_9b  # noqa: E402 - the real config, one place for the benchmarks and these scripts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("tokenizer", type=Path)
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if (args.out / "config.json").exists():
        return 0
    start = time.time()
    with gzip.open(args.tokenizer / "tokenizer.json.gz", "rt", encoding="utf-8") as f:
        tok = json.load(f)
    vocab = max(256000, len(tok["model"]["vocab"]), 1 + max(t["id"] for t in tok["added_tokens"]))
    config = Gemma2Config(**dict(gemma2_9b.CONFIG, vocab_size=vocab, num_hidden_layers=args.layers))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = args.out.with_name(args.out.name + ".partial")  # renamed when complete
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    with gzip.open(args.tokenizer / "tokenizer.json.gz", "rb") as src, open(partial / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(args.tokenizer / "tokenizer_config.json", partial / "tokenizer_config.json")
    partial.rename(args.out)
    print(f"random Gemma-2-9B config ({args.layers} layers, vocab {vocab}) written to {args.out} in "
          f"{time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
