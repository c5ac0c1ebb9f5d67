#!/usr/bin/env bash
# Where a GPT-2 124M bf16 training step goes on the GPU (issue #7), without Nsight Systems (not on
# the GPU machine): the step's wall time (a plain 20-step run, median of steps 2-20, and a traced
# run summarised by `tutti inspect trace`) against the sum of its kernels' durations under Nsight
# Compute (one metric, gpu__time_duration, caches and clocks left alone), kernel by kernel. Their
# difference is the time the GPU waits for the host (launch gaps, synchronisations).
#   bash bench/gpu_profile.sh OUT_DIR [BATCH]     (build-gpu/ from scripts/gpu_build.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_profile.sh OUT_DIR [BATCH]}
B=${2:-16}
mkdir -p "$OUT"
source scripts/gpu_env.sh
train() {  # train NAME STEPS [flags...]
  local name=$1 steps=$2; shift 2
  rm -rf "/tmp/$name"
  build-gpu/tutti train --device cuda --dtype bf16 --data synthetic --vocab 50304 --layers 12 --heads 12 --dim 768 \
    --context 1024 --batch "$B" --steps "$steps" --warmup 0 --eval-interval 100000 --eval-batches 1 \
    --checkpoint-interval 100000 --log-interval 1 --out "/tmp/$name" "$@"
}
train profile_wall 20 > "$OUT/wall.log" 2>&1
cp /tmp/profile_wall/metrics.jsonl "$OUT/wall.metrics.jsonl"
train profile_trace 8 --trace "$OUT/step.trace.json" > "$OUT/trace.log" 2>&1
build-gpu/tutti inspect trace "$OUT/step.trace.json" > "$OUT/inspect.txt" 2>&1
ncu --metrics gpu__time_duration.sum --cache-control none --clock-control none --csv --print-units base \
  --log-file "$OUT/ncu.csv" bash -c "$(declare -f train); B=$B; train profile_ncu 4" > "$OUT/ncu_run.log" 2>&1
python3 - "$OUT" <<'PY'
import collections, csv, json, re, statistics, sys
out = sys.argv[1]
ms = [json.loads(l)['ms'] for l in open(f'{out}/wall.metrics.jsonl') if '"ms"' in l][1:]
wall = statistics.median(ms)
rows = [r for r in csv.DictReader(l for l in open(f'{out}/ncu.csv') if l.startswith('"'))
        if r.get('Metric Name') == 'gpu__time_duration.sum']
def short(name):
    name = re.sub(r'\(.*', '', name)  # drop the argument list
    return name[:70]
names = [short(r['Kernel Name']) for r in rows]
dur = [float(r['Metric Value']) / 1e6 for r in rows]  # ns -> ms
starts = [i for i, n in enumerate(names) if 'flash_forward' in n][::12]  # one step: layer 0's forward to the next
print(f'wall: median step {wall:.2f} ms over {len(ms)} steps (min {min(ms):.2f}); kernels profiled: {len(rows)}')
for a, b in zip(starts[1:], starts[2:]):
    print(f'kernels of one step: {b - a}, their time {sum(dur[a:b]):.2f} ms, wall - kernels {wall - sum(dur[a:b]):.2f} ms')
a, b = starts[-2], starts[-1]
per = collections.defaultdict(lambda: [0, 0.0])
for n, d in zip(names[a:b], dur[a:b]):
    per[n][0] += 1; per[n][1] += d
print(f"\n{'kernel':72} {'calls':>5} {'ms':>8} {'share':>6}")
total = sum(d for _, d in per.values())
for n, (c, d) in sorted(per.items(), key=lambda kv: -kv[1][1]):
    print(f'{n:72} {c:5d} {d:8.3f} {d / total:6.1%}')
PY
