#!/usr/bin/env bash
# The GPU checks of the fast path, in one run on a GPU machine (issue 9's shapes): parity of CUDA
# log-probs with the CPU, rollout at 1x8, 8x8 and 32x8, the learner's forward + backward at
# 8 x 885 tokens, and the weight stream. Every result is one JSON line in OUT/results.jsonl.
#
#   scripts/gpu-bench.sh [--bin PATH] [--out DIR] [--quick | --offload]
#
# --bin     the medrl binary built by scripts/build-cuda.sh, or its .xz
#           (default: target/cuda-dist/medrl.xz, else target/cuda-dist/bin/medrl)
# --out     where results go (default: $OUT if set, else target/gpu-bench)
# --quick   parity and a short 1x8 rollout only (a smoke test of a new build)
# --offload tiny parity, then a full 7B learner step with AdamW state in host memory
#           (optimizer.offload, bf16 moments: ~67 GB of host memory), then a 7B model's bf16
#           blob from GPU weights through the gRPC stream into GPU weights again; a call of its own
#
# Shared libraries: those of the PyTorch install on the GPU machine (nvidia/cu13/lib and
# nvidia/nccl/lib under python3's site-packages), else the lib/ folder beside the binary.
# Peak GPU memory comes from nvidia-smi sampled every 100 ms while each step runs. Each step has a
# time limit so that one slow step leaves time for the others; a step that fails or times out is
# recorded as {"step": ..., "error": ...} and the run goes on.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=""
OUTDIR=${OUT:-$ROOT/target/gpu-bench}
MODE=full
while [[ $# -gt 0 ]]; do
  case $1 in
    --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
    --out) OUTDIR=${2:?--out needs a folder}; shift 2 ;;
    --quick) MODE=quick; shift ;;
    --offload) MODE=offload; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
RESULTS=$OUTDIR/results.jsonl
: > "$RESULTS"
log() { echo "gpu-bench.sh: $*" >&2; }

if [[ -z $BIN ]]; then
  for c in "$ROOT/target/cuda-dist/medrl.xz" "$ROOT/target/cuda-dist/bin/medrl"; do
    [[ -e $c ]] && { BIN=$c; break; }
  done
fi
[[ -n $BIN && -e $BIN ]] || { log "no binary: build one with scripts/build-cuda.sh --xz, or pass --bin"; exit 1; }
if [[ $BIN == *.xz ]]; then
  xz -dc "$BIN" > /tmp/medrl-gpu && chmod +x /tmp/medrl-gpu && BIN=/tmp/medrl-gpu
fi

LIBS=""
if SP=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null); then
  for d in "$SP/nvidia/cu13/lib" "$SP/nvidia/nccl/lib"; do [[ -d $d ]] && LIBS=$LIBS:$d; done
fi
[[ -d $(dirname "$BIN")/../lib ]] && LIBS=$LIBS:$(cd "$(dirname "$BIN")/../lib" && pwd)
export LD_LIBRARY_PATH=${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/medrl-cuda-cache}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUTDIR/gpu.txt" 2>&1 || true
log "GPU: $(cat "$OUTDIR/gpu.txt")"
SEVEN_B=$ROOT/configs/models/qwen2.5-vl-7b.json

# step NAME LIMIT_S ARGS...: runs `medrl ARGS`, appends its JSON lines with the step's name and
# peak GPU memory (MiB, nvidia-smi) to results.jsonl.
step() {
  local name=$1 limit=$2; shift 2
  local mem=$OUTDIR/$name.mem
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" 2>/dev/null &
  local smi=$!
  local start=$SECONDS
  timeout "$limit" "$BIN" "$@" > "$OUTDIR/$name.out" 2> "$OUTDIR/$name.err"
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  local peak
  peak=$(sort -n "$mem" 2>/dev/null | tail -1)
  python3 - "$name" "$rc" "${peak:-0}" "$((SECONDS - start))" "$OUTDIR/$name.out" "$OUTDIR/$name.err" >> "$RESULTS" <<'EOF'
import json, sys
name, rc, peak, wall, out, err = sys.argv[1], int(sys.argv[2]), int(sys.argv[3] or 0), int(sys.argv[4]), sys.argv[5], sys.argv[6]
lines = [l for l in open(out) if l.startswith("{")]
for l in lines:
    r = json.loads(l)
    r.update(step=name, peak_gpu_mib=peak, wall_s=wall)
    print(json.dumps(r))
if rc != 0 or not lines:
    tail = open(err).read()[-1500:]
    print(json.dumps({"step": name, "error": f"exit {rc}" + (" (time limit)" if rc == 124 else ""), "stderr_tail": tail, "peak_gpu_mib": peak, "wall_s": wall}))
EOF
  log "$name: exit $rc in $((SECONDS - start)) s, peak GPU memory ${peak:-?} MiB"
}

