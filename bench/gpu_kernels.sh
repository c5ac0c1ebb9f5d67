#!/usr/bin/env bash
# GPU time per kernel of one GPT-2 124M bf16 training step (issue #7), tutti beside PyTorch
# compiled, from the same call: tutti's second step under Nsight Compute (duration only, clocks
# and caches left alone, kernels serialised), PyTorch's steps under torch.profiler.
#   bash bench/gpu_kernels.sh OUT_DIR [BATCH]     (build-gpu/ from scripts/gpu_build.sh)
# Writes OUT_DIR/tutti_kernels.txt and OUT_DIR/torch_kernels.txt: us per step by kernel, slowest
# first. Kernels of the first step (and the GEMM tuning in it) are left out: the step is the
# launches after step 1's AdamW launches, up to and including step 2's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_kernels.sh OUT_DIR [BATCH]}
B=${2:-16}
mkdir -p "$OUT"
source scripts/gpu_env.sh
source bench/gpu_common.sh
rm -rf /tmp/kernels_run
ncu --metrics gpu__time_duration.sum --clock-control none --cache-control none --csv --print-units base \
  build-gpu/tutti train "${GPT2_FLAGS[@]}" --dtype bf16 --batch "$B" --steps 2 --out /tmp/kernels_run \
  > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$?"
python3 - "$OUT" "$B" <<'PY'
import collections, csv, re, sys
out, batch = sys.argv[1], sys.argv[2]
rows = [r for r in csv.reader(l for l in open(f'{out}/ncu.csv') if l.startswith('"'))]
head, rows = rows[0], rows[1:]
ki, ni, mi, vi = head.index('ID'), head.index('Kernel Name'), head.index('Metric Name'), head.index('Metric Value')
kernels = [(r[ni], float(r[vi].replace(',', '')) / 1e3) for r in rows if r[mi] == 'gpu__time_duration.sum']
def short(name):  # the template arguments' functor names are what tell map kernels apart
    name = re.sub(r'\(.*$', '', name) if not name.startswith('void') else name
    name = re.sub(r'^void ', '', name)
    name = re.sub(r'tutti::cuda::kernels::|\(anonymous namespace\)::|tutti::', '', name)
    return re.sub(r'\((?:[^()]|\([^()]*\))*\)$', '', name)[:150]
adam = [i for i, (n, _) in enumerate(kernels) if 'AdamW' in n]
# step 2 = after the last AdamW launch of step 1: AdamW launches come in one run per step
runs, prev = [], None
for i in adam:
    if prev is None or i > prev + 3: runs.append([])
    runs[-1].append(i); prev = i
start = runs[-2][-1] + 1 if len(runs) >= 2 else 0
step = kernels[start:runs[-1][-1] + 1]  # the evaluation at the end of the run left out
tot, cnt = collections.defaultdict(float), collections.Counter()
for n, us in step:
    tot[short(n)] += us; cnt[short(n)] += 1
with open(f'{out}/tutti_kernels.txt', 'w') as f:
    f.write(f'# tutti B{batch}: GPU us per step by kernel (step 2, {len(step)} launches), total {sum(tot.values())/1e3:.2f} ms\n')
    for n, us in sorted(tot.items(), key=lambda kv: -kv[1]):
        f.write(f'{us:10.1f} {cnt[n]:5d}  {n}\n')
    f.write('\n# in launch order (us)\n')
    for n, us in step:
        f.write(f'{us:9.1f}  {short(n)[:110]}\n')
PY
python3 bench/torch_gpt2_peer.py --batch "$B" --steps 10 --kernels "$OUT/torch_kernels.txt" > "$OUT/torch.log" 2>&1
echo "torch rc=$?"
head -45 "$OUT/tutti_kernels.txt"; head -45 "$OUT/torch_kernels.txt"
