#!/usr/bin/env bash
# Sweep throughput: trials per hour of one `tutti sweep` run three ways on the same trials,
#   sequential 1 x 1   workers = 1, threads_per_trial = 1 (one trial after another on one core)
#   sequential 1 x 2   workers = 1, threads_per_trial = 2 (one after another, each on every core)
#   parallel   2 x 1   workers = 2, threads_per_trial = 1 (two trials at once, one core each)
# and, for the record, the parallel sweep with successive halving on (fewer steps in all).
# Halving is off in the three compared runs (rungs = []), so they do the same work. The trials are
# a grid of 4 learning rates x 2 widths of a small GPT (2 layers, 2 heads, context 64, batch 8) on
# tiny Shakespeare. Prints markdown for bench/RESULTS.md, headed by the machine, the date, the
# commit and this command; "other load" is the CPU time of other processes during each run, in
# cores (0 on a quiet machine). Builds nothing.
#
#   bench/sweep_run.sh [BUILD_DIR] [--steps N] [--reps N] [--quick]
#
# BUILD_DIR (default build/) must hold the tutti program. --quick: 20 steps, one repetition, no
# waiting for a quiet machine: a check of the script, not a measurement.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
command_line="bench/sweep_run.sh $*"
build="build"
steps=150
reps=2
quick=0
while (($#)); do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --quick) quick=1; steps=20; reps=1; shift ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) build="$1"; shift ;;
  esac
done
bin="$(cd "$build" && pwd)/tutti"
[[ -x "$bin" ]] || { echo "no tutti program in $build (build it first)" >&2; exit 1; }
work="$(mktemp -d /tmp/tutti-sweep-bench.XXXXXX)"

source "$here/quiet_lib.sh"

eval_interval=$((steps / 3 > 0 ? steps / 3 : 1))
write_config() {  # NAME WORKERS THREADS RUNGS
  cat > "$work/$1.toml" <<EOF
[base]
layers = 2
heads = 2
context = 64
batch = 8
steps = $steps
eval_interval = $eval_interval
eval_batches = 4
warmup = 10
sample_tokens = 0
checkpoint_interval = 100000
data = "$repo/data/tinyshakespeare.txt"

[search]
lr = [3e-4, 1e-3, 3e-3, 1e-2]
dim = [32, 64]

[sweep]
workers = $2
threads_per_trial = $3
eta = 2
rungs = $4
EOF
}

# One sweep; appends "name rep trials wall_s trials_per_hour busy other_load" to $work/index.
run() {  # NAME WORKERS THREADS RUNGS REP
  local name="$1" rep="$5" out="$work/$1.$5" b0 c0 t0 t1 busy trials other
  write_config "$name" "$2" "$3" "$4"
  ((quick)) || wait_quiet
  b0="$(cpu_busy)"; c0="$(child_cpu)"; t0="$(date +%s.%N)"
  "$bin" sweep "$work/$name.toml" --out "$out" > "$work/$name.$rep.log" 2>&1
  t1="$(date +%s.%N)"
  other="$(other_cores "$b0" "$c0" "$t0" "$t1")"
  trials="$(wc -l < "$out/sweep.jsonl")"
  busy="$(sed -n 's/.*(busy \([0-9]*\)%).*/\1/p' "$work/$name.$rep.log")"
  echo "$name $rep $trials $(awk -v a="$t0" -v b="$t1" -v n="$trials" 'BEGIN { printf "%.1f %.0f", b - a, n * 3600 / (b - a) }') $busy $other" >> "$work/index"
  rm -rf "$out"/trial_*/checkpoints
}

echo "## Sweep throughput: trials per hour, one after another vs two at once"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- tutti: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD -- src include 2>/dev/null || echo ' (+ local changes in src/ or include/)'), $bin"
echo "- command: \`$command_line\`"
echo "- sweep: 8 trials (lr 3e-4, 1e-3, 3e-3, 1e-2 x dim 32, 64; 2 layers, 2 heads, context 64, batch 8), $steps steps each, evaluation every $eval_interval steps (4 batches); $reps repetition(s), interleaved"
echo

for rep in $(seq 1 "$reps"); do  # interleaved, so that a slow spell of the machine hits every mode
  run seq1x1 1 1 "[]" "$rep"
  run seq1x2 1 2 "[]" "$rep"
  run par2x1 2 1 "[]" "$rep"
  run par2x1_halving 2 1 "[$eval_interval]" "$rep"
done

awk '
  { wall[$1] = wall[$1] " " $4; tph[$1] = tph[$1] " " $5; busy[$1] = $6; other[$1] = other[$1] " " $7; trials[$1] = $3 }
  function median(list,   v, n, i, j, t) {
    n = split(list, v, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  END {
    split("seq1x1 seq1x2 par2x1 par2x1_halving", order, " ")
    label["seq1x1"] = "one after another, 1 thread each"; label["seq1x2"] = "one after another, 2 threads each"
    label["par2x1"] = "two at once, 1 thread each"; label["par2x1_halving"] = "two at once, halving at rung 1 (eta 2)"
    base = median(tph["seq1x2"])
    print "| sweep | workers x threads | trials | wall s (median) | trials/hour | vs one after another (2 threads) | workers busy | other load (cores) |"
    print "|---|---|---:|---:|---:|---:|---:|---:|"
    for (k = 1; k <= 4; k++) {
      m = order[k]; if (!(m in tph)) continue
      wt = m ~ /^par/ ? "2 x 1" : (m == "seq1x2" ? "1 x 2" : "1 x 1")
      printf "| %s | %s | %d | %.1f | %.0f | %.2fx | %s%% | %s |\n", label[m], wt, trials[m], median(wall[m]), median(tph[m]),
             median(tph[m]) / base, busy[m], other[m]
    }
  }' "$work/index"
echo
echo "(logs and sweep.jsonl files in $work)"
