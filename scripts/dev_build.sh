#!/usr/bin/env bash
# Incremental developer build of nattn._C into python/nattn/ (use with PYTHONPATH=python).
#   NATTN_CUDA=OFF|ON|AUTO (default OFF here: quick CPU-only rebuilds)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
cmake -S . -B build/dev -GNinja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/python/nattn" \
  -DNATTN_CUDA="${NATTN_CUDA:-OFF}" \
  -DNATTN_CUTLASS_INCLUDE="$("$py" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)" \
  >/dev/null
cmake --build build/dev -j "${NATTN_BUILD_JOBS:-2}"
