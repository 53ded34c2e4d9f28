#!/usr/bin/env bash
# The seed's `sft` command on N GPUs with a random-initialised Gemma-2-9B of the real config
# (no hub, no weights needed). Run on the GPU machine from the repo root:
#   NGPU=4 bash scripts/gpu_seed_sft.sh CARRY_DIR OUT_DIR
# CARRY_DIR holds tokenizer.json.gz + tokenizer_config.json (the Gemma tokenizer) and data/alpaca_zh_demo.json.
# The random model and its tokenizer: scripts/random_gemma2.py (vocab raised to the carried tokenizer's).
set -euo pipefail
carry=$1; out=$2; ngpu=${NGPU:-4}
model=${MODEL_DIR:-${TMPDIR:-/tmp}/gemma2-9b-random}  # where the random model is built once
python3 scripts/random_gemma2.py "$model" "$carry"
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
