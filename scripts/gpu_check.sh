#!/usr/bin/env bash
# GPU check, run on the device machine (an H100/H200 with nvcc, torch, cmake, ninja, pybind11):
# builds nattn._C with the CUDA part, runs the GPU tests (tests/test_cuda.py) - under
# compute-sanitizer for one small case too - and the model benchmark suite, and writes into $OUT:
#   device.txt   nvidia-smi, nvcc, torch versions
#   build.log    the CMake build (per-file compile times at the end)
#   tests.log    pytest of tests/test_cuda.py (+ the memcheck run)
#   bench.log    python -m nattn bench --suite models --backward (Hopper opt-in on)
#   summary.md   one table: stage, result, seconds; test counts; the tail of the benchmark
# Usage (docs/gpu.md): carry the nvidia-cutlass wheel in .whl/, then
#   scripts/gpu_check.sh                 # every stage
#   STAGES="build tests" scripts/gpu_check.sh
# Env: OUT (default /tmp/nattn-gpu-check), PYTHON (python3), NATTN_CUDA_ARCH ("80;90a"),
#      NATTN_BUILD_JOBS (CPU count), STAGES ("build tests sanitizer bench").
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-/tmp/nattn-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
stages=${STAGES:-build tests sanitizer bench}
summary=$out/summary.md
rows=()

# The carried wheels (the nvidia-cutlass wheel provides the CuTe headers; no internet there).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

{
  nvidia-smi || true
  nvcc --version || true
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
             torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")'
} >"$out/device.txt" 2>&1

stage() {  # stage NAME LOG COMMAND...: runs COMMAND, appends its output to LOG, records a row
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  echo "=== $name: $*" >>"$log"
  "$@" >>"$log" 2>&1
  local rc=$?
  rows+=("| $name | $([ $rc -eq 0 ] && echo pass || echo "FAIL (rc $rc)") | $((SECONDS - start)) |")
  return $rc
}

build() {
  local cutlass
  cutlass=$("$py" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))') || return 1
  cmake -S . -B build/gpu-check -GNinja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$py")" \
    -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$root/python/nattn" \
    -DNATTN_CUDA=ON -DNATTN_CUDA_ARCH="${NATTN_CUDA_ARCH:-80;90a}" \
    -DNATTN_CUTLASS_INCLUDE="$cutlass" || return 1
  cmake --build build/gpu-check -j "${NATTN_BUILD_JOBS:-$(nproc)}" || return 1
  # Per-file compile times (ninja log: start, end in ms).
  awk 'NR > 1 {printf "%7.1fs %s\n", ($2 - $1) / 1000, $4}' build/gpu-check/.ninja_log | sort -rn
}

tests() {
  "$py" -m pytest -v -rs tests/test_cuda.py
}

sanitizer() {
  # One small forward + backward (20 x 20 tokens, fp16, additional tokens) under memcheck: an
  # out-of-bounds or misaligned access fails the stage.
  timeout 600 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$py" -m pytest -q -x tests/test_cuda.py -k "bit_identical" || return 1
  # The Hopper forward + backward (opt-in backend) on one small ragged-dilation problem: TMA
  # bounds (memcheck), the mbarrier pipelines (racecheck, synccheck).
  local hopper="tests/test_cuda.py::test_hopper_backward_sweep_gpu[0]"
  for tool in memcheck racecheck synccheck; do
    timeout 900 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$py" -m pytest -q -x "$hopper" || return 1
  done
}

bench() {
  # The opt-in shows the Hopper backend (nattn:hopper) beside the SM80 one (nattn:cuda), SDPA
  # and FlexAttention, forward and forward + backward.
  NATTN_EXPERIMENTAL_HOPPER=1 "$py" -m nattn bench --suite models --backward
}

for s in $stages; do
  case $s in
    build) stage build "$out/build.log" build || break ;;  # nothing else can run without it
    tests) stage tests "$out/tests.log" tests ;;
    sanitizer) stage sanitizer "$out/tests.log" sanitizer ;;
    bench) stage bench "$out/bench.log" bench ;;
    *) echo "unknown stage $s" >&2 ;;
  esac
done

{
  echo "# nattn GPU check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "| stage | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  if [ -f "$out/tests.log" ]; then
    echo "## tests"
    echo '```'
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$out/tests.log" | tail -30
    echo '```'
  fi
  if [ -f "$out/bench.log" ]; then
    echo "## bench (tail)"
    echo '```'
    tail -40 "$out/bench.log"
    echo '```'
  fi
} >"$summary"
cat "$summary"
# Exit status: failure if any stage failed.
! printf '%s\n' "${rows[@]}" | grep -q FAIL
