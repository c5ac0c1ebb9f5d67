#!/usr/bin/env bash
# Data parallelism across two hosts, for real: two network namespaces joined by a bridge, Open MPI
# over TCP between them (scripts/netns_cluster.sh, scripts/mpirun_hosts.sh, docs/multihost.md).
#
#   tests/multihost_test.sh TUTTI_BINARY
#
# Trains a tiny GPT for a few steps as one process, then with dp=2 as one rank on each of two hosts,
# and requires every step's loss (and the evaluation losses) to agree within 1e-5 relative.
# Exit 77 (CTest's SKIP_RETURN_CODE) when this machine cannot host namespaces: not root, no `ip`,
# namespaces not permitted, no mpirun. The hosts are destroyed on every way out.
set -euo pipefail

tutti=${1:?usage: multihost_test.sh TUTTI_BINARY}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster="$root/scripts/netns_cluster.sh"
TOLERANCE=1e-5
RUN_TIMEOUT=240  # seconds per training run; with the lock wait, well below the CTest TIMEOUT (700)

skip() { echo "SKIP: multihost test: $*"; exit 77; }
fail() { echo "FAIL: multihost test: $*" >&2; exit 1; }

# ---- can this machine do it? ------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root to create network namespaces (uid $(id -u)); CI runs it as root"
command -v ip >/dev/null || skip "'ip' (iproute2) not installed"
command -v mpirun >/dev/null || skip "'mpirun' (Open MPI) not installed"
[ -x "$tutti" ] || fail "no tutti binary at '$tutti'"
check_rc=0
check_out=$("$cluster" check 2>&1) || check_rc=$?
[ "$check_rc" = 77 ] && skip "$check_out"
[ "$check_rc" = 0 ] || fail "$check_out"

# One run at a time per machine: the host names and the subnet are fixed, and a second test would
# tear down the hosts under the first.
lock_dir=/run/lock
[ -w "$lock_dir" ] || lock_dir=${TMPDIR:-/tmp}
exec 9>"$lock_dir/tutti-netns-cluster.lock"
flock -w 60 9 || fail "another multihost test holds $lock_dir/tutti-netns-cluster.lock"

work=$(mktemp -d "${TMPDIR:-/tmp}/tutti-multihost.XXXXXX")
child=""
cleanup() {
  local rc=$?
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
  "$cluster" destroy >/dev/null 2>&1 || "$cluster" destroy || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

"$cluster" destroy >/dev/null  # leftovers of a killed run
"$cluster" create 2

# CMD... under `timeout`, in the background: bash runs a trap during `wait` at once, but only after a
# foreground child has finished.
bounded() {
  timeout "$RUN_TIMEOUT" "$@" &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  child=""
  return "$rc"
}

# ---- the two runs -----------------------------------------------------------------------------
# A learning rate that moves the weights from the first step (the default warms up over 100 steps,
# where six updates change the loss by only ~3e-4): a gradient that is not the mean over both
# hosts then shows in the losses. --comm-timeout: a lost rank fails the run in a minute, not five.
train_args=(train --data "$root/data/tinyshakespeare.txt" --layers 1 --heads 2 --dim 16 --context 16 --batch 4
  --steps 6 --eval-interval 1000 --eval-batches 1 --sample-tokens 0 --threads 1
  --lr 1e-2 --warmup 0 --decay constant --comm-timeout 60)

echo "== one process"
t0=$(date +%s.%N)
bounded "$tutti" "${train_args[@]}" --out "$work/single" >"$work/single.log" 2>&1 ||
  { cat "$work/single.log"; fail "the single-process run failed"; }
t1=$(date +%s.%N)
echo "== dp=2, one rank on each of two hosts"
bounded "$root/scripts/mpirun_hosts.sh" -np 2 --hosts 2 --timeout "$((RUN_TIMEOUT - 10))" -- \
  "$tutti" "${train_args[@]}" --dp 2 --out "$work/dp2" >"$work/dp2.log" 2>&1 ||
  { cat "$work/dp2.log"; fail "the dp=2 run across two hosts failed"; }
t2=$(date +%s.%N)
grep '^mpirun_hosts: rank' "$work/dp2.log"
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "time: one process %.1fs, dp=2 on two hosts %.1fs\n", b - a, c - b }'

# ---- compare ----------------------------------------------------------------------------------
# metrics.jsonl has one {"step":N,"loss":L,"grad_norm":G,...} line per training step and
# {"step":N,"train_loss":..,"val_loss":..} lines at evaluations. Losses are printed with 9 digits and
# compared within $TOLERANCE; grad_norm (the norm of the all-reduced gradient, which Adam's scale
# invariance would otherwise hide a sum-instead-of-mean from) has 6 digits, so 1e-4.
# awk, not python or jq: CI images need not have them.
compare() {
  awk -v tol="$TOLERANCE" -v steps=6 '
    function field(line, key,   i, rest) {
      i = index(line, "\"" key "\":")
      if (i == 0) return ""
      rest = substr(line, i + length(key) + 3)
      sub(/[,}].*/, "", rest)
      return rest
    }
    function record(run, line,   step, k, keys, n) {
      step = field(line, "step")
      n = split("loss grad_norm train_loss val_loss", keys, " ")
      for (k = 1; k <= n; k++) {
        v = field(line, keys[k])
        if (v == "") continue
        id = keys[k] "@" step
        if ((run, id) in val) dup[run] = dup[run] " " id
        val[run, id] = v
        if (run == 1 && !(id in seen)) { seen[id] = 1; order[++count] = id }
      }
    }
    { record(FILENAME == ARGV[1] ? 1 : 2, $0) }
    END {
      if (dup[2] != "") { print "FAIL: dp=2 metrics repeat" dup[2] " (two independent processes, not one dp=2 run?)"; exit 1 }
      for (s = 1; s <= steps; s++)
        if (!((1, "loss@" s) in val)) { print "FAIL: no loss for step " s " in the single-process run"; exit 1 }
      bad = 0
      printf "%-16s %-20s %-20s %s\n", "metric@step", "one process", "dp=2, 2 hosts", "relative diff"
      for (i = 1; i <= count; i++) {
        id = order[i]
        if (!((2, id) in val)) { printf "%-16s %-20s %-20s MISSING\n", id, val[1, id], "-"; bad = 1; continue }
        x = val[1, id] + 0; y = val[2, id] + 0
        d = x - y; if (d < 0) d = -d
        m = x < 0 ? -x : x; n = y < 0 ? -y : y; if (n > m) m = n
        rel = m > 0 ? d / m : d
        t = id ~ /^grad_norm/ ? 1e-4 : tol
        printf "%-16s %-20s %-20s %.3g%s\n", id, val[1, id], val[2, id], rel, rel <= t ? "" : "  > " t
        if (!(rel <= t)) bad = 1
      }
      exit bad
    }' "$work/single/metrics.jsonl" "$work/dp2/metrics.jsonl"
}
[ -f "$work/dp2/metrics.jsonl" ] || { cat "$work/dp2.log"; fail "rank 0 wrote no $work/dp2/metrics.jsonl"; }
if ! compare; then
  echo "--- dp=2 log"; cat "$work/dp2.log"
  fail "dp=2 across two hosts does not reproduce the single process within $TOLERANCE relative"
fi
echo "PASS: dp=2 across two hosts matches the single process at every step within $TOLERANCE relative"
