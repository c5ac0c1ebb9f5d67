#!/usr/bin/env bash
# Checkpoint cost (issue 5): the step-time overhead of background checkpoints and the write rate,
# against the disk's dd rate. W2's model (6 layers, 6 heads, dim 384, context 256, batch 8:
# a 130 MB checkpoint of weights and AdamW moments) trained for STEPS steps without checkpoints
# and with one every INTERVAL steps; medians of the step times in metrics.jsonl.
#   bench/checkpoint_cost.sh [BUILD_DIR] [STEPS] [INTERVAL]
set -euo pipefail
build=${1:-build}
steps=${2:-40}
interval=${3:-5}
work=$(mktemp -d /tmp/tutti-ckpt-cost.XXXXXX)
trap 'rm -rf "$work"' EXIT
common="--layers 6 --heads 6 --dim 384 --context 256 --batch 8 --steps $steps --eval-interval 100000 --eval-batches 1
        --sample-tokens 0 --log-interval 100000"
median_ms() {  # step times, without the first two (warmup) and the last (it waits for the final write)
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ms = [r["ms"] for r in rows if "ms" in r][2:-1]
print(f"{statistics.median(ms):.1f}")
PY
}
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD); $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "command: bench/checkpoint_cost.sh $build $steps $interval"
"$build/tutti" train $common --checkpoint-interval 100000 --out "$work/none" >/dev/null
"$build/tutti" train $common --checkpoint-interval "$interval" --keep-checkpoints 2 --out "$work/every" >/dev/null
base=$(median_ms "$work/none/metrics.jsonl")
with=$(median_ms "$work/every/metrics.jsonl")
python3 - "$work/every/metrics.jsonl" "$base" "$with" "$interval" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
writes = [r for r in rows if "checkpoint_step" in r]
base, with_, interval = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
mb = writes[-1]["bytes"] / 1e6
rates = sorted(r["bytes"] / 1e6 / r["seconds"] for r in writes)
print(f"step time median: {base} ms without checkpoints, {with_} ms with one every {interval} steps "
      f"({(with_ / base - 1) * 100:+.1f}%)")
print(f"checkpoint: {mb:.0f} MB, {len(writes)} background writes, "
      f"{rates[len(rates) // 2]:.0f} MB/s median (best {rates[-1]:.0f}) including fsync")
PY
dd if=/dev/zero of="$work/dd.bin" bs=1M count=256 conv=fsync 2>&1 | tail -1 | sed 's/^/dd (256 MiB, fsync): /'
start=$(date +%s.%N)
"$build/tutti" inspect "$work/every" >/dev/null
end=$(date +%s.%N)
python3 -c "print(f'load check (tutti inspect: read + xxh3 + parse every file of the run): {float($end) - float($start):.2f} s')"
