#!/usr/bin/env bash
# CPU benchmark of every named problem (python -m nattn bench --suite all, default CPU scale,
# forward and forward+backward, window sweeps for the plots). Writes into OUT_DIR (default
# bench/results/cpu-<date>): results.json, results.md, plots/*.png and log.txt.
#   PYTHON=/path/to/python bench/run_cpu_bench.sh [OUT_DIR] [extra bench flags...]
# Needs a dev build (scripts/dev_build.sh). The package is run from a private copy, so a rebuild
# of python/nattn/_C*.so during the run (minutes) cannot change the code under it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${1:-bench/results/cpu-$(date +%F)}
shift || true
mkdir -p "$out"
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
cp -r python/nattn "$copy/nattn"
NATTN_SOURCE_ROOT="$PWD" PYTHONPATH="$copy${PYTHONPATH:+:$PYTHONPATH}" "$py" -m nattn bench \
  --suite all --backward --json "$out/results.json" --markdown "$out/results.md" \
  --plots "$out/plots" "$@" 2>&1 | tee "$out/log.txt"
