#!/usr/bin/env bash
# Installs, builds and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
cd "${BUILD_DIR:-build}"
# One test at a time: each already uses every core (OpenMP), and two spinning pools on two cores
# slow each other down several times.
ctest --output-on-failure --timeout 900
