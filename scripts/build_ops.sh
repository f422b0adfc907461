#!/usr/bin/env bash
# Builds the C++/CUDA ops library into build/libfasttrain_ops.so (see docs/csrc.md).
#   bash scripts/build_ops.sh [extra cmake -D options]
# PYTHON picks the interpreter whose torch is built against (default python3);
# FASTTRAIN_BUILD_DIR the build folder (default build/); JOBS the parallel jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v "${PYTHON:-python3}")
BUILD_DIR=${FASTTRAIN_BUILD_DIR:-build}
GENERATOR=()
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1; then
    GENERATOR=(-G Ninja)
fi
cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$PY" "$@"
cmake --build "$BUILD_DIR" --parallel "${JOBS:-$(nproc)}"
echo "built $BUILD_DIR/libfasttrain_ops.so"
