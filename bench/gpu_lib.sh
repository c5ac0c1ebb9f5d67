# Shared by bench/gpu2_run.sh and bench/gpu4_run.sh (sourced, with OUT set): the environment,
# gpu_common.sh's `step` logging to $OUT, the build, and
# `gpt2 NAME NP BATCH [train flags...]`: 10 steps of GPT-2 124M on synthetic tokens with TF32 on
# NP GPUs, metrics copied to $OUT; with GPT2_TRACE=1 also traced and summarised by inspect trace.
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
STEP_DIR=$OUT
source bench/gpu_common.sh
step build bash scripts/gpu_build.sh -DTUTTI_BUILD_EXAMPLES=OFF
source scripts/gpu_env.sh
gpt2() {
  local name=$1 np=$2 batch=$3; shift 3
  rm -rf "/tmp/$name" "$OUT/$name.trace.json"
  local launch=(env TUTTI_CUDA_TF32=1) trace=()
  [ "$np" -gt 1 ] && launch=(mpirun -np "$np" --bind-to none -x TUTTI_CUDA_TF32=1 -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH)
  [ "${GPT2_TRACE:-0}" = 1 ] && trace=(--trace "$OUT/$name.trace.json")
  step "$name" "${launch[@]}" build-gpu/tutti train "${GPT2_FLAGS[@]}" --batch "$batch" --steps 10 \
    --out "/tmp/$name" "${trace[@]}" "$@"
  cp "/tmp/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  if [ "${GPT2_TRACE:-0}" = 1 ]; then
    build-gpu/tutti inspect trace "$OUT/$name.trace.json" > "$OUT/$name.inspect.txt" 2>&1
  fi
}
