#!/usr/bin/env bash
# make gpu-check OUT=dir: on a machine with a GPU, build the extension for
# sm_90, run the whole test suite there, and run the GPU benchmarks; results
# (logs, CSV, PNG) go to the folder given. Uses the python/torch found on the
# machine (no venv); budget: well under 8 minutes on one H200.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
status=0
step() {  # step NAME CMD...: runs CMD, logs to $out/NAME.log, records failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" > "$out/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"
  else echo "   FAILED ($((SECONDS - t0)) s), tail of $out/$name.log:"; tail -20 "$out/$name.log"; status=1; fi
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])'
  $PY -c 'import triton; print("triton", triton.__version__)'; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
[ -n "$(command -v nvidia-smi)" ] && $PY -c 'import torch; assert torch.cuda.is_available()' || {
  echo "no GPU visible: stopping before the GPU steps"; exit 2; }

step build env PEGE_REQUIRE_EXTENSION=1 $PY setup.py build_ext --inplace
step tests env PYTHONPATH=$PWD timeout 300 $PY -m pytest -q tests
for dtype in float32 bfloat16; do
  for mode in per-tensor per-channel; do
    step "bench-$dtype-$mode" env PYTHONPATH=$PWD timeout 150 $PY benchmarks/bench_ops.py \
      --device cuda --sizes 16M,64M,256M --dtypes $dtype --modes $mode \
      --rounds 3 --round-time 0.1 --skip "reference eager" --out "$out/bench-$dtype-$mode"
  done
done
exit $status
