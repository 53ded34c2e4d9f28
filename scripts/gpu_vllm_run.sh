#!/usr/bin/env bash
# GPU runs of issues 18 (vllm), 17 (pt generation) and 15 (loglik), after scripts/stage_vllm.sh (6 calls) in the
# same lease. Steps, any number in one device call (each well under the 10-minute call limit):
#   bash scripts/gpu_vllm_run.sh convert          # the embedded model converted once (timed; tokenizer ids checked)
#   bash scripts/gpu_vllm_run.sh tests [-k EXPR]  # tests/test_vllm_backend.py (vllm vs pt, stream, CLI, pty, merged LoRA, untied Gemma 2);
#        add tests/test_generation.py (with -k "... or gpu_compiled") for the pt engine's GPU greedy test
#   bash scripts/gpu_vllm_run.sh eval vllm|pt     # the seed's eval on the four FULL sets (same prompts, greedy)
#   bash scripts/gpu_vllm_run.sh loglik           # --eval_mode loglik on the full ARC, C-Eval, MMLU (pt)
#   bash scripts/gpu_vllm_run.sh merged           # sft (seed LoRA) -> eval --ckpt_dir --merge_lora true, vllm and pt
#   bash scripts/gpu_vllm_run.sh deploy           # zhtune deploy --infer_backend vllm answering the openai client
#   bash scripts/gpu_vllm_run.sh speed            # benchmarks/infer_speed.py --quick --profile (needs no staging)
#   bash scripts/gpu_vllm_run.sh speed-full       # infer_speed.py --profile --batched_single_reads: 1,000 prompts (~8 min, no staging)
#   bash scripts/gpu_vllm_run.sh speed-one-row    # batch 1 only: the one-row step under other inductor options,
#                                                 # the 2-row step, the default twice, then the weights unfused
#                                                 # and gate/up fused only (~5 min, no staging)
#   bash scripts/gpu_vllm_run.sh speed-levers     # batched, quick workload: the default against one read per step
#                                                 # while requests wait and against the eager prefill (~4 min)
#   bash scripts/gpu_vllm_run.sh speed-profile-batched  # a profiled batched run of 128 quick-workload prompts
#   bash scripts/gpu_vllm_run.sh speed-start      # the same benchmark detached (setsid), needs no staging: it
#                                                 # runs while the staging calls copy (run those under `nice`)
#   bash scripts/gpu_vllm_run.sh speed-collect N  # waits up to N s for it, then copies its log and JSON to $OUT
#   bash scripts/gpu_vllm_run.sh speed-stop       # stops it (what it wrote so far goes to $OUT)
#   bash scripts/gpu_vllm_run.sh nan-probe        # the plain training path's nan on the GPU: 16 variants x 6 steps (~2 min)
#   bash scripts/gpu_vllm_run.sh nan-probe-cli    # the same through zhtune sft: 5 flag variants x 6 steps (~3 min)
#   bash scripts/gpu_vllm_run.sh speed-vllm       # infer_speed.py --quick --engine vllm: vllm on the same workloads
# Carry .carry (pytest wheels + the benchmark files as bench.tar.xz) in the call that runs a step (not speed-*).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SPEED=/root/keep/speed
case "$1" in
speed)  # needs no staging (random weights, the image's torch and transformers)
  PYTHONUNBUFFERED=1 timeout ${SPEED_TIMEOUT:-540} python3 benchmarks/infer_speed.py --quick --profile --out "$OUT/infer-speed-quick.json" \
      2>&1 | grep -v "it/s" | tee "$OUT/infer-speed-quick.log" | grep "bench\|zhtune\|Error\|error" | tail -40
  exit 0 ;;
speed-full)  # the issue's full workload: 1,000 prompts (HF baseline on 256), needs no staging (~7 min)
  PYTHONUNBUFFERED=1 timeout ${SPEED_TIMEOUT:-580} python3 benchmarks/infer_speed.py --profile --batched_single_reads --out "$OUT/infer-speed-full.json" \
      2>&1 | grep -v "it/s" | tee "$OUT/infer-speed-full.log" | grep "bench\|zhtune\|Error\|error" | tail -60
  exit 0 ;;
