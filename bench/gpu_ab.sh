#!/usr/bin/env bash
# On the GPU machine, in one device call (issue #7): this tree against an older one (a `git archive`
# tarball, carried) on GPT-2 124M bf16 training, with the CUDA tests of this tree first and the
# PyTorch peer in the same call. Both trees build at once (scripts/gpu_build.sh's configuration,
# only the targets needed); B16 runs alternate old, new, old, new, ... (20 steps each, median of
# steps 2-20), then B32 the same way (B32_ROUNDS alternations, default 1), then PyTorch compiled at
# B16 and B32.
#   bash bench/gpu_ab.sh OUT_DIR OLD.tar [ROUNDS [B32_ROUNDS]]     (needs .gpu-debs/ carried)
# TORCH=0 leaves PyTorch out (an A/B of two trees only).
# Logs go to OUT_DIR/logs.tar.gz; the table and the steps print last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_ab.sh OUT_DIR OLD.tar [ROUNDS [B32_ROUNDS]]}
OLD_TAR=${2:?usage: bench/gpu_ab.sh OUT_DIR OLD.tar [ROUNDS [B32_ROUNDS]]}
ROUNDS=${3:-3}
B32_ROUNDS=${4:-1}
LOGS=$(mktemp -d)/logs
mkdir -p "$LOGS" "$OUT" /tmp/old-tree
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
STEP_DIR=$LOGS
source bench/gpu_common.sh
tar -xf "$OLD_TAR" -C /tmp/old-tree && cp -r .gpu-debs /tmp/old-tree/
TUTTI_TARGETS="tutti_cli cuda_backend_test cuda_layernorm_test cuda_bf16_test cuda_xent_test cuda_epilogue_test" \
  step build bash scripts/gpu_build.sh -DTUTTI_MPI=OFF -DTUTTI_BUILD_EXAMPLES=OFF &
(cd /tmp/old-tree && TUTTI_TARGETS=tutti_cli bash scripts/gpu_build.sh -DTUTTI_MPI=OFF -DTUTTI_BUILD_EXAMPLES=OFF \
  > "$LOGS/build_old.log" 2>&1; echo "build_old rc=$?" | tee -a "$LOGS/steps.txt")
wait
source scripts/gpu_env.sh
T=build-gpu/tests
for t in cuda_backend_test cuda_layernorm_test cuda_bf16_test cuda_xent_test cuda_epilogue_test; do step "$t" timeout 150 "$T/$t"; done
gpt2() {  # gpt2 NAME TUTTI BATCH
  local name=$1 tutti=$2 batch=$3
  rm -rf "/tmp/$name"
  step "$name" timeout 150 "$tutti" train "${GPT2_FLAGS[@]}" --dtype bf16 --batch "$batch" --steps 20 \
    --out "/tmp/$name"
  cp "/tmp/$name/metrics.jsonl" "$LOGS/$name.metrics.jsonl" 2>/dev/null
}
for r in $(seq "$ROUNDS"); do
  gpt2 "b16_old_$r" /tmp/old-tree/build-gpu/tutti 16
  gpt2 "b16_new_$r" build-gpu/tutti 16
done
for r in $(seq "$B32_ROUNDS"); do
  gpt2 "b32_old_$r" /tmp/old-tree/build-gpu/tutti 32
  gpt2 "b32_new_$r" build-gpu/tutti 32
done
if [ "${TORCH:-1}" != 0 ]; then
  step torch_b16 python3 bench/torch_gpt2_peer.py --batch 16 --json "$LOGS/torch_b16.json"
  step torch_b32 python3 bench/torch_gpt2_peer.py --batch 32 --json "$LOGS/torch_b32.json"
fi
python3 - "$LOGS" <<'PY' | tee "$LOGS/table.txt"
import json, os, re, statistics, sys
out = sys.argv[1]
flops = 6 * (12 * 12 * 768 * 768 + 50304 * 768) + 12 * 12 * 768 * 1024  # per token
print(f"{'run':12} {'step ms':>8} {'best ms':>8} {'tok/s':>9} {'MFU':>6}  peak / losses 1-3")
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name)
    if name.endswith('.metrics.jsonl'):
        rows = [json.loads(l) for l in open(path) if '"ms"' in l]
        ms = [r['ms'] for r in rows][1:]
        if not ms: continue
        step, best = statistics.median(ms), min(ms)
        log = open(os.path.join(out, name.replace('.metrics.jsonl', '.log'))).read()
        peak = re.findall(r'peak[^\n]*', log)
        extra = (peak[-1][:60] if peak else '') + ' ' + ' '.join(f"{r['loss']:.4f}" for r in rows[:3])
    elif name.endswith('.json'):
        j = json.load(open(path))
        step, best, extra = j.get('step_ms_median'), j.get('step_ms_best', 0), f"peak {j.get('peak_mem_gib', '?')} GiB"
        if step is None: continue
    else:
        continue
    batch = 32 if 'b32' in name else 16
    tok = batch * 1024 / (step / 1e3)
    print(f"{name.split('.')[0]:12} {step:8.2f} {best:8.2f} {tok:9.0f} {tok * flops / 989e12:6.3f}  {extra}")
PY
tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs
cat "$LOGS/steps.txt"
