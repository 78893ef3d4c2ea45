#!/usr/bin/env bash
# make gpu-check OUT=dir: build the extension for sm_90, run the GPU-relevant
# test modules on the GPU, then the GPU benchmarks, all inside one wall-clock
# budget (PEGE_GPU_CHECK_BUDGET seconds, default 420, build included): each
# step's timeout is at most what is left, and late steps are skipped or cut.
#
# Uses the machine's own python3 and torch (or $PYTHON): no pip, no venv, no
# network. Works on a copy of the tree in build/gpu-check/src, so the
# checkout's own build outputs are never touched, and a rerun recompiles only
# the sources that changed (ninja). Last come the checks that need no GPU
# (the CUDA SASS check and the Triton compile check with this machine's
# Triton), cut first by the budget. Without a GPU the GPU steps are skipped.
#
# Writes exactly two files to OUT: summary.txt (environment, each step's
# status and duration, the benchmark tables) and gpu-check.tar.gz (logs, CSV,
# PNG). Ends with one line per check, "NAME: pass|fail|skipped (...)", and
# exits non-zero if any check failed.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
budget=${PEGE_GPU_CHECK_BUDGET:-420}
reserve=15  # seconds kept for the summary and the tarball
mkdir -p "$out" && out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/pege-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
logs=$work/gpu-check && mkdir -p "$logs"
src=$repo/build/gpu-check/src
checks=()
failed=0
failed_steps=()
notes=()

# The toolkit: /usr/local/cuda, else the one of an nvcc on PATH (resolved
# through links; a wrapper script outside a toolkit is not a CUDA home).
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc > /dev/null; then
    home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    [ -f "$home/include/cuda.h" ] && CUDA_HOME=$home
  fi
fi
[ -n "${CUDA_HOME:-}" ] && export CUDA_HOME || unset CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

# The first python that imports torch: $PYTHON, python3, then the checkout's
# .venv when one exists (a development machine).
PY=
for p in ${PYTHON:-} python3 "$repo/.venv/bin/python"; do
  if command -v "$p" > /dev/null && "$p" -c 'import torch' > /dev/null 2>&1; then PY=$p; break; fi
done

left() { echo $((budget - SECONDS - reserve)); }

record() {  # record NAME STATUS DETAIL
  checks+=("$1: $2 ($3)")
  echo "   $1: $2 ($3)"
  [ "$2" = fail ] && failed=1
  return 0
}

# step NAME CAP CUT_OK CMD...: runs CMD (in $src) under a timeout of at most
# CAP seconds and what is left of the budget; output to $logs/NAME.log. A step
# with CUT_OK=1 that the budget (not its own cap) cuts short is "skipped".
step() {
  local name=$1 cap=$2 cut_ok=$3; shift 3
  local avail t t0 rc
  avail=$(( $(left) - 5 ))
  if (( avail < 10 )); then
    record "$name" "$( ((cut_ok)) && echo skipped || echo fail)" "budget of $budget s spent"
    return 1
  fi
  t=$(( cap < avail ? cap : avail ))
  echo "== $name (timeout $t s)"
  t0=$SECONDS
  (cd "$src" && timeout -k 5 "$t" "$@") > "$logs/$name.log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0))
  if (( rc == 0 )); then
    record "$name" pass "$dt s"
  elif (( rc == 124 || rc == 137 )) && (( cut_ok && t < cap )); then
    record "$name" skipped "cut by the $budget s budget after $dt s"
  elif (( rc == 124 || rc == 137 )); then
    record "$name" fail "timed out after $t s"; tail -15 "$logs/$name.log"
    failed_steps+=("$name")
  else
    record "$name" fail "$dt s, exit $rc"; tail -15 "$logs/$name.log"
    failed_steps+=("$name")
  fi
  return $rc
}

# ---------------------------------------------------------------- env
t0=$SECONDS
gpu=0
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cpus: $(nproc)"
  echo "budget: $budget s  CUDA_HOME: ${CUDA_HOME:-not found}" \
    "TORCH_CUDA_ARCH_LIST: $TORCH_CUDA_ARCH_LIST"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else echo "nvidia-smi: not found"; fi
  [ -n "${CUDA_HOME:-}" ] && "$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1
  if [ -n "$PY" ]; then
    echo "python: $PY"
    "$PY" - "$work/gpu" <<'EOF'
import sys
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
gpu = torch.cuda.is_available()
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", tv, "gpu", torch.cuda.get_device_name(0) if gpu else "none")
open(sys.argv[1], "w").write(str(int(gpu)))
EOF
  else echo "python: none of ${PYTHON:-} python3 $repo/.venv/bin/python imports torch"; fi
} > "$logs/env.log" 2>&1
cat "$logs/env.log"
# The tree without build outputs, as the source of every step; the copy's
# build/ (ninja's objects) is kept, everything else replaced (tar keeps the
# files' times, so unchanged sources are not recompiled).
mkdir -p "$src" && find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
tar -C "$repo" -c --exclude=./.git --exclude=./build --exclude=./.venv --exclude=./results \
  --exclude='*.so' --exclude=__pycache__ --exclude=./.pytest_cache --exclude=./.benchmarks . \
  | tar -x -C "$src"
if [ -z "$PY" ]; then
  record env fail "$((SECONDS - t0)) s, no python with torch"
elif [ -z "${CUDA_HOME:-}" ]; then
  record env fail "$((SECONDS - t0)) s, no CUDA toolkit (set CUDA_HOME)"
