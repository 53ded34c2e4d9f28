#!/usr/bin/env bash
# The seed's `sft` command on N GPUs with a random-initialised Gemma-2-9B of the real config
# (no hub, no weights needed). Run on the GPU machine from the repo root:
#   NGPU=4 bash scripts/gpu_seed_sft.sh CARRY_DIR OUT_DIR
# CARRY_DIR holds tokenizer.json.gz + tokenizer_config.json (the Gemma tokenizer) and data/alpaca_zh_demo.json.
# No Gemma 2 tokenizer is reachable offline, so the carried one is the embedded Gemma 3's (262,144 ids,
# the same chat-template tokens); the random model's vocab_size is raised to it (+2.4% embedding rows).
set -euo pipefail
carry=$1; out=$2; ngpu=${NGPU:-4}
model=${MODEL_DIR:-${TMPDIR:-/tmp}/gemma2-9b-random}  # where the random model is built once
if [ ! -f $model/config.json ]; then
python3 - "$model" "$carry" <<'PY'
import gzip, json, shutil, sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, Gemma2Config
out, carry = Path(sys.argv[1]), Path(sys.argv[2])
with gzip.open(carry / "tokenizer.json.gz", "rt", encoding="utf-8") as f:
    tok = json.load(f)
vocab = max(256000, len(tok["model"]["vocab"]), 1 + max(t["id"] for t in tok["added_tokens"]))
# google/gemma-2-9b-it's config.json
config = Gemma2Config(vocab_size=vocab, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=4096,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1)
t = time.time()
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
with gzip.open(carry / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.copy(carry / "tokenizer_config.json", out / "tokenizer_config.json")
print(f"random Gemma-2-9B written in {time.time() - t:.0f}s", flush=True)
PY
fi
export MASTER_PORT=29500 NPROC_PER_NODE=$ngpu CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((ngpu - 1)))
python3 -m zhtune sft \
    --model_id_or_path $model --model_type gemma2-9b-instruct \
    --dataset $carry/data/alpaca_zh_demo.json#2000 self-cognition#500 \
    --lora_target_modules EMBEDDING ALL lm_head \
    --lora_modules_to_save LN \
    --adam_beta2 0.95 \
    --learning_rate 5e-5 \
    --num_train_epochs 5 \
    --eval_steps 100 \
    --max_length 8192 \
    --gradient_accumulation_steps 16 \
    --model_name 小黄 'Xiao Huang' \
    --model_author 魔搭 ModelScope \
    --save_total_limit -1 \
    --logging_steps 1 \
    --use_flash_attn true \
    --max_steps ${MAX_STEPS:-4} --identity_probe false --output_dir $out/output
