#!/usr/bin/env bash
# Data-parallel scaling and overlap on W2 at a fixed global batch of 8 sequences: tutti's dp_bench
# as 1 rank x 2 threads and as `mpirun -np 2` x 1 thread (both of Open MPI's bindings: its default,
# bind to core, and --bind-to none), beside PyTorch on 1 process x 2 threads (bench/torch_peer.py,
# both 2-thread settings, the better compared) and PyTorch DDP with gloo on 2 processes x 1 thread
# (bench/torch_ddp_peer.py), interleaved and repeated; then the overlap of gradient communication
# with backward for bucket sizes 1 to 64 MiB (tutti 2 x 1). Prints markdown for bench/RESULTS.md,
# headed by the machine, the date, the commit and this command. Builds nothing.
#
#   bench/dp_run.sh [BUILD_DIR] [--quick] [--reps 3] [--sweep-reps N] [--buckets "1 4 16 25 64"]
#                   [--variants] [--raw FILE]
#
# --variants adds, to every repetition, tutti 2 x 1 with ZeRO 1 and ZeRO 2, with the communicator's
# poll interval at 50 and 500 us (TUTTI_COMM_POLL_US; default 5), and 1 x 2 with OMP_WAIT_POLICY=PASSIVE.
#
# BUILD_DIR (default build/) must hold bench/dp_bench (`ninja -C BUILD_DIR dp_bench`), built with
# the MPI backend. --quick: a few steps once, a functional check, not a measurement. PyTorch runs
# with /usr/bin/python3 (override with TUTTI_BENCH_PYTHON).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
command_line="bench/dp_run.sh $*"

build="build"
quick=0
reps=3
sweep_reps=""
variants=0
bucket_sizes="1 4 16 25 64"
raw=""
while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --reps) reps="$2"; shift ;;
    --sweep-reps) sweep_reps="$2"; shift ;;
    --variants) variants=1 ;;
    --buckets) bucket_sizes="$2"; shift ;;
    --raw) raw="$2"; shift ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "dp_run.sh: unknown option $1" >&2; exit 2 ;;
    *) build="$1" ;;
  esac
  shift
done

