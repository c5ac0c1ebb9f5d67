#!/usr/bin/env bash
# On the GPU machine: unpacks the carried .gpu-debs/ into /tmp/tutti-deps and builds tutti with
# CUDA into build-gpu/. Then run with: source scripts/gpu_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=/tmp/tutti-deps
mkdir -p "$DEPS"
for f in .gpu-debs/*.deb; do dpkg -x "$f" "$DEPS"; done
source scripts/gpu_env.sh
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTUTTI_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DTUTTI_BUILD_BENCH=OFF -DCMAKE_PREFIX_PATH="$DEPS/usr;$DEPS/usr/lib/x86_64-linux-gnu/cmake" \
  -DCMAKE_INCLUDE_PATH="$DEPS/usr/include" -DCMAKE_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu" "$@"
# TUTTI_TARGETS="tutti cuda_bf16_test": only those targets (a quicker build for one measurement).
cmake --build build-gpu -j "$(nproc)" ${TUTTI_TARGETS:+--target $TUTTI_TARGETS}
