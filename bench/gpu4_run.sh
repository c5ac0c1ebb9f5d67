#!/usr/bin/env bash
# On a 4-GPU machine, in one device call (the runs of issue #8 that fit four GPUs): build tutti
# with CUDA, NCCL and MPI; the bf16 tests; NCCL bus bandwidth through tutti's communicator; GPT-2 124M on one GPU
# and on four as dp 4 (TF32 and bf16), tp 2 x dp 2, pp 2 x dp 2 and tp 2 x pp 2 (1F1B), each traced, with the
# share of exposed communication from `tutti inspect trace`; the first steps' losses of tp 2 x pp 2
# against one GPU at the same global batch.
#   bash bench/gpu4_run.sh OUT_DIR        (carry .gpu-debs; see scripts/gpu_build.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu4_run.sh OUT_DIR}
GPT2_TRACE=1
source bench/gpu_lib.sh
step cuda_bf16_test build-gpu/tests/cuda_bf16_test
step nccl_busbw env TUTTI_NCCL_TIMING=1 build-gpu/tests/nccl_test --gtest_filter='NcclTiming.*'
gpt2 gpt2_1gpu_b16 1 16
gpt2 gpt2_dp4_b64 4 64 --dp 4
gpt2 gpt2_1gpu_b16_bf16 1 16 --dtype bf16
gpt2 gpt2_dp4_b64_bf16 4 64 --dp 4 --dtype bf16
gpt2 gpt2_tp2dp2_b32 4 32 --tp 2 --dp 2
gpt2 gpt2_pp2dp2_b32 4 32 --pp 2 --dp 2 --micro-batches 8
gpt2 gpt2_tp2pp2_b16 4 16 --tp 2 --pp 2 --micro-batches 8
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
def steps(name):
    p = out / f"{name}.metrics.jsonl"
    return [json.loads(l) for l in open(p) if '"loss"' in l] if p.exists() else []
rows = {"gpt2_1gpu_b16": 16, "gpt2_dp4_b64": 64, "gpt2_1gpu_b16_bf16": 16, "gpt2_dp4_b64_bf16": 64,
        "gpt2_tp2dp2_b32": 32, "gpt2_pp2dp2_b32": 32, "gpt2_tp2pp2_b16": 16}
rate = {}
for name, batch in rows.items():
    s = steps(name)
    ms = [x["ms"] for x in s][1:]
    if not ms: print(f"{name}: no result"); continue
    rate[name] = batch * 1024 / (statistics.median(ms) / 1e3)
    print(f"{name}: median step {statistics.median(ms):.1f} ms, {rate[name]:,.0f} tok/s")
for one, four in (("gpt2_1gpu_b16", "gpt2_dp4_b64"), ("gpt2_1gpu_b16_bf16", "gpt2_dp4_b64_bf16")):
    if one in rate and four in rate:
        print(f"dp 4 scaling efficiency ({four}): {rate[four] / (4 * rate[one]):.3f}")
a, b = steps("gpt2_1gpu_b16"), steps("gpt2_tp2pp2_b16")
for x, y in zip(a[:3], b[:3]):
    print(f"step {x['step']}: loss one GPU {x['loss']:.6f}, tp 2 x pp 2 {y['loss']:.6f}, rel diff {abs(x['loss'] - y['loss']) / x['loss']:.2e}")
PY
