#!/usr/bin/env bash
# The Kubernetes job on one machine without Kubernetes: the same three roles as processes, with the
# same config file and the same overrides the JobSet passes (deploy/k8s/base/jobset.yaml), on
# loopback. Like the JobSet: the coordinator starts first, the learner and the workers once it
# listens, the run ends when the learner exits (0 = success), and then the others are stopped.
#
#   deploy/local/run.sh [--config configs/multinode-example.yaml] [--workers 1] [--bin PATH]
#                       [--run-dir runs/local] [--set key=value]...
#
# Logs: RUN_DIR/logs/{coordinator,learner,worker-N}.log. Metrics: coordinator :9090, learner :9091,
# worker N :(9092+N); gRPC: coordinator :50051, learner :50052, worker N :(50053+N).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONFIG=$ROOT/configs/multinode-example.yaml
WORKERS=1
BIN=""
RUN_DIR=$ROOT/runs/local
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) CONFIG=${2:?}; shift 2 ;;
    --workers) WORKERS=${2:?}; shift 2 ;;
    --bin) BIN=${2:?}; shift 2 ;;
    --run-dir) RUN_DIR=${2:?}; shift 2 ;;
    --set) EXTRA+=(--set "${2:?}"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --workers must be >= 1" >&2; exit 2; }
if [[ -z $BIN ]]; then
  for b in "$ROOT/target/cuda-dist/bin/medrl" "$ROOT/target/release/medrl" "$ROOT/target/debug/medrl"; do
    [[ -x $b ]] && { BIN=$b; break; }
  done
fi
[[ -n $BIN && -x $BIN ]] || { echo "run.sh: no medrl binary: cargo build --release -p medrl (or --bin PATH)" >&2; exit 1; }
[[ -f $CONFIG ]] || { echo "run.sh: config $CONFIG not found" >&2; exit 1; }
# The CUDA build's libraries (scripts/build-cuda.sh); harmless for a CPU build.
if [[ -d $(dirname "$BIN")/../lib ]]; then
  LIB_DIR=$(cd "$(dirname "$BIN")/../lib" && pwd)
  export LD_LIBRARY_PATH=$LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

mkdir -p "$RUN_DIR/logs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
# The shared token (a Secret on Kubernetes).
export MEDRL_TOKEN_FILE=${MEDRL_TOKEN_FILE:-$RUN_DIR/token}
if [[ ! -s $MEDRL_TOKEN_FILE ]]; then
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$MEDRL_TOKEN_FILE")
fi
export RUST_LOG=${RUST_LOG:-info}

COMMON=(--config "$CONFIG"
  --set cluster.coordinator=http://127.0.0.1:50051
  --set cluster.learner=http://127.0.0.1:50052
  --set "run.output_dir=$RUN_DIR"
  "${EXTRA[@]}")

pids=()
# shellcheck disable=SC2329  # called by the trap below
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_port() {  # like the readiness gate of dependsOn: until something listens on the port
  local port=$1 pid=$2 name=$3
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || { echo "run.sh: $name exited; see $RUN_DIR/logs/$name.log" >&2; return 1; }
    sleep 1
  done
  echo "run.sh: $name does not listen on :$port after 10 min" >&2
  return 1
}

"$BIN" coordinator "${COMMON[@]}" \
  --set coordinator.listen=127.0.0.1:50051 --set coordinator.metrics_listen=127.0.0.1:9090 \
  > "$RUN_DIR/logs/coordinator.log" 2>&1 &
pids+=($!)
wait_port 50051 "${pids[0]}" coordinator
echo "run.sh: coordinator up (pid ${pids[0]})" >&2

"$BIN" learner "${COMMON[@]}" \
  --set cluster.learner_listen=127.0.0.1:50052 --set cluster.learner_metrics_listen=127.0.0.1:9091 \
  > "$RUN_DIR/logs/learner.log" 2>&1 &
learner=$!
pids+=("$learner")
for ((i = 0; i < WORKERS; i++)); do
  JOB_COMPLETION_INDEX=$i "$BIN" worker "${COMMON[@]}" \
    --set "cluster.worker_health_listen=127.0.0.1:$((50053 + i))" \
    --set "cluster.worker_metrics_listen=127.0.0.1:$((9092 + i))" \
    > "$RUN_DIR/logs/worker-$i.log" 2>&1 &
  pids+=($!)
done
echo "run.sh: learner (pid $learner) and $WORKERS worker(s) started; logs in $RUN_DIR/logs" >&2

set +e
wait "$learner"
status=$?
set -e
echo "run.sh: learner exited with $status; stopping the coordinator and the workers" >&2
exit "$status"
