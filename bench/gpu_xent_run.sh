#!/usr/bin/env bash
# On the GPU machine, in one device call (issue #7, the fused cross-entropy): build the targets it
# needs (scripts/gpu_build.sh's configuration), run the cross-entropy tests with the fused path and
# without it (TUTTI_CUDA_XENT=0), the backend and bf16 tests, memcheck over the fused kernels, the
# kernels' timings against their floors, then GPT-2 124M in bf16 at batch 16, fused and unfused
# alternating.
#   bash bench/gpu_xent_run.sh OUT_DIR     (needs .gpu-debs/ carried)
# Logs go to logs/<step>.log, packed into OUT_DIR/logs.tar.gz; the table and steps print last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_xent_run.sh OUT_DIR}
LOGS=$(mktemp -d)/logs
mkdir -p "$LOGS" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
git log -1 --format='%H %s' > "$LOGS/commit.txt" 2>&1
STEP_DIR=$LOGS
source bench/gpu_common.sh
TUTTI_TARGETS="cuda_xent_test cuda_backend_test cuda_bf16_test tutti_cli" \
  step build bash scripts/gpu_build.sh -DTUTTI_MPI=OFF -DTUTTI_BUILD_EXAMPLES=OFF
source scripts/gpu_env.sh
T=build-gpu/tests
step xent_fused timeout 120 $T/cuda_xent_test
step xent_unfused timeout 120 env TUTTI_CUDA_XENT=0 $T/cuda_xent_test
step memcheck_xent timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
  $T/cuda_xent_test --gtest_filter='CudaXent.KernelsWriteEveryOutput:CudaXent.UnalignedRows'
step cuda_backend_test timeout 120 $T/cuda_backend_test
step cuda_bf16_test timeout 150 $T/cuda_bf16_test
step timing_xent env TUTTI_CUDA_TIMING=1 timeout 120 $T/cuda_xent_test --gtest_filter='CudaXent.Timing'
gpt2() {  # gpt2 NAME TUTTI_CUDA_XENT: GPT-2 124M bf16 B16, 20 steps, synthetic tokens
  local name=$1
  rm -rf "/tmp/$name"
  step "$name" timeout 120 env TUTTI_CUDA_XENT="$2" build-gpu/tutti train "${GPT2_FLAGS[@]}" --dtype bf16 \
    --batch 16 --steps 20 --out "/tmp/$name"
  cp "/tmp/$name/metrics.jsonl" "$LOGS/$name.metrics.jsonl" 2>/dev/null
}
gpt2 b16_fused_1 1
gpt2 b16_unfused_1 0
gpt2 b16_fused_2 1
gpt2 b16_unfused_2 0
python3 - "$LOGS" <<'PY' | tee "$LOGS/table.txt"
import json, os, re, statistics, sys
out = sys.argv[1]
print(f"{'run':16} {'step ms':>8} {'best ms':>8} {'tok/s':>8}  peak / losses 1-4")
for name in sorted(os.listdir(out)):
    if not name.endswith('.metrics.jsonl'): continue
    run = name.split('.')[0]
    rows = [json.loads(l) for l in open(os.path.join(out, name)) if '"ms"' in l]
    ms = [r['ms'] for r in rows][1:]
    if not ms: continue
    med = statistics.median(ms)
    log = open(os.path.join(out, run + '.log')).read()
    peak = re.findall(r'peak tensor memory[^\n]*', log)
    losses = ' '.join(f"{r['loss']:.4f}" for r in rows[:4] if isinstance(r.get('loss'), (int, float)))
    print(f"{run:16} {med:8.2f} {min(ms):8.2f} {16 * 1024 / med * 1e3:8.0f}  {peak[-1] if peak else '?'} | {losses}")
PY
grep -h -A6 "device-to-device" "$LOGS/timing_xent.log"
grep -h "PASSED\|FAILED\|SKIPPED\|ERROR SUMMARY" "$LOGS"/xent_*.log "$LOGS"/memcheck_xent.log "$LOGS"/cuda_*.log
tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs
cat "$LOGS/steps.txt"
