#!/usr/bin/env bash
# The four full benchmark sets on the embedded Gemma 3 270M, on one GPU. Run from the repo root:
#   bash scripts/gpu_eval_full.sh GGUF_FILE DATA_DIR OUT_DIR
# GGUF_FILE: the assembled gemma-3-270m-q4_k_m.gguf (see shared/gpu/STAGING.md);
# DATA_DIR: arc/ ceval/ gsm8k/ mmlu/ in their original formats.
set -euo pipefail
export ZHTUNE_EMBEDDED_GGUF=$1 ZHTUNE_CACHE=${ZHTUNE_CACHE:-$HOME/.cache/zhtune}
data=$2; out=$3
start=$(date +%s)
python3 -c "from zhtune.models.embedded import embedded_model_dir; print(embedded_model_dir())"
echo "conversion: $(( $(date +%s) - start ))s"
start=$(date +%s)
python3 -m zhtune eval --model_type gemma3-270m --eval_dataset arc ceval gsm8k mmlu --eval_backend Native \
    --infer_backend pt --eval_data_dir $data --eval_batch_size ${BATCH:-128} --eval_output_dir $out/eval_outputs \
    --name gemma3-270m-full
echo "eval wall time: $(( $(date +%s) - start ))s"
