#!/usr/bin/env bash
# Model parallelism (pipeline and tensor parallelism) with `tutti train` at a fixed global batch of
# 8 sequences, on W2 (6 layers, 6 heads, dim 384, context 256) and L12 (12 layers, 12 heads, dim
# 768, context 256: GPT-2 small's width): one process (also accumulating M micro-batches), tp 2 / 4,
# pp 2 / 4 under GPipe and 1F1B at the same M micro-batches, dp 2 x pp 2 and (W2) dp 2 x tp 2;
# interleaved and repeated.
# Prints markdown for bench/RESULTS.md, headed by the machine, the date, the commit and this
# command. Builds nothing.
#
#   bench/mp_run.sh [BUILD_DIR] [--reps N] [--l12-reps N] [--steps N] [--l12-steps N]
#                   [--models "W2 W2h12 L12"] [--micro-batches M] [--quick] [--keep]

# BUILD_DIR (default build/) must hold the CLI, tutti (built with the MPI backend). Threads per
# rank: 1 rank x 2 threads, 2 ranks x 1 thread, 4 ranks x 1 thread (oversubscribed 2x on a 2-core
# machine; the table says so). W2 has 6 heads and the byte vocabulary 256, so tp must divide both:
# tp 2 only (tp 3 does not divide 256, tp 4 not 6); tp 4 runs on W2h12 = W2 with 12 heads (head
# size 32), beside its own one-process baseline. tok/s is batch x context / the median step time
# from the run's metrics.jsonl ("ms"), step 1 (warm-up) excluded; a cell is the median over
# repetitions. Logs and metrics stay in a /tmp/tutti-mp-bench.* folder (checkpoints are deleted
# unless --keep).
#
# --quick: one repetition of 3 steps without waiting for a quiet machine, a functional check, not
# a measurement (--models tiny: a 4-layer, dim-64 model, to check the script itself in seconds).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
command_line="bench/mp_run.sh $*"

build="build"
reps=3
l12_reps=1
steps=6
l12_steps=5
models="W2 W2h12 L12"
micro=8
quick=0
keep=0
while (($#)); do
  case "$1" in
    --reps) reps="$2"; shift ;;
    --l12-reps) l12_reps="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --l12-steps) l12_steps="$2"; shift ;;
    --models) models="$2"; shift ;;
    --micro-batches) micro="$2"; shift ;;
    --quick) quick=1 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "mp_run.sh: unknown option $1" >&2; exit 2 ;;
    *) build="$1" ;;
  esac
  shift
done