speed-one-row)  # which inductor options make the batch-1 (one-row) step fastest; needs no staging
  PYTHONUNBUFFERED=1 timeout ${SPEED_TIMEOUT:-540} python3 benchmarks/infer_speed.py --quick --skip match batched hf \
      --one_row_options '{}' '{"coordinate_descent_tuning": true, "max_autotune_pointwise": true}' --weight_fusion \
      --out "$OUT/infer-speed-one-row.json" \
      2>&1 | grep -v "it/s" | tee "$OUT/infer-speed-one-row.log" | grep "bench\|zhtune\|Error\|error" | tail -30
  exit 0 ;;
speed-levers)  # the batched levers against the default in one run, quick workload: one host read per step while
  # requests wait (the previous default) and the prefill eager (the default before the eighth session); ~4 min
  PYTHONUNBUFFERED=1 timeout ${SPEED_TIMEOUT:-400} python3 benchmarks/infer_speed.py --quick --skip bs1 match hf \
      --batched_single_reads --other_prefill --out "$OUT/infer-speed-levers.json" \
      2>&1 | grep -v "it/s" | tee "$OUT/infer-speed-levers.log" | grep "bench\|zhtune\|Error\|error" | tail -40
  exit 0 ;;
speed-profile-batched)  # where a batched run's time goes (kernels by kind, steps, forwards); no staging (~2.5 min)
  PYTHONUNBUFFERED=1 timeout ${SPEED_TIMEOUT:-240} python3 benchmarks/infer_speed.py --quick --skip bs1 match batched hf \
      --profile_batched ${PROFILE_PROMPTS:-128} --out "$OUT/infer-speed-profile-batched.json" \
      2>&1 | grep -v "it/s" | tee "$OUT/infer-speed-profile-batched.log" | grep "bench\|zhtune\|Error\|error" | tail -40
  exit 0 ;;
speed-start)
  mkdir -p $SPEED/repo && cp -r zhtune benchmarks $SPEED/repo/ && cd $SPEED/repo
  # no CPU pinning: inductor compiles on every core (pinned to 4 of 16, the 9B warm-up ran > 12 minutes)
  PYTHONUNBUFFERED=1 setsid nohup timeout ${SPEED_TIMEOUT:-900} python3 benchmarks/infer_speed.py --quick \
      --out $SPEED/infer-speed-quick.json > $SPEED/infer-speed-quick.log 2>&1 < /dev/null &
  echo "infer_speed --quick started detached (pid $!)"; exit 0 ;;
speed-collect)
  for _ in $(seq 1 "${2:-0}"); do pgrep -f benchmarks/infer_speed.py >/dev/null || break; sleep 1; done
  pgrep -f benchmarks/infer_speed.py >/dev/null && echo "infer_speed still running: copying what it wrote so far"
  cp $SPEED/infer-speed-quick.* "$OUT"/ 2>/dev/null
  grep -v "it/s" "$OUT/infer-speed-quick.log" | grep "bench\|Error\|error" | tail -40; exit 0 ;;
speed-stop)  # the bracket keeps pkill from matching the command line that runs it
  pkill -f "benchmarks/[i]nfer_speed" && echo "infer_speed stopped"; cp $SPEED/infer-speed-quick.* "$OUT"/ 2>/dev/null; exit 0 ;;
