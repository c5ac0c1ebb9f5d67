#!/usr/bin/env bash
# On the GPU machine, in one device call: build tutti with CUDA, run the GPU tests, the HF interop
# check on a checkpoint sharded by pipeline stage (carried in .gpu-ckpt/), and GPT-2 124M
# training speed of tutti (fp32, TF32 tensor cores, bf16 mixed precision with flash attention and
# with the materialised attention) next to the PyTorch peers on the same card (compiled bf16;
# eager bf16 with the math attention).
#   bash bench/gpu_run.sh OUT_DIR        (needs .gpu-debs/ carried; see scripts/gpu_build.sh)
# Every step logs to OUT_DIR/<step>.log; a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
STEP_DIR=$OUT
source bench/gpu_common.sh
step build bash scripts/gpu_build.sh -DTUTTI_MPI=OFF -DTUTTI_BUILD_EXAMPLES=OFF
source scripts/gpu_env.sh
step cuda_backend_test build-gpu/tests/cuda_backend_test
step cuda_layernorm_test build-gpu/tests/cuda_layernorm_test
step cuda_bf16_test build-gpu/tests/cuda_bf16_test
step cuda_epilogue_test build-gpu/tests/cuda_epilogue_test
step cuda_bf16_materialised_test env TUTTI_CUDA_FLASH=0 build-gpu/tests/cuda_bf16_test
step timing_tf32 env TUTTI_CUDA_TIMING=1 TUTTI_CUDA_TF32=1 build-gpu/tests/cuda_bf16_test --gtest_filter='*Timing*'
# The flash kernels under compute-sanitizer (out-of-bounds accesses; shared-memory races).
FLASH_TESTS='CudaBf16.FlashAttention*:CudaBf16Ops.CausalAttention*'
step memcheck_flash timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
  build-gpu/tests/cuda_bf16_test --gtest_filter="$FLASH_TESTS"
step racecheck_flash timeout 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
  build-gpu/tests/cuda_bf16_test --gtest_filter='CudaBf16Ops.CausalAttention*'
step ops_test build-gpu/tests/ops_test
step trainer_cuda build-gpu/tests/trainer_test --gtest_filter='*Cuda*'
CKPT=$(ls -d .gpu-ckpt/run/checkpoints/step_* 2>/dev/null | tail -1)
[ -n "$CKPT" ] && step hf_interop_sharded python3 scripts/hf_interop.py --tutti build-gpu/tutti --workdir /tmp/hf \
  --checkpoint "$CKPT" --steps A
# GPT-2 124M, synthetic tokens, batch 16 x 1024: step times from metrics.jsonl (step 1 excluded).
gpt2() {  # gpt2 NAME DTYPE [ENV=...]
  local name=$1 dtype=$2; shift 2
  rm -rf "/tmp/$name"
  step "$name" env "$@" build-gpu/tutti train "${GPT2_FLAGS[@]}" --dtype "$dtype" --batch 16 --steps 8 \
    --out "/tmp/$name"
  cp "/tmp/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
}
gpt2 tutti_fp32_b16 fp32 TUTTI_CUDA_TF32=0
gpt2 tutti_tf32_b16 fp32 TUTTI_CUDA_TF32=1
gpt2 tutti_bf16_b16 bf16 TUTTI_CUDA_TF32=0
gpt2 tutti_bf16_materialised_b16 bf16 TUTTI_CUDA_FLASH=0
gpt2 tutti_bf16_unfused_b16 bf16 TUTTI_CUDA_LT=0  # GEMM epilogues as separate kernels
step torch_bf16_b16 python3 bench/torch_gpt2_peer.py --batch 16 --json "$OUT/torch_bf16_b16.json"
step torch_eager_bf16_math_b16 python3 bench/torch_gpt2_peer.py --batch 16 --no-compile --attention math --steps 10 \
  --warmup 3 --json "$OUT/torch_eager_bf16_math_b16.json"
if [ -n "${WITH_TORCH_FP32:-}" ]; then
  step torch_fp32_b16 python3 bench/torch_gpt2_peer.py --batch 16 --dtype fp32 --no-compile --steps 10 --warmup 3 \
    --json "$OUT/torch_fp32_b16.json"
fi
# The table: median step of steps 2-8 (tutti) and PyTorch's median; MFU against 989 TFLOP/s.
python3 - "$OUT" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
flops = 6 * (12 * 12 * 768 * 768 + 50304 * 768) + 12 * 12 * 768 * 1024  # per token, as GPTConfig::flops_per_token
print(f"{'run':34} {'step ms':>9} {'tok/s':>9} {'MFU':>6}")
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name)
    if name.endswith('.metrics.jsonl'):
        ms = [json.loads(l)['ms'] for l in open(path) if '"ms"' in l][1:]
        if not ms: continue
        step = statistics.median(ms)
    elif name.endswith('.json'):
        step = json.load(open(path)).get('step_ms_median')
        if step is None: continue
    else:
        continue
    tok = 16 * 1024 / (step / 1e3)
    print(f"{name.split('.')[0]:34} {step:9.1f} {tok:9.0f} {tok * flops / 989e12:6.3f}")
PY