bin="$build/tutti"
[[ "$bin" = /* ]] || bin="$PWD/$bin"
python="${TUTTI_BENCH_PYTHON:-/usr/bin/python3}"
[[ -x "$bin" ]] || { echo "mp_run.sh: $bin not found; build it first: cmake --build $build --target tutti_cli" >&2; exit 1; }
command -v mpirun > /dev/null || { echo "mp_run.sh: mpirun not found (apt-get install openmpi-bin)" >&2; exit 1; }
if [[ "$(id -u)" == 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
data="$repo/data/tinyshakespeare.txt"
if ((quick)); then reps=1; l12_reps=1; steps=3; l12_steps=3; fi

work="$(mktemp -d /tmp/tutti-mp-bench.XXXXXX)"
index="$work/runs.tsv"
: > "$index"

model_args() {
  case "$1" in
    W2) echo "--layers 6 --heads 6 --dim 384 --context 256 --batch 8" ;;
    W2h12) echo "--layers 6 --heads 12 --dim 384 --context 256 --batch 8" ;;
    L12) echo "--layers 12 --heads 12 --dim 768 --context 256 --batch 8" ;;
    tiny) echo "--layers 4 --heads 4 --dim 64 --context 32 --batch 8" ;;  # for checking this script
    *) echo "mp_run.sh: unknown model $1" >&2; exit 2 ;;
  esac
}

# Layouts per model: "name|ranks|threads per rank|tutti flags" (dp 2 x pp 2 has 4 sequences per
# replica, hence at most 4 micro-batches).
layouts() {
  local m="$micro" m2=$((micro < 4 ? micro : 4))
  case "$1" in
    W2h12) printf '%s\n' "1 process|1|2|" "tp 4|4|1|--tp 4" ;;
    *)
      printf '%s\n' "1 process|1|2|" "1 process, m $m (accumulation)|1|2|--micro-batches $m"
      printf '%s\n' "tp 2|2|1|--tp 2"
      [[ "$1" == L12 ]] && printf '%s\n' "tp 4|4|1|--tp 4"
      for p in 2 4; do
        for s in gpipe 1f1b; do
          printf '%s\n' "pp $p, $s, m $m|$p|1|--pp $p --schedule $s --micro-batches $m"
        done
      done
      printf '%s\n' "dp 2 x pp 2, 1f1b, m $m2|4|1|--dp 2 --pp 2 --schedule 1f1b --micro-batches $m2"
      [[ "$1" == L12 ]] || printf '%s\n' "dp 2 x tp 2|4|1|--dp 2 --tp 2"  # L12: time
      ;;
  esac
}

source "$here/quiet_lib.sh"  # interference accounting

# ---- header --------------------------------------------------------------------------------------
echo "## Model parallelism (pp, tp) on W2 and L12"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- tutti: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD -- src include 2>/dev/null || echo ' (+ local changes in src/ or include/)'), $bin; $(mpirun --version 2>/dev/null | head -1)"
threads_env="$(env | grep -E '^(OMP|OPENBLAS|MKL|GOMP|TUTTI)_' | tr '\n' ' ' || true)"
echo "- environment: ${threads_env:-no OMP_, GOMP_, OPENBLAS_, MKL_ or TUTTI_ variables set}"
echo "- command: \`$command_line\`$( ((quick)) && echo '  (QUICK: functional check, not a measurement)')"
echo "- method: \`tutti train <model> <layout> --steps S --warmup 0 --eval-interval 1000 --eval-batches 1"
echo "  --sample-tokens 0 --checkpoint-interval 100000 --log-interval 1\`, each run in a fresh --out;"
echo "  ranks through \`mpirun --oversubscribe --bind-to none\`; W2 and W2h12: $reps repetition(s) of $steps steps,"
echo "  L12: $l12_reps repetition(s) of $l12_steps steps, every layout once per repetition in turn; logs: $work"
echo

# ---- runs ----------------------------------------------------------------------------------------
status=0
run_one() {  # model, rep, steps, layout line
  local model="$1" rep="$2" nsteps="$3" name ranks threads flags tag out log b0 c0 t0 t1 rc foreign
  IFS='|' read -r name ranks threads flags <<< "$4"
  tag="$(printf '%s-%s-%s' "$model" "$rep" "$name" | tr -c 'A-Za-z0-9\n-' '_')"
  out="$work/$tag.out"; log="$work/$tag.log"
  local margs fargs
  read -ra margs <<< "$(model_args "$model")"
  read -ra fargs <<< "$flags"
  local cmd=("$bin" train "${margs[@]}" "${fargs[@]}" --threads "$threads" --steps "$nsteps" --warmup 0
             --eval-interval 1000 --eval-batches 1 --sample-tokens 0 --checkpoint-interval 100000
             --log-interval 1 --data "$data" --out "$out")
  if ((ranks > 1)); then cmd=(mpirun -np "$ranks" --oversubscribe --bind-to none "${cmd[@]}"); fi
  ((quick)) || wait_quiet
  b0="$(cpu_busy)"; c0="$(child_cpu)"; t0="$(date +%s.%N)"
  rc=0
  printf '$ %s\n' "${cmd[*]}" > "$log"
  timeout 300 "${cmd[@]}" < /dev/null >> "$log" 2>&1 || rc=$?  # mpirun would eat the layout list
  t1="$(date +%s.%N)"
  foreign="$(other_cores "$b0" "$c0" "$t0" "$t1")"
  [[ -f "$out/metrics.jsonl" ]] && cp "$out/metrics.jsonl" "$work/$tag.metrics.jsonl"
  ((keep)) || rm -rf "$out"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$model" "$name" "$rep" "$ranks" "$threads" "$rc" "$tag" "$foreign" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" >> "$index"
  if ((rc != 0)); then
    echo "mp_run.sh: $model $name (rep $rep) failed with exit code $rc$( ((rc == 124)) && echo ' (timed out after 300 s)'):" >&2
    tail -5 "$log" >&2
    status=1
  else
    printf '  %-6s %-34s rep %s: %s  (others used %s cores)\n' "$model" "$name" "$rep" "$(grep '^done:' "$log" | tail -1)" "$foreign" >&2
  fi
}

max_reps=$((reps > l12_reps ? reps : l12_reps))
for rep in $(seq 1 "$max_reps"); do
  for model in $models; do
    if [[ "$model" == L12 ]]; then n="$l12_steps"; ((rep <= l12_reps)) || continue
    else n="$steps"; ((rep <= reps)) || continue; fi
    while IFS= read -r layout; do
      run_one "$model" "$rep" "$n" "$layout"
    done < <(layouts "$model")
  done
done
echo >&2

# ---- the table -----------------------------------------------------------------------------------
"$python" - "$work" "$models" "$(nproc)" <<'EOF'
import json, re, statistics, sys
work, models, cores = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
rows = [line.rstrip("\n").split("\t") for line in open(f"{work}/runs.tsv") if line.strip()]
num = r"([0-9.]+)"

def parse(model, name, rep, ranks, threads, rc, tag, foreign, wall):
    log = open(f"{work}/{tag}.log", errors="replace").read()
    r = {"model": model, "name": name, "ranks": int(ranks), "threads": int(threads), "rc": int(rc),
         "foreign": float(foreign), "wall": float(wall), "log": f"{work}/{tag}.log"}
    if m := re.search(r"tutti train: (\d+) parameters", log):
        r["params"] = int(m.group(1))
    if m := re.search(r"(\d+) tokens/step", log):
        r["tokens"] = int(m.group(1))
    if m := re.search(r"rank 0: parameters " + num + r" MiB, gradients " + num + r" MiB, optimizer state " + num, log):
        r["p0"] = float(m.group(1))
    if m := re.search(r"peak tensor memory(?: per rank)?:((?: [0-9.]+ MiB)+)", log):
        r["peaks"] = [float(x) for x in re.findall(num + " MiB", m.group(1))]
    if m := re.search(r"pipeline bubble \(stage 0, median of \d+ steps\): " + num + r"% measured, " + num + "% predicted", log):
        r["bubble"] = (float(m.group(1)), float(m.group(2)))
    if m := re.search(r"^done: (\d+) steps, train loss ([0-9.naif-]+), val loss ([0-9.naif-]+), (\d+) tok/s", log, re.M):
        r["done_steps"], r["done_tok_s"] = int(m.group(1)), int(m.group(4))
        r["losses"] = (float(m.group(2)), float(m.group(3)))
    try:
        ms = [(j["step"], j["ms"]) for j in map(json.loads, open(f"{work}/{tag}.metrics.jsonl")) if "loss" in j]
        later = [t for s, t in ms if s > 1]
        if later and "tokens" in r:
            r["step_ms"] = statistics.median(later)
            r["tok_s"] = r["tokens"] / (r["step_ms"] / 1e3)
            r["step1_ms"] = next((t for s, t in ms if s == 1), None)
    except FileNotFoundError:
        pass
    r["complete"] = r["rc"] == 0 and "tok_s" in r and "done_tok_s" in r and \
        (r["ranks"] == 1 or ("peaks" in r and len(r["peaks"]) == r["ranks"])) and \
        (" pp " not in f" {name}" or "bubble" in r)
    return r

runs = [parse(*row) for row in rows]
bad = [r for r in runs if not r["complete"]]

print("| model | layout | ranks x threads | tok/s median (min-max) | step ms median | step 1 ms | rank 0 parameters MiB "
      "| peak tensor MiB, max over ranks (per rank) | bubble measured / predicted |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for model in models:
    names = list(dict.fromkeys(r["name"] for r in runs if r["model"] == model))
    base = None
    for name in names:
        rs = [r for r in runs if r["model"] == model and r["name"] == name]
        ok = [r for r in rs if "tok_s" in r]
        ranks, threads = rs[0]["ranks"], rs[0]["threads"]
        over = ranks * threads / cores
        rt = f"{ranks} x {threads}" + (f" ({over:g}x oversubscribed)" if over > 1 else "")
        if not ok:
            print(f"| {model} | {name} | {rt} | failed | | | | | |")
            continue
        tok = statistics.median(r["tok_s"] for r in ok)
        if base is None and name == "1 process":
            base = tok
        ratio = f" = {tok / base:.2f}x" if base and name != "1 process" else ""
        spread = f" ({min(r['tok_s'] for r in ok):,.0f}-{max(r['tok_s'] for r in ok):,.0f})" if len(ok) > 1 else ""
        step = statistics.median(r["step_ms"] for r in ok)
        step1 = statistics.median(r["step1_ms"] for r in ok if r.get("step1_ms") is not None)
        r0 = ok[0]
        if "p0" in r0:
            p0 = f"{r0['p0']:.1f}"
        elif "params" in r0:
            p0 = f"{r0['params'] * 4 / 2**20:.1f} (all)"
        else:
            p0 = "-"
        peaks = [r["peaks"] for r in ok if "peaks" in r]
        if peaks:
            per = [statistics.median(p[i] for p in peaks) for i in range(len(peaks[0]))]
            peak = f"{max(per):,.0f} ({' / '.join(f'{x:,.0f}' for x in per)})"
        else:
            peak = "not printed (1 rank)"
        bub = [r["bubble"] for r in ok if "bubble" in r]
        bubble = f"{statistics.median(b[0] for b in bub):.1f}% / {bub[0][1]:.1f}%" if bub else "-"
        print(f"| {model} | {name} | {rt} | {tok:,.0f}{ratio}{spread} | {step:,.0f} | {step1:,.0f} | {p0} | {peak} | {bubble} |")
print()
print("tok/s = tokens per step (batch x context) / the median step time of a run (metrics.jsonl, steps 2 onwards, rank 0's clock), "
      "median over repetitions (min-max over them), and as a multiple of the model's one-process run. "
      "`tutti train` prints rank 0's parameter MiB only with more than one rank or micro-batch "
      "(the parameter MiB of a one-process run is computed from its parameter count); the bubble is stage 0's, "
      "median over the run's steps.")
agree = []
for model in models:
    ls = [(r["name"], r["losses"]) for r in runs if r["model"] == model and "losses" in r]
    if ls:
        spread = max(max(abs(a[0] - ls[0][1][0]), abs(a[1] - ls[0][1][1])) for _, a in ls)
        agree.append(f"{model}: train / val loss after the last step {ls[0][1][0]:.4f} / {ls[0][1][1]:.4f} "
                     f"in every layout and repetition (largest difference {spread:.1e})" if spread < 1e-3 else
                     f"{model}: losses DIFFER between layouts: " + ", ".join(f"{n} {a[0]:.4f}/{a[1]:.4f}" for n, a in ls))
print()
print("Same computation: " + "; ".join(agree) + ".")
noisy = [r for r in runs if r["foreign"] > 0.15]
print()
print(f"Interference: other processes used a median of {statistics.median(r['foreign'] for r in runs):.2f} and at most "
      f"{max(r['foreign'] for r in runs):.2f} cores during a run; {len(noisy)} of {len(runs)} runs above 0.15"
      + (": " + "; ".join(f"{r['model']} {r['name']} ({r['foreign']:.2f})" for r in noisy) if noisy else "") + ".")
if bad:
    print()
    print("Failed or incomplete runs (exit code, missing lines): " + "; ".join(
        f"{r['model']} {r['name']}: rc {r['rc']}, log {r['log']}" for r in bad))
EOF
exit "$status"
