#!/usr/bin/env bash
# One-step set-up for fasttrain on a fresh machine.
#   bash scripts/setup.sh         -> the library and its CLI
#   bash scripts/setup.sh test    -> plus the test extras and the C++ ops library (build/)
# torch: a machine that already has torch (a user's CUDA build) keeps it. A machine with
# none gets torch==2.13.0, which resolves to a CPU build on CPU-only machines; a bare
# `torch` requirement there would pull a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
if [ "${1:-}" = "test" ]; then
    "$PY" -m pip install --quiet -e ".[test]"
    if [ -f scripts/build_ops.sh ]; then bash scripts/build_ops.sh; fi
else
    # the default job (`fasttrain train`) logs to TensorBoard and `fasttrain report` plots:
    # the one-command set-up brings the extras those two use
    "$PY" -m pip install --quiet -e ".[tensorboard,report]"
fi
