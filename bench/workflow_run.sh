#!/usr/bin/env bash
# The concurrent workflow against the serial one (#6): the stall that evaluation and checkpoints
# add to a run, with the workflow serial (each on the training thread, in turn), concurrent (in the
# background: batches ahead, evaluation on a snapshot, checkpoints written by a task), and with a
# dedicated evaluating rank (mpirun -np 2 --eval-rank 1 beside one training rank).
#
#   bench/workflow_run.sh BUILD_DIR [REPS]
#   PIN=0,1 bench/workflow_run.sh ...   (every run pinned to those CPUs, TUTTI_CORES set to their
#                                        number: a 2-core machine inside a bigger quiet one)
#
# Each run trains the default model (4 layers, dim 128, context 64, batch 12) for STEPS steps;
# "with tasks" evaluates (20 + 20 batches and a 200-byte sample) and checkpoints every EVERY steps.
# The stall is the time per step over the run with tasks less the time per step without, and the
# table gives how much of the serial stall each variant removes. Runs are interleaved; medians over
# REPS repetitions. Needs a quiet machine (the header prints the load).
set -euo pipefail
BUILD=${1:?usage: bench/workflow_run.sh BUILD_DIR [REPS]}
REPS=${2:-3}
STEPS=${STEPS:-300}
EVERY=${EVERY:-25}
TUTTI=$(realpath "$BUILD/tutti")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/tutti-workflow.XXXXXX)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN="mpirun --oversubscribe --bind-to none"
PINNED=()
if [ -n "${PIN:-}" ]; then
  PINNED=(taskset -c "$PIN")
  export TUTTI_CORES=$(( $(tr ',' '\n' <<< "$PIN" | wc -l) ))
fi

echo "# workflow bench: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores${PIN:+, pinned to CPUs $PIN (TUTTI_CORES=$TUTTI_CORES)}, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# tutti $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "(no git)"), steps $STEPS, tasks every $EVERY steps, $REPS repetitions"

# run NAME THREADS [LAUNCH...] -- [ARGS...]: seconds per step over the whole run (wall time of the process)
run() {
  local name=$1 threads=$2; shift 2
  local launch=()
  while [ "$1" != "--" ]; do launch+=("$1"); shift; done
  shift
  local out="$WORK/$name.$rep"
  local t0 t1
  t0=$(date +%s.%N)
  "${PINNED[@]}" "${launch[@]}" "$TUTTI" train --steps "$STEPS" --threads "$threads" --log-interval 100000 --sample-tokens 200 \
    --out "$out" "$@" > "$out.log" 2>&1
  t1=$(date +%s.%N)
  python3 - "$t0" "$t1" "$STEPS" "$out/metrics.jsonl" "$name" <<'EOF' >> "$WORK/results.tsv"
import json, statistics, sys
t0, t1, steps, metrics, name = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
waits = [json.loads(l).get("data_wait_ms", 0.0) for l in open(metrics) if '"loss"' in l]
print(f"{name}\t{(t1 - t0) / steps * 1e3:.3f}\t{statistics.median(waits):.4f}")
EOF
}

quiet="--eval-interval $STEPS --checkpoint-interval $STEPS"
busy="--eval-interval $EVERY --checkpoint-interval $EVERY"
for rep in $(seq 1 "$REPS"); do
  for threads in 2 1; do
    run "t${threads}_none_serial" "$threads" -- $quiet --workflow serial
    run "t${threads}_tasks_serial" "$threads" -- $busy --workflow serial
    run "t${threads}_none_concurrent" "$threads" -- $quiet
    run "t${threads}_tasks_concurrent" "$threads" -- $busy
  done
  run "t1_tasks_evalrank" 1 $MPIRUN -np 2 -- $busy --eval-rank 1
done

python3 - "$WORK/results.tsv" <<'EOF'
import collections, statistics, sys
ms, wait = collections.defaultdict(list), collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, t, w = line.split("\t")
    ms[name].append(float(t)); wait[name].append(float(w))
med = {k: statistics.median(v) for k, v in ms.items()}
print("| threads | workflow | ms/step, no tasks | ms/step, with tasks | stall (% of step) | serial stall removed | data wait median (ms) |")
print("|---:|---|---:|---:|---:|---:|---:|")
for threads in (2, 1):
    base = med[f"t{threads}_none_serial"]
    serial_stall = med[f"t{threads}_tasks_serial"] - base
    variants = [("serial", "serial"), ("concurrent", "concurrent")]
    if threads == 1: variants.append(("evalrank", "eval rank (np 2)"))
    for key, label in variants:
        none = med.get(f"t{threads}_none_{key}", base)
        tasks = med[f"t{threads}_tasks_{key}"]
        stall = tasks - base
        removed = 100 * (1 - stall / serial_stall) if serial_stall > 0 else float("nan")
        print(f"| {threads} | {label} | {none:.2f} | {tasks:.2f} | {100 * stall / base:+.1f}% | "
              f"{removed:.0f}% | {statistics.median(wait[f't{threads}_tasks_{key}']):.3f} |")
EOF
echo "# raw: $WORK/results.tsv"
