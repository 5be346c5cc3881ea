#!/usr/bin/env bash
# CI step: compile and link `--features cuda` on a GPU-less machine (issue 8, part 1).
# Called from .ci/run; never skipped: a failure here fails CI. Prints its own duration.
# Cold (empty .cuda-toolkit/ and target/cuda/) it downloads ~650 MB of NVIDIA wheels from PyPI
# and builds candle's CUDA kernels; see docs/gpu.md for measured times.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
echo "==> cuda build (scripts/build-cuda.sh)"
start=$SECONDS
if "$ROOT/scripts/build-cuda.sh" "$@"; then
  echo "==> cuda build: ok in $((SECONDS - start)) s"
else
  rc=$?
  echo "==> cuda build: FAILED (exit $rc) after $((SECONDS - start)) s" >&2
  exit $rc
fi
