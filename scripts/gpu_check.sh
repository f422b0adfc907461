#!/usr/bin/env bash
# The GPU check in one command (docs/gpu_check.md): builds the C++/CUDA ops with CMake + nvcc,
# reruns the kernel test cases on the GPU, checks for host syncs, smoke-tests NCCL and measures
# speed against bounds, each part time-boxed; under eight minutes on one H100/H200.
#   bash scripts/gpu_check.sh OUTDIR [--parts environment,correctness,...] [--total-limit S]
# Installs nothing: runs from this source tree (PYTHONPATH); PYTHON picks the interpreter.
# Writes OUTDIR/gpu_check.json, OUTDIR/summary.txt and OUTDIR/logs/ (a few hundred KiB).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR [--parts a,b,...] [--total-limit SECONDS]" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m fasttrain.cli.gpu_check "$OUT" "$@"
