#!/usr/bin/env bash
# The vllm backend on the GPU machine (issue 18), after scripts/stage_vllm.sh (6 calls) in the same lease.
# Each step is one device call (<= 10 min); results land in $OUT.
#   bash scripts/gpu_vllm_run.sh tests     # tests/test_vllm_backend.py (vllm vs pt, streaming, CLI, merged LoRA, untied Gemma 2)
#   bash scripts/gpu_vllm_run.sh eval vllm # the seed's eval on the four FULL sets through vllm
#   bash scripts/gpu_vllm_run.sh eval pt   # the same through the pt backend (same prompts, greedy)
#   bash scripts/gpu_vllm_run.sh deploy    # zhtune deploy --infer_backend vllm answering the openai client
# Carry .carry (pytest wheels + the benchmark files as bench.tar.xz) in the call that runs a step.
set -uo pipefail
. /root/keep/env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -d /root/keep/data/benchmarks ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/keep/site .carry/whl/*.whl
  mkdir -p /root/keep/data && tar -xJf .carry/bench.tar.xz -C /root/keep/data
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
case "$1" in
tests)
  PYTHONUNBUFFERED=1 timeout 580 python3 -m pytest -x -q -p no:cacheprovider tests/test_vllm_backend.py 2>&1 | tee "$OUT/vllm_tests.log" ;;
eval)
  backend=$2; start=$(date +%s)
  PYTHONUNBUFFERED=1 timeout 580 python3 -m zhtune eval --model_type gemma3-270m --eval_dataset arc ceval gsm8k mmlu \
      --eval_backend Native --infer_backend "$backend" --eval_data_dir /root/keep/data/benchmarks --dtype bf16 \
      --eval_batch_size 256 --gpu_memory_utilization 0.8 --eval_output_dir /root/keep/eval --name "full-$backend" \
      2>&1 | tee "$OUT/eval_$backend.log"
  echo "wall $(( $(date +%s) - start )) s" | tee -a "$OUT/eval_$backend.log"
  cp "$(ls -d /root/keep/eval/full-$backend/*/ | tail -1)eval_result.jsonl" "$OUT/eval_result_$backend.jsonl" ;;
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
