#!/usr/bin/env bash
# On a 2-GPU machine, in one device call: build tutti with CUDA, NCCL and MPI, run the NCCL tests
# and the two-GPU training test (dp 2, pp 2, tp 2 against one GPU), then GPT-2 124M training speed on one
# GPU and on two (dp 2 at twice the global batch: scaling efficiency; pp 2 and tp 2 at the same batch).
#   bash bench/gpu2_run.sh OUT_DIR        (carry .gpu-debs; see scripts/gpu_build.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu2_run.sh OUT_DIR}
source bench/gpu_lib.sh
step nccl_test build-gpu/tests/nccl_test
step cuda_backend_test build-gpu/tests/cuda_backend_test
step two_gpu_test build-gpu/tests/model_parallel_test --gtest_filter='*Gpu*'
gpt2 gpt2_1gpu_b16 1 16
gpt2 gpt2_dp2_b32 2 32 --dp 2
gpt2 gpt2_pp2_b16 2 16 --pp 2 --micro-batches 8
gpt2 gpt2_tp2_b16 2 16 --tp 2
gpt2 gpt2_pp2_b16_m4 2 16 --pp 2 --micro-batches 4
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
def median_ms(name):
    p = out / f"{name}.metrics.jsonl"
    if not p.exists(): return None
    ms = [json.loads(l)["ms"] for l in open(p) if '"loss"' in l and '"ms"' in l][1:]
    return statistics.median(ms) if ms else None
rows = {"gpt2_1gpu_b16": 16, "gpt2_dp2_b32": 32, "gpt2_pp2_b16": 16, "gpt2_tp2_b16": 16, "gpt2_pp2_b16_m4": 16}
rate = {}
for name, batch in rows.items():
    m = median_ms(name)
    if m is None: print(f"{name}: no result"); continue
    rate[name] = batch * 1024 / (m / 1e3)
    print(f"{name}: median step {m:.1f} ms, {rate[name]:,.0f} tok/s")
if "gpt2_1gpu_b16" in rate and "gpt2_dp2_b32" in rate:
    print(f"dp 2 scaling efficiency: {rate['gpt2_dp2_b32'] / (2 * rate['gpt2_1gpu_b16']):.3f}")
PY