esac
. /root/keep/env.sh
if [ ! -d /root/keep/data/benchmarks ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/keep/site .carry/whl/*.whl
  mkdir -p /root/keep/data && tar -xJf .carry/bench.tar.xz -C /root/keep/data
fi
if [ ! -f "$OUT/device.txt" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
  python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
fi
EVAL_COMMON="--eval_backend Native --eval_data_dir /root/keep/data/benchmarks --dtype bf16 --eval_batch_size 256"
case "$1" in
convert)
  start=$(date +%s)
  python3 - <<'PY' 2>&1 | grep -v it/s | tee "$OUT/convert.log"
from transformers import AutoTokenizer
from zhtune.models.embedded import PROBE_IDS, embedded_model_dir, probe_ids
folder = embedded_model_dir()
print("converted:", folder, "tokenizer ids are Gemma 3's:", probe_ids(AutoTokenizer.from_pretrained(folder)) == PROBE_IDS)
PY
  echo "conversion wall $(( $(date +%s) - start )) s" | tee -a "$OUT/convert.log" ;;
tests)
  shift
  PYTHONUNBUFFERED=1 timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -v -p no:cacheprovider --durations=0 \
      tests/test_vllm_backend.py "$@" 2>&1 | grep --line-buffered -v it/s | tee -a "$OUT/vllm_tests.log" | tail -60 ;;  # a cut run keeps its log
eval)
  backend=$2; start=$(date +%s)
  extra=""; [ "$backend" = vllm ] && extra="--gpu_memory_utilization 0.8"
  PYTHONUNBUFFERED=1 timeout ${EVAL_TIMEOUT:-400} python3 -m zhtune eval --model_type gemma3-270m \
      --eval_dataset arc ceval gsm8k mmlu --infer_backend "$backend" $EVAL_COMMON $extra \
      --eval_output_dir /root/keep/eval --name "full-$backend" 2>&1 | grep -v "it/s\|INFO" | tee "$OUT/eval_$backend.log"
  echo "wall $(( $(date +%s) - start )) s" | tee -a "$OUT/eval_$backend.log"
  d=$(ls -d /root/keep/eval/full-$backend/*/ | tail -1)
  tar -czf "$OUT/eval_items_$backend.tgz" -C "$d" . ;;