else
  record env pass "$((SECONDS - t0)) s"
  [ "$(cat "$work/gpu" 2> /dev/null)" = 1 ] && gpu=1
fi

# -------------------------------------------------------------- build
built=0
if (( ! failed )); then
  # Passes only if the extension carries the CUDA kernels.
  step build "$budget" 0 bash -c 'PEGE_REQUIRE_EXTENSION=1 "$0" setup.py build_ext --inplace &&
    "$0" -c "from pege_kernels import ops; assert ops.has_cuda_kernels(), \"no CUDA kernels\""' \
    "$PY" && built=1
else
  record build skipped "no python with torch or no CUDA toolkit"
fi

# --------------------------------------------------- GPU tests (priority)
# Modules with CUDA cases (test_group_op's come from conftest's backend_devices).
modules="$(cd "$src" && grep -l cuda tests/test_*.py | tr '\n' ' ') tests/test_group_op.py"
if (( ! gpu )); then
  notes+=("no GPU: torch.cuda.is_available() is False here; the GPU tests and benchmarks are skipped")
  echo "${notes[-1]}"
  record tests skipped "no GPU"
elif (( ! built )); then
  record tests skipped "no build"
else
  step tests 240 0 env PYTHONPATH="$src" PEGE_EXPECT_CUDA_KERNELS=1 "$PY" -m pytest -q -ra \
    -p no:cacheprovider --durations=10 --junitxml="$logs/tests.xml" $modules
fi

# ------------------------------------------ GPU benchmarks (last, cut first)
for case in "float32 per-tensor" "bfloat16 per-tensor" "float32 per-channel" \
    "bfloat16 per-channel"; do
  set -- $case
  name="bench-$1-$2"
  if (( ! gpu )); then record "$name" skipped "no GPU"; continue; fi
  if (( ! built )); then record "$name" skipped "no build"; continue; fi
  step "$name" 100 1 env PYTHONPATH="$src" "$PY" benchmarks/bench_ops.py --device cuda \
    --sizes 16M,64M --dtypes "$1" --modes "$2" --rounds 3 --round-time 0.1 \
    --skip "reference eager,reference compiled" --out "$logs/$name"
done

# Per group and per token (torchao's rows only where torchao is installed).
for case in "per-group 16M" "per-token 32M"; do
  set -- $case
  name="bench-$1"
  if (( ! gpu )); then record "$name" skipped "no GPU"; continue; fi
  if (( ! built )); then record "$name" skipped "no build"; continue; fi
  step "$name" 60 1 env PYTHONPATH="$src" "$PY" benchmarks/bench_ops.py --device cuda \
    --sizes "$2" --dtypes float32,bfloat16 --modes "$1" --rounds 3 --round-time 0.1 \
    --out "$logs/$name"
done

# One transformer block's QAT train step, torchao's fake quantizers against
# PEGEQATConfig's: eager first (a table even if the budget cuts the second),
# then eager and torch.compile'd.
train_step=(env PYTHONPATH="$src" "$PY" benchmarks/bench_train_step.py --device cuda
  --dtype bfloat16 --dim 2048 --heads 16 --batch 8 --seq 2048 --rounds 20
  --warmup 3)
if (( gpu && built )) && "$PY" -c 'import torchao' > /dev/null 2>&1; then
  step bench-train-step 60 1 "${train_step[@]}" --csv "$logs/bench-train-step.csv"
  step bench-train-step-compiled 150 1 "${train_step[@]}" --compile \
    --csv "$logs/bench-train-step-compiled.csv"
else
  for name in bench-train-step bench-train-step-compiled; do
    record "$name" skipped "no GPU, no build or no torchao"
  done
fi

# ------------------- compile checks without a GPU (lowest priority, cut first)
# The CUDA kernels' SASS of this build, then every Triton specialization with
# the machine's own Triton (no venv, no pip: make gpu-compile-check adds the
# Triton 3.6 side venv on development machines).
if (( built )); then
  step cuda-sass 60 1 "$PY" tests/gpu_compile/cuda_sass_check.py --any-arch
  step triton-compile 300 1 "$PY" tests/gpu_compile/triton_compile_check.py \
    --cache-dir "$repo/build/gpu-check/triton-cache"
else
  record cuda-sass skipped "no build"
  record triton-compile skipped "no build"
fi

# ------------------------------------------------------------ summary
{
  echo "# make gpu-check: $(date -u +%FT%TZ), $SECONDS s of a $budget s budget"
  echo
  cat "$logs/env.log"
  (( ${#notes[@]} )) && printf '%s\n' "" "${notes[@]}"
  for name in "${failed_steps[@]}"; do
    echo; echo "## $name failed, end of its log"; tail -10 "$logs/$name.log" | cut -c1-300
  done
  if [ -f "$logs/tests.log" ]; then
    echo; echo "## tests"; grep -E '^(FAILED|ERROR)' "$logs/tests.log" | head -30
    tail -1 "$logs/tests.log"
  fi
  for f in "$logs"/bench-*.log; do
    [ -f "$f" ] || continue
    echo; echo "## $(basename "$f" .log)"
    grep -E '^(device|command|outputs equal|\||n/a)' "$f"
  done
  echo; echo "## checks"
  printf '%s\n' "${checks[@]}"
} > "$out/summary.txt"
tar -C "$work" -czf "$out/gpu-check.tar.gz" gpu-check
echo
echo "summary: $out/summary.txt; logs, CSV, PNG: $out/gpu-check.tar.gz (${SECONDS} s)"
printf '%s\n' "${checks[@]}"
exit $failed
