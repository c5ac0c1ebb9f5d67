#!/usr/bin/env bash
# Runs tutti's train_bench beside the PyTorch peer (bench/torch_peer.py) on W1 and W2 at 1 and 2
# threads, interleaved (tutti, then each PyTorch setting, repeated), and prints a markdown table
# ready for bench/RESULTS.md, headed by the machine, the date and this command. Builds nothing.
#
#   bench/run.sh [BUILD_DIR] [--quick] [--reps N] [--workloads "W1 W2"] [--threads "1 2"] [--raw FILE]
#
# BUILD_DIR (default build/) must hold bench/train_bench: configure with -DTUTTI_BUILD_BENCH=ON and
# `ninja -C BUILD_DIR train_bench`. --quick runs a few steps once: a functional check, not a
# measurement. PyTorch runs with /usr/bin/python3 (Debian's python3-torch; override with
# TUTTI_BENCH_PYTHON); at 2 threads both settings of ../shared/MACHINE.md are run and the better
# median is compared: "blas" (torch 1 thread, OpenBLAS 2) and "omp" (torch 2 threads,
# OMP_WAIT_POLICY=PASSIVE, OpenBLAS 2).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
command_line="bench/run.sh $*"

build="build"
quick=0
reps=3
workloads="W1 W2"
thread_counts="1 2"
raw=""
check_failed=0
while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --reps) reps="$2"; shift ;;
    --workloads) workloads="$2"; shift ;;
    --threads) thread_counts="$2"; shift ;;
    --raw) raw="$2"; shift ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) build="$1" ;;
  esac
  shift
done