loglik)
  start=$(date +%s)
  PYTHONUNBUFFERED=1 timeout ${EVAL_TIMEOUT:-400} python3 -m zhtune eval --model_type gemma3-270m --eval_mode loglik \
      --eval_dataset arc ceval mmlu --infer_backend pt $EVAL_COMMON --eval_output_dir /root/keep/eval \
      --name full-loglik 2>&1 | grep -v "it/s" | tee "$OUT/eval_loglik.log"
  echo "wall $(( $(date +%s) - start )) s" | tee -a "$OUT/eval_loglik.log"
  d=$(ls -d /root/keep/eval/full-loglik/*/ | tail -1)
  tar -czf "$OUT/eval_items_loglik.tgz" -C "$d" . ;;
merged)
  # the default training path (the fast path on a GPU); MERGED_SFT_FLAGS="--fast_path false" for the plain path, whose
  # gradients were nan on the H200 on 2026-11-29 (see nan-probe)
  run=/root/keep/merged_run; rm -rf $run
  PYTHONUNBUFFERED=1 timeout ${SFT_TIMEOUT:-420} python3 -m zhtune sft --model_type gemma3-270m --dataset self-cognition#200 zh-instruct \
      --model_name 小黄 "Xiao Huang" --model_author 魔搭 ModelScope --lora_target_modules EMBEDDING ALL lm_head \
      --lora_modules_to_save LN --learning_rate 1e-3 --num_train_epochs 2 --batch_size 8 --eval_steps 50 \
      --identity_probe false ${MERGED_SFT_FLAGS:-} --output_dir $run 2>&1 | grep -v "it/s" | tee "$OUT/merged_sft_full.log" \
      | tail -15 | tee "$OUT/merged_sft.log"  # full log: TORCH_LOGS=recompiles shows what the first step compiles
  ckpt=$(grep -o "last checkpoint: .*" "$OUT/merged_sft.log" | tail -1 | cut -d' ' -f3)
  [ -d "$ckpt" ] || { echo "merged: no checkpoint found (sft cut by its ${SFT_TIMEOUT:-420} s limit or failed)"
                      echo "merged: no checkpoint found ($(find $run -maxdepth 3 | head))"; exit 1; }
  for backend in vllm pt; do
    extra=""; [ "$backend" = vllm ] && extra="--gpu_memory_utilization 0.25 --enforce_eager true"  # beside `tests`
    printf '你是谁？\n浙江的省会在哪？\n' | PYTHONUNBUFFERED=1 timeout 200 python3 -m zhtune infer --ckpt_dir $ckpt \
        --merge_lora true --infer_backend $backend --max_new_tokens 32 --do_sample false --dtype bf16 $extra \
        > "$OUT/merged_infer_$backend.txt" 2> >(grep -v "it/s\|INFO" | tail -5 >&2)
    PYTHONUNBUFFERED=1 timeout 200 python3 -m zhtune eval --ckpt_dir $ckpt --merge_lora true --eval_dataset arc ceval \
        --eval_limit 300 --infer_backend $backend $EVAL_COMMON $extra --eval_output_dir /root/keep/eval \
        --name merged-$backend 2>&1 | grep "zhtune" | tee "$OUT/merged_eval_$backend.log"
  done
  grep -o '"tie_word_embeddings": [a-z]*' "$ckpt-merged/config.json" | tee -a "$OUT/merged_eval_vllm.log"
  diff "$OUT/merged_infer_vllm.txt" "$OUT/merged_infer_pt.txt" && echo "merged checkpoint: vllm and pt replies identical" ;;
nan-probe)  # the plain path's nan on the H200 (2026-11-29): sdpa/eager x left/right x checkpointing x optimizer, 6 steps each
  PYTHONUNBUFFERED=1 timeout 300 python3 scripts/gpu_probe_training_nan.py --steps 6 2>&1 | grep "probe" \
      | tee "$OUT/nan_probe.log" ;;
nan-probe-cli)  # the same question through `zhtune sft`: the seed's LoRA, 6 steps per variant
  seed_lora="--lora_target_modules EMBEDDING ALL lm_head --lora_modules_to_save LN"
  for variant in "$seed_lora" "$seed_lora --gradient_checkpointing false" "$seed_lora --dtype fp32" \
                 "--lora_target_modules ALL --lora_modules_to_save LN" "--lora_target_modules EMBEDDING ALL lm_head"; do
    echo "== $variant" | tee -a "$OUT/nan_probe_cli.log"
    PYTHONUNBUFFERED=1 timeout 120 python3 -m zhtune sft --model_type gemma3-270m --dataset self-cognition#200 zh-instruct \
        --model_name 小黄 "Xiao Huang" --model_author 魔搭 ModelScope $variant --learning_rate 1e-3 --max_steps 6 \
        --batch_size 8 --logging_steps 1 --eval_steps 100 --identity_probe false --fast_path false \
        --output_dir /root/keep/nan_probe 2>&1 | grep -o "'loss': '[^']*', 'grad_norm': '[^']*'\|error: .*" | tee -a "$OUT/nan_probe_cli.log"
  done ;;
speed-vllm)
  PYTHONUNBUFFERED=1 timeout ${SPEED_TIMEOUT:-420} python3 benchmarks/infer_speed.py --quick --engine vllm \
      --out "$OUT/infer-speed-quick-vllm.json" 2>&1 | grep -v "it/s" | tee "$OUT/infer-speed-quick-vllm.log" \
      | grep "bench\|Error\|error" | tail -20 ;;
deploy)
  port=8765
  python3 -m zhtune deploy --model_type gemma3-270m --infer_backend vllm --enforce_eager true \
      --gpu_memory_utilization 0.3 --port $port > "$OUT/deploy.log" 2>&1 &
  server=$!
  PYTHONUNBUFFERED=1 timeout 300 python3 - "$port" <<'PY' 2>&1 | tee "$OUT/deploy_client.log"
import sys, time, openai
client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
for _ in range(240):
    try:
        print("models:", [m.id for m in client.models.list().data]); break
    except Exception:
        time.sleep(1)
reply = client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "浙江的省会在哪？"}],
                                       temperature=0, max_tokens=16)
print("reply:", repr(reply.choices[0].message.content), reply.choices[0].finish_reason, reply.usage)
pieces = [c for c in client.chat.completions.create(model="gemma3-270m", stream=True, temperature=0, max_tokens=16,
          messages=[{"role": "user", "content": "浙江的省会在哪？"}])]
text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
print("stream:", repr(text), [c.choices[0].finish_reason for c in pieces if c.choices][-1])
assert text.strip() == reply.choices[0].message.content.strip()
print("deploy with vllm: OK")
PY
  kill $server; wait $server 2>/dev/null ;;
esac
