#!/usr/bin/env bash
# Where a GPT-2 124M bf16 training step goes on the GPU (issue #7), without Nsight Systems (not on
# the GPU machine): the step's wall time (a plain 20-step run) and the host's spans in a traced run,
# step by step: forward (ends with the loss, which waits for the GPU), backward (the host queues
# it), the gradient norm (waits for the GPU to finish backward), the energy counter, the
# optimizer, the batch copy. Host work between the waits is time the GPU may sit idle. (The GPU's
# side, kernel by kernel: bench/gpu_kernels.sh, ncu with durations only, ~30 s for two steps.)
#   bash bench/gpu_profile.sh OUT_DIR [BATCH]     (build-gpu/ from scripts/gpu_build.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_profile.sh OUT_DIR [BATCH]}
B=${2:-16}
mkdir -p "$OUT"
source scripts/gpu_env.sh
source bench/gpu_common.sh
train() {  # train NAME STEPS [flags...]
  local name=$1 steps=$2; shift 2
  rm -rf "/tmp/$name"
  build-gpu/tutti train "${GPT2_FLAGS[@]}" --dtype bf16 --batch "$B" --steps "$steps" --out "/tmp/$name" "$@"
}
train profile_wall 20 > "$OUT/wall.log" 2>&1
cp /tmp/profile_wall/metrics.jsonl "$OUT/wall.metrics.jsonl"
train profile_trace 8 --trace "$OUT/step.trace.json" > "$OUT/trace.log" 2>&1
build-gpu/tutti inspect trace "$OUT/step.trace.json" > "$OUT/inspect.txt" 2>&1
python3 - "$OUT" <<'PY'
import collections, json, statistics, sys
out = sys.argv[1]
ms = [json.loads(l)['ms'] for l in open(f'{out}/wall.metrics.jsonl') if '"ms"' in l][1:]
print(f'wall: median step {statistics.median(ms):.2f} ms, fastest {min(ms):.2f}, slowest {max(ms):.2f} over {len(ms)} steps')
t = json.load(open(f'{out}/step.trace.json'))
ev = sorted((e for e in (t['traceEvents'] if isinstance(t, dict) else t) if e.get('ph') == 'X' and e.get('tid') == 0),
            key=lambda e: e['ts'])
steps = [e for e in ev if e['name'].startswith('step ')][1:]  # the first (warm-up) left out
per = collections.defaultdict(list)
for s in steps:
    inside = [e for e in ev if s['ts'] <= e['ts'] < s['ts'] + s['dur'] and e is not s]
    per['step'].append(s['dur'] / 1e3)
    for e in inside:
        per[e['name'].split(' 0')[0]].append(e['dur'] / 1e3)
print(f"{'span (host time, ms)':24} {'median':>8} {'min':>8} {'max':>8}")
for name, v in per.items():
    print(f'{name:24} {statistics.median(v):8.2f} {min(v):8.2f} {max(v):8.2f}')
PY