CUDA=(--device cuda --dtype bf16)
# The first CUDA run JIT-compiles candle's kernels (~20 s on a fresh machine): the tiny parity
# check pays for it.
step parity-tiny 60 bench parity "${CUDA[@]}"
# A decode-path failure with the other paths in tolerance points at the fused attention kernel:
# check the candle-ops decode once, and if it passes, measure everything after with it (recorded
# as `decode_attention: candle-ops` in the rollout lines) rather than spend the call on wrong
# numbers.
if python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
r = next((r for r in rows if r.get("step") == "parity-tiny" and "pass" in r), None)
kernel_suspect = r and not r["pass"] and r["decode_max_abs_diff"] > r["tolerance"] >= max(r["train_max_abs_diff"], r["infer_max_abs_diff"])
sys.exit(0 if kernel_suspect else 1)
EOF
then
  log "decode parity failed with the fused attention kernel; trying candle ops"
  MEDRL_DECODE_ATTENTION=ops step parity-tiny-ops 60 bench parity "${CUDA[@]}"
  python3 -c '
import json, sys
ok = any(json.loads(l).get("step") == "parity-tiny-ops" and json.loads(l).get("pass") for l in open(sys.argv[1]))
sys.exit(0 if ok else 1)' "$RESULTS" && export MEDRL_DECODE_ATTENTION=ops && log "using candle-ops decode attention from here on"
fi
case $MODE in
  offload)
    # The whole step of a full 7B fine-tune on one GPU: forward + backward at the issue's shapes,
    # gradients to the host, AdamW there, bf16 weights back. The first (warm-up) step also pays
    # the first touch of ~67 GB of host state.
    step learner-7b-offload 300 bench learner --config "$SEVEN_B" "${CUDA[@]}" --sequences 8 --image-size 448 --prompt-tokens 115 --completion-tokens 512 --optimizer adamw --offload --moments bf16
    # The gRPC weight path end to end at 7B (16.6 GB): encode from GPU weights, publish, a cold
    # and a warm fetch, decode onto the GPU. About 50 GB of host memory at its peak.
    step weight-sync-7b 150 bench weight-sync --config "$SEVEN_B" "${CUDA[@]}"
    ;;
  quick)
    step parity-tiny-f32 30 bench parity --device cuda --dtype f32
    step parity-7b-2layers 120 bench parity --config "$SEVEN_B" --layers 2 "${CUDA[@]}"
    step rollout-7b-1x8-short 120 bench rollout --config "$SEVEN_B" "${CUDA[@]}" --prompts 1 --samples 8 --image-size 448 --prompt-tokens 115 --new-tokens 64
    ;;
  full)
    step parity-tiny-f32 30 bench parity --device cuda --dtype f32
    step parity-7b-2layers 120 bench parity --config "$SEVEN_B" --layers 2 "${CUDA[@]}"
    # Issue 9's shapes: one 448x448 image (256 tokens) + 115 text tokens, 512 sampled tokens.
    step rollout-7b 180 bench rollout --config "$SEVEN_B" "${CUDA[@]}" --prompts 1,8,32 --samples 8 --image-size 448 --prompt-tokens 115 --new-tokens 512
    step learner-7b 120 bench learner --config "$SEVEN_B" "${CUDA[@]}" --sequences 8 --image-size 448 --prompt-tokens 115 --completion-tokens 512 --optimizer none
    step weight-sync 60 bench weight-sync --mib 4096
    ;;
esac
log "results in $RESULTS"
cat "$RESULTS"
