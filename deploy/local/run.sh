#!/usr/bin/env bash
# The Kubernetes job on one machine without Kubernetes: the same three roles as processes, with the
# same config file and the same overrides the JobSet passes (deploy/k8s/base/jobset.yaml), on
# loopback. Like the JobSet: the coordinator starts first, the learner and the workers once it
# listens, the run ends when the learner exits (0 = success), and then the others are stopped.
#
#   deploy/local/run.sh [--config configs/octomed-7b-pmc-vqa-8k.yaml] [--workers 1] [--bin PATH]
#                       [--run-dir runs/local] [--base-port 50051] [--metrics-port 9090]
#                       [--set key=value]...
#
# The default config is the one the base and single-node manifests mount; it names /models and
# /data paths and a GPU, so point --set model.path / data.train (and model.device) elsewhere when
# those are not on this machine (deploy/README.md section 9 has a CPU try-out).
# Ports, all on 127.0.0.1: gRPC coordinator BASE (50051), learner BASE+1, worker N BASE+2+N;
# metrics coordinator METRICS (9090), learner METRICS+1, worker N METRICS+2+N. Any of them
# already taken stops the script before it starts anything (choose others with the two flags).
# Logs: RUN_DIR/logs/{coordinator,learner,worker-N}.log. When the learner exits (or on Ctrl-C)
# the others get SIGTERM, then SIGKILL after 10 s; the script exits with the learner's status.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONFIG=$ROOT/configs/octomed-7b-pmc-vqa-8k.yaml
WORKERS=1
BASE_PORT=50051
METRICS_PORT=9090
BIN=""
RUN_DIR=$ROOT/runs/local
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) CONFIG=${2:?}; shift 2 ;;
    --workers) WORKERS=${2:?}; shift 2 ;;
    --bin) BIN=${2:?}; shift 2 ;;
    --run-dir) RUN_DIR=${2:?}; shift 2 ;;
    --base-port) BASE_PORT=${2:?}; shift 2 ;;
    --metrics-port) METRICS_PORT=${2:?}; shift 2 ;;
    --set) EXTRA+=(--set "${2:?}"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --workers must be >= 1" >&2; exit 2; }
for flag in "--base-port $BASE_PORT" "--metrics-port $METRICS_PORT"; do
  port=${flag#* }
  if ! [[ $port =~ ^[1-9][0-9]*$ ]] || ((port + WORKERS + 1 > 65535)); then
    echo "run.sh: ${flag% *} must leave room for $((WORKERS + 2)) ports below 65536, got '$port'" >&2; exit 2
  fi
done
if ((BASE_PORT <= METRICS_PORT + WORKERS + 1 && METRICS_PORT <= BASE_PORT + WORKERS + 1)); then
  echo "run.sh: the --base-port and --metrics-port ranges ($((WORKERS + 2)) ports each) overlap" >&2; exit 2
fi
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

COORDINATOR_PORT=$BASE_PORT
LEARNER_PORT=$((BASE_PORT + 1))
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Something already answering on a port would pass the readiness wait below and take the roles'
# calls (typically a run.sh still running, or another service on 50051 / 9090).
for port in $(seq "$BASE_PORT" $((BASE_PORT + WORKERS + 1))) $(seq "$METRICS_PORT" $((METRICS_PORT + WORKERS + 1))); do
  if listening "$port"; then
    echo "run.sh: port $port is in use; pick free ones with --base-port / --metrics-port" >&2
    exit 1
  fi
done

mkdir -p "$RUN_DIR/logs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
# The shared token (a Secret on Kubernetes).
export MEDRL_TOKEN_FILE=${MEDRL_TOKEN_FILE:-$RUN_DIR/token}
if [[ ! -s $MEDRL_TOKEN_FILE ]]; then
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$MEDRL_TOKEN_FILE")
fi
export RUST_LOG=${RUST_LOG:-info}

COMMON=(--config "$CONFIG"
  --set "cluster.coordinator=http://127.0.0.1:$COORDINATOR_PORT"
  --set "cluster.learner=http://127.0.0.1:$LEARNER_PORT"
  --set "run.output_dir=$RUN_DIR"
  "${EXTRA[@]}")

pids=()
# shellcheck disable=SC2329  # called by the trap below
cleanup() {
  local p alive
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # A role stuck in shutdown must not outlive the script.
  for _ in $(seq 1 100); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_port() {  # like the readiness gate of dependsOn: until something listens on the port
  local port=$1 pid=$2 name=$3
  for _ in $(seq 1 600); do
    if listening "$port"; then return 0; fi
    kill -0 "$pid" 2>/dev/null || { echo "run.sh: $name exited; see $RUN_DIR/logs/$name.log" >&2; return 1; }
    sleep 1
  done
  echo "run.sh: $name does not listen on :$port after 10 min" >&2
  return 1
}

"$BIN" coordinator "${COMMON[@]}" \
  --set "coordinator.listen=127.0.0.1:$COORDINATOR_PORT" --set "coordinator.metrics_listen=127.0.0.1:$METRICS_PORT" \
  > "$RUN_DIR/logs/coordinator.log" 2>&1 &
pids+=($!)
wait_port "$COORDINATOR_PORT" "${pids[0]}" coordinator
echo "run.sh: coordinator up (pid ${pids[0]})" >&2

"$BIN" learner "${COMMON[@]}" \
  --set "cluster.learner_listen=127.0.0.1:$LEARNER_PORT" --set "cluster.learner_metrics_listen=127.0.0.1:$((METRICS_PORT + 1))" \
  > "$RUN_DIR/logs/learner.log" 2>&1 &
learner=$!
pids+=("$learner")
for ((i = 0; i < WORKERS; i++)); do
  # HOSTNAME names the worker to the coordinator (a pod's name on Kubernetes).
  JOB_COMPLETION_INDEX=$i HOSTNAME=worker-$i "$BIN" worker "${COMMON[@]}" \
    --set "cluster.worker_health_listen=127.0.0.1:$((BASE_PORT + 2 + i))" \
    --set "cluster.worker_metrics_listen=127.0.0.1:$((METRICS_PORT + 2 + i))" \
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