bench_bin="$build/bench/train_bench"
[[ "$bench_bin" = /* ]] || bench_bin="$PWD/$bench_bin"
python="${TUTTI_BENCH_PYTHON:-/usr/bin/python3}"
if [[ ! -x "$bench_bin" ]]; then
  echo "run.sh: $bench_bin not found; build it first: ninja -C $build train_bench" >&2
  exit 1
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "run.sh: $python cannot import torch (apt-get install python3-torch)" >&2
  exit 1
fi

# Steps per run: W2 steps take ~1-3 s, W1 steps ~0.1 s.
steps_for() {
  if ((quick)); then
    echo "--steps 3 --warmup 1"
  elif [[ "$1" == W1 ]]; then
    echo "--steps 40 --warmup 5"
  else
    echo "--steps 10 --warmup 2"
  fi
}
((quick)) && reps=1

if [[ -z "$raw" ]]; then raw="$(mktemp /tmp/tutti-bench.XXXXXX.jsonl)"; fi
: > "$raw"

# ---- header --------------------------------------------------------------------------------------
model="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)"
blas_lib="$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo unknown)"
echo "## Training throughput, tutti vs PyTorch (CPU)"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: $model, $(nproc) cores; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- tutti: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (+ local changes)'), $bench_bin"
echo "- PyTorch: $("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null), BLAS $blas_lib"
threads_env="$(env | grep -E '^(OMP|OPENBLAS|MKL|GOMP)_' | tr '\n' ' ' || true)"
echo "- environment: ${threads_env:-no OMP_, GOMP_, OPENBLAS_ or MKL_ variables set}"
if [[ -x "$build/bench/gemm_bench" ]]; then
  peak="$("$build/bench/gemm_bench" --peak-only --threads 1,2 | sed -n 's/^FMA peak (AVX2, \(.*\)): \(.*\)$/\2 on \1/p' | paste -sd ';' | sed 's/;/; /g')"
  echo "- measured FMA peak (gemm_bench --peak-only): $peak; the % column uses MACHINE.md's 100 / 204"
fi
echo "- command: \`$command_line\`$( ((quick)) && echo '  (QUICK: functional check, not a measurement)')"
echo "- method: $reps repetition(s); each runs tutti, then each PyTorch setting, per workload and thread count"
echo "  (steps per run: W1 \`$(steps_for W1)\`, W2 \`$(steps_for W2)\`); raw JSON lines: $raw"

# ---- the peer computes what tutti computes ----------------------------------------------------------
# tutti's first steps (weights, batches, losses) replayed in the PyTorch model and optimizer.
check_dir="$(mktemp -d /tmp/tutti-bench-check.XXXXXX)"
checks=""
for w in $workloads; do
  line="train_bench --dump failed"
  if "$bench_bin" --workload "$w" --steps 3 --warmup 0 --dump "$check_dir/$w" > /dev/null &&
     line="$("$python" "$here/torch_peer.py" --check "$check_dir/$w" | tail -1)"; then
    checks+="${checks:+; }$line"
  else
    checks+="${checks:+; }$w: FAILED ($line)"
    echo "run.sh: the PyTorch peer does not reproduce tutti's losses on $w; see $check_dir/$w" >&2
    check_failed=1
  fi
done
echo "- peer check (same weights and batches, 3 AdamW steps): $checks"
echo
((check_failed)) || rm -rf "$check_dir"

# ---- runs ----------------------------------------------------------------------------------------
run_one() {  # label, command...: appends one JSON line to $raw, or reports the failure
  local label="$1"; shift
  local out
  if out="$("$@" 2>&1)"; then
    printf '%s\n' "$out" | tail -1 >> "$raw"
    printf '  %-34s %s tok/s median\n' "$label" \
      "$(printf '%s\n' "$out" | tail -1 | "$python" -c 'import json,sys; print(round(json.load(sys.stdin)["tok_s_median"]))')" >&2
  else
    echo "run.sh: $label failed:" >&2
    printf '%s\n' "$out" | tail -5 >&2
    return 1
  fi
}

status=$check_failed
for rep in $(seq 1 "$reps"); do
  for w in $workloads; do
    for t in $thread_counts; do
      # shellcheck disable=SC2046  # steps_for prints several words on purpose
      run_one "rep $rep $w ${t}T tutti" "$bench_bin" --workload "$w" --threads "$t" $(steps_for "$w") --json || status=1
      if ((t == 1)); then settings="single"; else settings="blas omp"; fi
      for s in $settings; do
        # shellcheck disable=SC2046
        run_one "rep $rep $w ${t}T pytorch/$s" "$python" "$here/torch_peer.py" --workload "$w" --threads "$t" \
          --setting "$s" $(steps_for "$w") --json || status=1
      done
    done
  done
done

# ---- the table -----------------------------------------------------------------------------------
"$python" - "$raw" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
keys = sorted({(r["workload"], r["threads"]) for r in runs})
print("| workload | threads | tutti tok/s median / best | PyTorch tok/s median / best (setting) "
      "| ratio median / best | tutti GFLOP/s median (% of peak) |")
print("|---|---:|---:|---:|---:|---:|")
for w, t in keys:
    mine = [r for r in runs if (r["workload"], r["threads"]) == (w, t) and r["impl"] == "tutti"]
    peer = [r for r in runs if (r["workload"], r["threads"]) == (w, t) and r["impl"] == "pytorch"]
    def summary(rs):  # median over runs of each run's median; best over runs of each run's best
        return statistics.median(r["tok_s_median"] for r in rs), max(r["tok_s_best"] for r in rs)
    cells = [w, str(t)]
    if mine:
        tm, tb = summary(mine)
        cells.append(f"{tm:,.0f} / {tb:,.0f}")
    else:
        cells.append("failed")
    if peer:
        by_setting = {}
        for r in peer:
            by_setting.setdefault(r["setting"], []).append(r)
        setting = max(by_setting, key=lambda s: summary(by_setting[s])[0])
        pm, pb = summary(by_setting[setting])
        others = ", ".join(f"{s} {summary(rs)[0]:,.0f}" for s, rs in sorted(by_setting.items()) if s != setting)
        cells.append(f"{pm:,.0f} / {pb:,.0f} ({setting}{'; ' + others if others else ''})")
    else:
        cells.append("failed")
    cells.append(f"{tm / pm:.2f} / {tb / pb:.2f}" if mine and peer else "-")
    if mine:
        g = statistics.median(r["gflops_median"] for r in mine)
        cells.append(f"{g:.1f} ({100 * g / mine[0]['peak_gflops']:.0f}% of {mine[0]['peak_gflops']:.0f})")
    else:
        cells.append("-")
    print("| " + " | ".join(cells) + " |")
print()
print("PyTorch settings: single = torch 1 thread, OpenBLAS 1; blas = torch 1 thread, OpenBLAS 2; "
      "omp = torch 2 threads, OMP_WAIT_POLICY=PASSIVE, OpenBLAS 2. The better median is compared; "
      "the other setting's median follows it.")
EOF
exit "$status"
