#!/usr/bin/env bash
# The PyTorch peer of tutti's GPT-2 124M GPU benchmark at batch 16 and 32 (context 1024): one
# markdown table and one JSON file per batch, for one device call on a lent H100/H200.
#   bash bench/gpu_peer.sh [OUTDIR] [extra torch_gpt2_peer.py options...]
# PYTHON (default python3, the device machine's torch) runs it; warnings go to stderr and peer.log.
# OUTDIR (default: $OUT, else /tmp/gpu_peer) receives b16.json, b32.json, peer.log and gpu.txt.
set -euo pipefail
out="${1:-${OUT:-/tmp/gpu_peer}}"
shift || true
mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1 || true
echo "| impl | card | B | T | dtype | compile | attention | step ms median | step ms best | tok/s | MFU | peak mem GiB | torch |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
rc=0  # one batch failing still lets the other run
for b in 16 32; do
  "${PYTHON:-python3}" "$here/torch_gpt2_peer.py" --batch "$b" --json "$out/b$b.json" "$@" \
    2> >(tee -a "$out/peer.log" >&2) | grep '^|' || rc=1
done
cat "$out/gpu.txt"
exit "$rc"
