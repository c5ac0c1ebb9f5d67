#!/usr/bin/env bash
# On the GPU machine, in one device call (issue #7, fused GEMM epilogues): build tutti with CUDA,
# run the epilogue tests (fusion on and off), the bf16 and backend tests, memcheck on the fused
# products, the per-piece timings (fused against apart, and the step's kernels against their
# floors), then GPT-2 124M in bf16 with and without the fusion (TUTTI_CUDA_LT=0) at batch 16 and
# 32, beside PyTorch's compiled peer at both.
#   bash bench/gpu_epilogue_run.sh OUT_DIR     (needs .gpu-debs/ carried; see scripts/gpu_build.sh)
# Every step logs to logs/<step>.log, packed into OUT_DIR/logs.tar.gz at the end (the device tool
# returns few files); a failing step does not stop the later ones. The table and the step list
# are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_epilogue_run.sh OUT_DIR}
LOGS=$(mktemp -d)/logs
mkdir -p "$LOGS" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$LOGS/gpu.txt" 2>&1
STEP_DIR=$LOGS
source bench/gpu_common.sh
step build bash scripts/gpu_build.sh -DTUTTI_MPI=OFF -DTUTTI_BUILD_EXAMPLES=OFF
source scripts/gpu_env.sh
step cuda_epilogue_test build-gpu/tests/cuda_epilogue_test
step cuda_epilogue_test_off env TUTTI_CUDA_LT=0 build-gpu/tests/cuda_epilogue_test
step cuda_bf16_test build-gpu/tests/cuda_bf16_test
step cuda_backend_test build-gpu/tests/cuda_backend_test
step memcheck_epilogue timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
  build-gpu/tests/cuda_epilogue_test --gtest_filter='CudaEpilogue.*'
step timing_epilogue env TUTTI_CUDA_TIMING=1 build-gpu/tests/cuda_epilogue_test --gtest_filter='*Timing*'
step timing_floors env TUTTI_CUDA_TIMING=1 build-gpu/tests/cuda_step_floor_test
# GPT-2 124M, synthetic tokens, 1024 context: step times from metrics.jsonl (step 1 excluded).
gpt2() {  # gpt2 NAME BATCH STEPS [ENV=...]
  local name=$1 batch=$2 steps=$3; shift 3
  rm -rf "/tmp/$name"
  step "$name" timeout 150 env "$@" build-gpu/tutti train "${GPT2_FLAGS[@]}" --dtype bf16 --batch "$batch" \
    --steps "$steps" --out "/tmp/$name"
  cp "/tmp/$name/metrics.jsonl" "$LOGS/$name.metrics.jsonl" 2>/dev/null
}
# Fused and apart alternate, twice, so that a drift of the card shows as a difference between the
# two runs of one setting.
gpt2 tutti_b16_fused_1 16 20 TUTTI_CUDA_LT=1
gpt2 tutti_b16_apart_1 16 20 TUTTI_CUDA_LT=0
gpt2 tutti_b16_fused_2 16 20 TUTTI_CUDA_LT=1
gpt2 tutti_b16_apart_2 16 20 TUTTI_CUDA_LT=0
step torch_b16 python3 bench/torch_gpt2_peer.py --batch 16 --json "$LOGS/torch_b16.json"
gpt2 tutti_b32_fused 32 12 TUTTI_CUDA_LT=1
gpt2 tutti_b32_apart 32 12 TUTTI_CUDA_LT=0
step torch_b32 python3 bench/torch_gpt2_peer.py --batch 32 --json "$LOGS/torch_b32.json"
python3 - "$LOGS" <<'PY' | tee "$LOGS/table.txt"
import json, os, statistics, sys
out = sys.argv[1]
flops = 6 * (12 * 12 * 768 * 768 + 50304 * 768) + 12 * 12 * 768 * 1024  # per token, as GPTConfig::flops_per_token
print(f"{'run':30} {'batch':>5} {'step ms':>9} {'best ms':>8} {'tok/s':>9} {'MFU':>6}  losses")
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name)
    batch = 32 if 'b32' in name else 16
    best = float('nan')
    losses = ''
    if name.endswith('.metrics.jsonl'):
        rows = [json.loads(l) for l in open(path) if '"ms"' in l]
        ms = [r['ms'] for r in rows][1:]
        if not ms: continue
        step, best = statistics.median(ms), min(ms)
        losses = ' '.join(f"{r['loss']:.4f}" for r in rows[:4] if isinstance(r.get('loss'), (int, float)))
    elif name.endswith('.json'):
        j = json.load(open(path))
        step, best = j.get('step_ms_median'), j.get('step_ms_best')
        if step is None: continue
    else:
        continue
    tok = batch * 1024 / (step / 1e3)
    print(f"{name.split('.')[0]:30} {batch:5} {step:9.1f} {best:8.1f} {tok:9.0f} {tok * flops / 989e12:6.3f}  {losses}")
PY
tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs
cat "$LOGS/steps.txt"
