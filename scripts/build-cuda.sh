#!/usr/bin/env bash
# Build the `medrl` binary with the `cuda` feature on a machine with no GPU and no system CUDA,
# using CUDA 13.0 from PyPI, as described in shared/reference/cuda-build.md.
#
#   scripts/build-cuda.sh [--compute-cap 90] [--work DIR] [--out DIR] [--xz] [--prepare-only]
#
# Steps (all idempotent; a second run reuses the toolkit venv in the work folder):
#   1. a Python venv with the pinned CUDA toolkit wheels and NCCL (~830 MB download, ~2.5 GB);
#   2. a folder that looks like a CUDA install (bin/include/nvvm/lib64 symlinks into the wheels)
#      and a link-time stub libcuda.so (one dummy per cu* function of cudarc's driver bindings;
#      the real libcuda.so.1 comes from the GPU host's driver at run time);
#   3. cargo build --release --locked -p medrl --features cuda (about 7 min on 2 cores);
#   4. OUT/bin/medrl (stripped), OUT/lib/ with every shared library the binary needs that is not
#      part of the OS or the driver (cudart, cublas, cublasLt, curand, nccl, ... copied from the
#      wheels, the exact versions it was linked against), and OUT/lib/cpu-only/libcuda.so.1 (the
#      stub, so that roles that never touch a GPU, e.g. the coordinator, start on CPU-only nodes
#      with LD_LIBRARY_PATH=OUT/lib:OUT/lib/cpu-only). Run it with LD_LIBRARY_PATH=OUT/lib.
#
# Needs: bash, python3 with venv, gcc, binutils (readelf, strip), cargo; xz for --xz.
# No GPU is needed to build. The result runs on GPUs of the chosen compute capability
# (90 = H100/H200, sm_90a PTX) with an NVIDIA driver of the CUDA 13.0 branch or newer (>= 580).
set -euo pipefail

# Pins: keep in step with shared/reference/cuda-build.md (nvcc must stay 13.0.x for driver 580).
CUDA_TOOLKIT_VERSION=13.0.2
NCCL_WHEEL_VERSION=2.28.9
CUDA_TOOLKIT_EXTRAS=nvcc,nvvm,crt,cudart,cccl,cublas,curand,nvrtc
CUDARC_CUDA_VERSION_PIN=13000

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<EOF
Options:
  --compute-cap N   GPU compute capability to build kernels for (default: \$CUDA_COMPUTE_CAP or 90)
  --work DIR        scratch folder for the toolkit venv and the fake CUDA root
                    (default: \$MEDRL_CUDA_WORK or target/cuda-work)
  --out DIR         where to put bin/medrl and lib/ (default: target/cuda-dist)
  --xz              also write OUT/medrl.xz (xz -6) for carrying the binary around
  --prepare-only    do steps 1-2 only and check nvcc; no cargo build
  -h, --help        this text
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
WORK=${MEDRL_CUDA_WORK:-$ROOT/target/cuda-work}
OUT=$ROOT/target/cuda-dist
XZ=0
PREPARE_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --compute-cap) COMPUTE_CAP=${2:?--compute-cap needs a value}; shift 2 ;;
    --work) WORK=${2:?--work needs a folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --xz) XZ=1; shift ;;
    --prepare-only) PREPARE_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $COMPUTE_CAP =~ ^[0-9]+$ ]] || { echo "build-cuda.sh: --compute-cap must be a number like 90, got '$COMPUTE_CAP'" >&2; exit 2; }

need() { command -v "$1" >/dev/null 2>&1 || { echo "build-cuda.sh: '$1' is required ($2)" >&2; exit 1; }; }
need python3 "python3 with the venv module"
need gcc "to compile the libcuda link stub"
need cargo "the Rust toolchain"
need readelf "binutils"
need strip "binutils"
[[ $XZ == 0 ]] || need xz "xz-utils, for --xz"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
log() { echo "build-cuda.sh: $*" >&2; }

# 1. The toolkit from PyPI, in a venv of its own (reused when the pins match).
VENV=$WORK/venv
STAMP=$VENV/.medrl-cuda-pins
PINS="cuda-toolkit[$CUDA_TOOLKIT_EXTRAS]==$CUDA_TOOLKIT_VERSION nvidia-nccl-cu13==$NCCL_WHEEL_VERSION"
if [[ ! -f $STAMP || $(cat "$STAMP") != "$PINS" ]]; then
  log "installing $PINS into $VENV (about 830 MB download)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --disable-pip-version-check --no-input $PINS
  echo "$PINS" > "$STAMP"
fi
SP=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
[[ -x $SP/nvidia/cu13/bin/nvcc ]] || { log "nvcc not found under $SP/nvidia/cu13/bin"; exit 1; }

