#!/usr/bin/env bash
# On the GPU machine, in one device call: build tutti with CUDA, run the GPU tests, the HF interop
# check on a checkpoint sharded by pipeline stage (carried in .gpu-ckpt/), and GPT-2 124M
# training speed of tutti (fp32, and TF32 tensor cores) next to the PyTorch peer on the same card.
#   bash bench/gpu_run.sh OUT_DIR        (needs .gpu-debs/ carried; see scripts/gpu_build.sh)
# Every step logs to OUT_DIR/<step>.log; a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
step() {  # step NAME COMMAND...: runs, logs, records the exit code and seconds
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
}
step build bash scripts/gpu_build.sh -DTUTTI_MPI=OFF -DTUTTI_BUILD_EXAMPLES=OFF
source scripts/gpu_env.sh
step cuda_backend_test build-gpu/tests/cuda_backend_test
step ops_test build-gpu/tests/ops_test
step trainer_cuda build-gpu/tests/trainer_test --gtest_filter='*Cuda*'
CKPT=$(ls -d .gpu-ckpt/run/checkpoints/step_* 2>/dev/null | tail -1)
[ -n "$CKPT" ] && step hf_interop_sharded python3 scripts/hf_interop.py --tutti build-gpu/tutti --workdir /tmp/hf \
  --checkpoint "$CKPT" --steps A
# GPT-2 124M, synthetic tokens, batch 16 x 1024: step times from metrics.jsonl (step 1 excluded).
gpt2() {  # gpt2 NAME [ENV=...]
  local name=$1; shift
  rm -rf "/tmp/$name"
  step "$name" env "$@" build-gpu/tutti train --device cuda --data synthetic --vocab 50304 --layers 12 --heads 12 \
    --dim 768 --context 1024 --batch 16 --steps 8 --warmup 0 --eval-interval 100000 --eval-batches 1 \
    --checkpoint-interval 100000 --log-interval 1 --out "/tmp/$name"
  cp "/tmp/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
}
gpt2 tutti_fp32_b16 TUTTI_CUDA_TF32=0
gpt2 tutti_tf32_b16 TUTTI_CUDA_TF32=1
step torch_bf16_b16 python3 bench/torch_gpt2_peer.py --batch 16 --json "$OUT/torch_bf16_b16.json"
step torch_fp32_b16 python3 bench/torch_gpt2_peer.py --batch 16 --dtype fp32 --no-compile --steps 10 --warmup 3 \
  --json "$OUT/torch_fp32_b16.json"
