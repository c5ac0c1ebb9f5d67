#!/usr/bin/env bash
# Quick start: install, build, and train the default byte-level GPT on tiny Shakespeare.
# Extra arguments go to `tutti train` (e.g. --steps 200). A new run directory is used each time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
out="runs/shakespeare-$(date +%Y%m%d-%H%M%S)"
exec ./build/tutti train --out "$out" "$@"