bench_bin="$build/bench/dp_bench"
[[ "$bench_bin" = /* ]] || bench_bin="$PWD/$bench_bin"
plain_bin="$(dirname "$bench_bin")/train_bench"
python="${TUTTI_BENCH_PYTHON:-/usr/bin/python3}"
if [[ ! -x "$bench_bin" ]]; then
  echo "dp_run.sh: $bench_bin not found; build it first: ninja -C $build dp_bench" >&2
  exit 1
fi
command -v mpirun > /dev/null || { echo "dp_run.sh: mpirun not found (apt-get install openmpi-bin)" >&2; exit 1; }
"$python" -c "import torch.distributed as d; assert d.is_gloo_available()" 2>/dev/null ||
  { echo "dp_run.sh: $python has no torch with gloo (apt-get install python3-torch)" >&2; exit 1; }
if [[ "$(id -u)" == 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

if ((quick)); then steps="--steps 3 --warmup 1"; reps=1; sweep_reps=1; else steps="--steps 10 --warmup 2"; fi
sweep_reps="${sweep_reps:-$reps}"
if [[ -z "$raw" ]]; then raw="$(mktemp /tmp/tutti-dp-bench.XXXXXX.jsonl)"; fi
: > "$raw"

# ---- header --------------------------------------------------------------------------------------
echo "## Data parallelism: scaling and overlap"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- tutti: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD -- src include 2>/dev/null || echo ' (+ local changes in src/ or include/)'), $bench_bin; $(mpirun --version 2>/dev/null | head -1)"
echo "- PyTorch: $("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null), gloo backend; BLAS $(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo unknown)"
threads_env="$(env | grep -E '^(OMP|OPENBLAS|MKL|GOMP|TUTTI)_' | tr '\n' ' ' || true)"
echo "- environment: ${threads_env:-no OMP_, GOMP_, OPENBLAS_, MKL_ or TUTTI_ variables set}"
echo "- command: \`$command_line\`$( ((quick)) && echo '  (QUICK: functional check, not a measurement)')"
echo "- method: $reps repetition(s), each running every configuration once in turn (\`$steps\` per run),"
echo "  then $sweep_reps repetition(s) of the bucket sizes in turn; raw JSON lines: $raw"
echo

# ---- runs ----------------------------------------------------------------------------------------
# The machine is shared: other people's builds and tests steal a core for seconds at a time, and a
# 2-thread run that loses a core runs at half speed. So each run starts only when the machine has
# been idle for a second, and a run during which other processes used more than 0.15 of a core on
# average is discarded and repeated (up to 3 attempts; the last is kept and flagged). Other
# processes' use = all CPU time the kernel accounts (user, nice, system, irq, softirq, steal) minus
# what this script's children used.
source "$here/quiet_lib.sh"
discarded=0

run_one() {  # label, extra JSON fields, command...: appends the run's JSON line (tagged) to $raw
  local label="$1" tags="$2"; shift 2
  local out line attempt b0 c0 t0 foreign
  for attempt in 1 2 3; do
    wait_quiet 30
    b0="$(cpu_busy)"; c0="$(child_cpu)"; t0="$(date +%s.%N)"
    if ! out="$("$@" 2>&1)" || ! line="$(printf '%s\n' "$out" | grep '^{' | tail -1)" || [[ -z "$line" ]]; then
      echo "dp_run.sh: $label failed:" >&2
      printf '%s\n' "$out" | tail -5 >&2
      return 1
    fi
    foreign="$(other_cores "$b0" "$c0" "$t0" "$(date +%s.%N)")"
    if awk -v f="$foreign" 'BEGIN { exit !(f <= 0.15) }' || ((attempt == 3)); then break; fi
    echo "  $label: other processes used $foreign cores meanwhile; discarded, repeating" >&2
    discarded=$((discarded + 1))
  done
  printf '%s\n' "$line" | "$python" -c 'import json,sys; r=json.load(sys.stdin); r.update(json.loads(sys.argv[1])); print(json.dumps(r))' \
    "${tags%\}},\"foreign_cores\":$foreign}" >> "$raw"
  printf '  %-40s %6.0f tok/s median  (others used %s cores)\n' "$label" \
    "$(printf '%s\n' "$line" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["tok_s_median"])')" "$foreign" >&2
}

mpi2() { mpirun -np 2 --oversubscribe "$@"; }
status=0
# shellcheck disable=SC2086  # $steps holds several words on purpose
for rep in $(seq 1 "$reps"); do
  run_one "rep $rep tutti 1x2" '{"run":"scaling","bind":"-"}' "$bench_bin" --threads 2 $steps --json || status=1
  if [[ -x "$plain_bin" ]]; then  # the same step without DataParallel: bench/train_bench
    run_one "rep $rep tutti 1x2 plain (train_bench)" '{"run":"scaling","config":"1x2","variant":"plain"}' \
      "$plain_bin" --workload W2 --threads 2 $steps --json || status=1
  fi
  run_one "rep $rep tutti 2x1 bind core" '{"run":"scaling","bind":"core"}' \
    mpi2 --bind-to core "$bench_bin" --threads 1 $steps --json || status=1
  run_one "rep $rep tutti 2x1 bind none" '{"run":"scaling","bind":"none"}' \
    mpi2 --bind-to none "$bench_bin" --threads 1 $steps --json || status=1
  for s in blas omp; do
    run_one "rep $rep pytorch 1x2 $s" '{"run":"scaling","config":"1x2"}' \
      "$python" "$here/torch_peer.py" --workload W2 --threads 2 --setting "$s" $steps --json || status=1
  done
  run_one "rep $rep pytorch ddp 2x1" '{"run":"scaling"}' "$python" "$here/torch_ddp_peer.py" --ranks 2 $steps --json || status=1
  if ((variants)); then
    run_one "rep $rep tutti 1x2 OMP_WAIT_POLICY=PASSIVE" '{"run":"variant","variant":"1x2, OMP_WAIT_POLICY=PASSIVE"}' \
      env OMP_WAIT_POLICY=PASSIVE "$bench_bin" --threads 2 $steps --json || status=1
    for z in 1 2; do
      run_one "rep $rep tutti 2x1 zero $z" "{\"run\":\"variant\",\"variant\":\"2x1 --bind-to core, --zero $z\"}" \
        mpi2 --bind-to core "$bench_bin" --threads 1 --zero "$z" $steps --json || status=1
    done
    for us in 50 500; do
      run_one "rep $rep tutti 2x1 poll $us us" "{\"run\":\"variant\",\"variant\":\"2x1 --bind-to core, TUTTI_COMM_POLL_US=$us\"}" \
        mpi2 --bind-to core -x TUTTI_COMM_POLL_US="$us" "$bench_bin" --threads 1 $steps --json || status=1
    done
  fi
done

# The overlap sweep uses the binding whose 2-rank median was better.
bind="$("$python" - "$raw" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = {b: statistics.median(r["tok_s_median"] for r in runs if r["impl"] == "tutti" and r.get("bind") == b)
       for b in ("core", "none") if any(r["impl"] == "tutti" and r.get("bind") == b for r in runs)}
print(max(med, key=med.get) if med else "core")
EOF
)"
echo "  overlap sweep with --bind-to $bind" >&2
for rep in $(seq 1 "$sweep_reps"); do
  for mib in $bucket_sizes; do
    run_one "rep $rep tutti 2x1 bucket $mib MiB" "{\"run\":\"overlap\",\"bind\":\"$bind\"}" \
      mpi2 --bind-to "$bind" "$bench_bin" --threads 1 --bucket-mib "$mib" $steps --json || status=1
  done
done

# ---- the tables ----------------------------------------------------------------------------------
"$python" - "$raw" "$discarded" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
noisy = [r for r in runs if r.get("foreign_cores", 0) > 0.15]
print(f"Interference: {sys.argv[2]} run(s) discarded and repeated because other processes used more than 0.15 "
      f"core meanwhile; {len(noisy)} kept after 3 attempts "
      f"(other processes' use per kept run: median {statistics.median(r.get('foreign_cores', 0) for r in runs):.2f}, "
      f"max {max(r.get('foreign_cores', 0) for r in runs):.2f} cores).")
print()
scaling = [r for r in runs if r["run"] == "scaling"]
overlap = [r for r in runs if r["run"] == "overlap"]

def summary(rs, key="tok_s_median"):  # median over runs of each run's median; best over runs' bests
    return statistics.median(r[key] for r in rs), max(r["tok_s_best"] for r in rs)

def med(rs, key):
    return statistics.median(r[key] for r in rs)

def pick(impl, config, bind=None, setting=None):
    return [r for r in scaling if r["impl"] == impl and r["config"] == config
            and (bind is None or r.get("bind") == bind) and (setting is None or r.get("setting") == setting)]

t12 = [r for r in pick("tutti", "1x2") if r.get("variant") != "plain"]
t12plain = [r for r in pick("tutti", "1x2") if r.get("variant") == "plain"]
t21 = {b: pick("tutti", "2x1", bind=b) for b in ("core", "none")}
t21 = {b: rs for b, rs in t21.items() if rs}
p12 = {s: pick("pytorch", "1x2", setting=s) for s in ("blas", "omp")}
p12 = {s: rs for s, rs in p12.items() if rs}
ddp = pick("pytorch-ddp", "2x1")
best_bind = max(t21, key=lambda b: summary(t21[b])[0]) if t21 else None
best_setting = max(p12, key=lambda s: summary(p12[s])[0]) if p12 else None

def cell(rs):
    if not rs:
        return "failed", None
    m, b = summary(rs)
    return f"{m:,.0f} / {b:,.0f}", (m, b)

print("### Throughput (W2, global batch 8 sequences = 2,048 tokens per step)")
print()
print("| config | tutti tok/s median / best | PyTorch tok/s median / best | ratio median / best |")
print("|---|---:|---:|---:|")
peer_note = (f" ({best_setting}; " + ", ".join(f"{s} {summary(rs)[0]:,.0f}" for s, rs in p12.items()
                                              if s != best_setting) + ")") if best_setting else ""
rows = [("1 rank x 2 threads (tutti: DataParallel in a world of one, as `tutti train`)", t12,
         p12.get(best_setting, []), peer_note)]
if t12plain:
    rows.append(("1 rank x 2 threads (tutti: no DataParallel, `train_bench`)", t12plain, p12.get(best_setting, []), peer_note))
rows.append((f"2 ranks x 1 thread (tutti --bind-to {best_bind}; PyTorch DDP gloo)", t21.get(best_bind, []), ddp, ""))
for name, mine, peer, note in rows:
    a, av = cell(mine)
    b, bv = cell(peer)
    ratio = f"{av[0] / bv[0]:.2f} / {av[1] / bv[1]:.2f}" if av and bv else "-"
    print(f"| {name} | {a} | {b}{note} | {ratio} |")
print()
if t12 and best_bind:
    two = summary(t21[best_bind])
    line = f"Scaling efficiency, 2 x 1 over 1 x 2 (median tok/s): tutti {two[0] / summary(t12)[0]:.2f}"
    if t12plain:
        line += f" (over the run without DataParallel: {two[0] / summary(t12plain)[0]:.2f})"
    if ddp and best_setting:
        line += f"; PyTorch (DDP over its best 1 x 2) {summary(ddp)[0] / summary(p12[best_setting])[0]:.2f}"
    print(line + ".")
    print()
    def verdict(name, other):
        r = two[0] / summary(other)[0]
        return f"{name}: {'met' if r >= 1 else 'NOT met'} ({r:.2f}x by median, {two[1] / summary(other)[1]:.2f}x by best)"
    bars = [verdict("tutti 2 x 1 >= tutti 1 x 2", t12)]
    if t12plain:
        bars.append(verdict("(>= 1 x 2 without DataParallel", t12plain) + ")")
    if ddp:
        bars.append(verdict("tutti 2 x 1 >= PyTorch DDP 2 x 1", ddp))
    print("Bars: " + "; ".join(bars) + ".")
    print()

print("### tutti 2 x 1: Open MPI's binding, and where the step goes (medians over runs, ms)")
print()
print("| tutti config | cpus per rank | tok/s median / best | step | forward | backward | exposed (last rank / max) | end_sync | update |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
if t12plain:
    rs = t12plain
    print(f"| 1x2 train_bench (no DataParallel) | 0-1 | {cell(rs)[0]} | {med(rs, 'step_ms_median'):.0f} "
          f"| {med(rs, 'forward_ms_median'):.0f} | {med(rs, 'backward_ms_median'):.0f} | - | - | {med(rs, 'update_ms_median'):.0f} |")
for name, rs in [("1x2", t12)] + [(f"2x1 --bind-to {b}", t21[b]) for b in t21]:
    if not rs:
        continue
    cpus = "; ".join(p["cpus"] for p in rs[0]["per_rank"])
    print(f"| {name} | {cpus} | {cell(rs)[0]} | {med(rs, 'step_ms_median'):.0f} | {med(rs, 'forward_ms_median'):.0f} "
          f"| {med(rs, 'backward_ms_median'):.0f} | {med(rs, 'exposed_ms_median'):.1f} / {med(rs, 'exposed_max_ms_median'):.1f} "
          f"| {med(rs, 'end_sync_ms_median'):.0f} | {med(rs, 'update_ms_median'):.0f} |")
if ddp:
    print(f"| (PyTorch DDP 2x1) | - | {cell(ddp)[0]} | {med(ddp, 'step_ms_median'):.0f} | - "
          f"| {med(ddp, 'backward_ms_median'):.0f} (sync included) | - | - | - |")
print()
print("forward, backward, end_sync, update: max over ranks per step; train_bench's update is AdamW + reading the loss, "
      "dp_bench's adds the mean loss over ranks; the step is their sum plus the batch.")
print()

variants = [r for r in runs if r["run"] == "variant"]
if variants:
    print("### tutti variants (same repetitions; compare with the rows above)")
    print()
    print("| variant | tok/s median / best | step | forward | backward | exposed (last rank / max) | end_sync | update "
          "| pure comm ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = [("1x2 (default)", t12), ("2x1 --bind-to core, --zero 0, TUTTI_COMM_POLL_US default (5)", t21.get("core", []))]
    for name, rs in base + [(v, [r for r in variants if r["variant"] == v]) for v in dict.fromkeys(r["variant"] for r in variants)]:
        if rs:
            print(f"| {name} | {cell(rs)[0]} | {med(rs, 'step_ms_median'):.0f} | {med(rs, 'forward_ms_median'):.0f} "
                  f"| {med(rs, 'backward_ms_median'):.0f} | {med(rs, 'exposed_ms_median'):.1f} / {med(rs, 'exposed_max_ms_median'):.1f} "
                  f"| {med(rs, 'end_sync_ms_median'):.0f} | {med(rs, 'update_ms_median'):.0f} | {med(rs, 'comm_ms_median'):.1f} |")
    print()

if overlap:
    print(f"### Overlap of gradient communication with backward (tutti 2 x 1, --bind-to {overlap[0]['bind']})")
    print()
    print("| bucket MiB | buckets | backward ms | exposed ms (last rank / max) | pure comm ms median / best "
          "| hidden fraction | tok/s median |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for mib in sorted({r["bucket_mib"] for r in overlap}):
        rs = [r for r in overlap if r["bucket_mib"] == mib]
        comm = med(rs, "comm_ms_median")
        exposed = med(rs, "exposed_ms_median")
        hidden = max(0.0, 1 - exposed / comm) if comm > 0 else 0.0
        print(f"| {mib:g} | {rs[0]['num_buckets']} | {med(rs, 'backward_ms_median'):.0f} "
              f"| {exposed:.1f} / {med(rs, 'exposed_max_ms_median'):.1f} | {comm:.1f} / {min(r['comm_ms_best'] for r in rs):.1f} "
              f"| {100 * hidden:.0f}% | {med(rs, 'tok_s_median'):,.0f} |")
    print()
    print("exposed: what end_sync waits after backward ended, median over steps; \"last rank\" is the rank that "
          "finished backward last (the minimum over ranks), \"max\" adds the other rank's wait for it. pure comm: "
          "the same buckets reduced back to back with no compute (slowest rank). hidden = 1 - exposed / pure comm, "
          "from the medians over runs.")
EOF
exit "$status"