# 2. A CUDA root that looks like a toolkit install.
FAKE=$WORK/cuda
mkdir -p "$FAKE/lib64"
ln -sfn "$SP/nvidia/cu13/bin" "$FAKE/bin"
ln -sfn "$SP/nvidia/cu13/include" "$FAKE/include"
ln -sfn "$SP/nvidia/cu13/nvvm" "$FAKE/nvvm"
for l in cublas cublasLt cudart nvrtc; do ln -sf "$SP/nvidia/cu13/lib/lib$l.so.13" "$FAKE/lib64/lib$l.so"; done
ln -sf "$SP/nvidia/cu13/lib/libcurand.so.10" "$FAKE/lib64/libcurand.so"
ln -sf "$SP/nvidia/nccl/lib/libnccl.so.2" "$FAKE/lib64/libnccl.so"
for f in "$FAKE"/lib64/*.so; do [[ -e $f ]] || { log "broken link $f -> $(readlink "$f")"; exit 1; }; done

# The link-time stub for libcuda: one dummy per cu* function in the cudarc version Cargo.lock pins.
cd "$ROOT"
CUDARC_VERSION=$(awk '/^name = "cudarc"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
[[ -n $CUDARC_VERSION ]] || { log "cudarc is not in Cargo.lock: does the cuda feature pull it in?"; exit 1; }
cargo fetch --locked
CUDARC_SRC=""
for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$CUDARC_VERSION"; do
  [[ -d $d ]] && { CUDARC_SRC=$d; break; }
done
[[ -n $CUDARC_SRC ]] || { log "cudarc-$CUDARC_VERSION sources not found after cargo fetch"; exit 1; }
grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC_SRC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
  | awk '{print "int " $1 "(void){return 999;}"}' > "$WORK/cuda_stub.c"
[[ -s $WORK/cuda_stub.c ]] || { log "no cu* functions found in $CUDARC_SRC/src/driver/sys/mod.rs"; exit 1; }
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$FAKE/lib64/libcuda.so" "$WORK/cuda_stub.c"

export PATH=$FAKE/bin:$PATH CUDA_HOME=$FAKE CUDA_PATH=$FAKE CUDA_COMPUTE_CAP=$COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION_PIN
log "nvcc: $(nvcc --version | tail -1); compute capability $COMPUTE_CAP; cudarc $CUDARC_VERSION"
if [[ $PREPARE_ONLY == 1 ]]; then
  log "prepared $FAKE (--prepare-only: no cargo build)"
  exit 0
fi

# 3. Build.
cargo build --release --locked -p medrl --features cuda
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN=$TARGET_DIR/release/medrl

# 4. The binary and the libraries it needs from the wheels (transitively).
rm -rf "${OUT:?}/bin" "${OUT:?}/lib"
mkdir -p "$OUT/bin" "$OUT/lib/cpu-only"
strip -o "$OUT/bin/medrl" "$BIN"
LIBDIRS=("$SP"/nvidia/*/lib)
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
queue=("$OUT/bin/medrl")
while [[ ${#queue[@]} -gt 0 ]]; do
  file=${queue[0]}; queue=("${queue[@]:1}")
  for so in $(needed "$file"); do
    [[ $so == libcuda.so.1 || -e $OUT/lib/$so ]] && continue   # the driver's, or copied already
    for d in "${LIBDIRS[@]}"; do
      if [[ -e $d/$so ]]; then
        cp -L "$d/$so" "$OUT/lib/$so"
        queue+=("$OUT/lib/$so")
        break
      fi
    done
  done
done
# NVRTC loads its builtins with dlopen (not a NEEDED entry): ship them with it.
if [[ -e $OUT/lib/libnvrtc.so.13 ]]; then
  cp -L "$SP"/nvidia/cu13/lib/libnvrtc-builtins.so.* "$OUT/lib/"
fi
cp "$FAKE/lib64/libcuda.so" "$OUT/lib/cpu-only/libcuda.so.1"

# Every NEEDED library must now be in OUT/lib, the driver's libcuda.so.1, or the OS's.
missing=$(LD_LIBRARY_PATH=$OUT/lib:$OUT/lib/cpu-only ldd "$OUT/bin/medrl" | grep 'not found' || true)
[[ -z $missing ]] || { log "unresolved libraries:"; echo "$missing" >&2; exit 1; }
[[ $XZ == 0 ]] || xz -6 -T2 -c "$OUT/bin/medrl" > "$OUT/medrl.xz"
log "built $OUT/bin/medrl for compute capability $COMPUTE_CAP; libraries:"
ls -1 "$OUT/lib" >&2
log "run: LD_LIBRARY_PATH=$OUT/lib $OUT/bin/medrl ... (on a GPU host with driver >= 580)"
