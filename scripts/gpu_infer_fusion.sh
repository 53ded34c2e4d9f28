#!/usr/bin/env bash
# On the GPU machine (no staging; carry .carry16 for the tokenizer): `zhtune infer --val_dataset` on a random
# Gemma-2-9B config of 4 layers, once with the engine's default weight fusion (gate/up and q/k/v read as one
# weight in the CUDA-graph decode step) and once with ZHTUNE_PT_FUSED_WEIGHTS=0; the replies must be equal.
# A random model's greedy tokens may all be special tokens that decode to empty replies: then this checks that
# the fused path runs through the CLI (its log line, the compilation), and the benchmark compares the tokens.
#   OUT=... bash scripts/gpu_infer_fusion.sh      (~2-3 min)
set -uo pipefail
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/fusion}; mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 scripts/random_gemma2.py "$WORK/gemma2-9b-random-L4" .carry16/tok --layers 4
python3 - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = [{"query": q} for q in ("你好，你是谁？", "浙江的省会在哪里？", "写一首关于春天的短诗。", "1+1=?")]
(work / "queries.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
PY
for fused in 1 0; do
    rm -rf "$WORK/result-$fused"
    ZHTUNE_PT_FUSED_WEIGHTS=$fused timeout 240 python3 -m zhtune infer --model_id_or_path "$WORK/gemma2-9b-random-L4" \
        --model_type gemma2-9b-instruct --val_dataset "$WORK/queries.jsonl" --max_new_tokens 48 --do_sample false \
        --infer_backend pt --result_dir "$WORK/result-$fused" 2>&1 | grep -v "it/s" | tee "$OUT/infer-fused-$fused.log" \
        | grep "zhtune\|Error\|error" | tail -12
done
python3 - "$WORK" <<'PY' | tee "$OUT/infer-fusion.txt"
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = {f: [json.loads(l) for p in sorted((work / f"result-{f}").glob("*.jsonl")) for l in p.read_text().splitlines()]
        for f in ("1", "0")}
same = [a["response"] == b["response"] for a, b in zip(rows["1"], rows["0"])]
print(f"replies fused vs unfused: {sum(same)}/{len(same)} identical ({[len(r['response']) for r in rows['1']]} chars)")
PY
