#!/usr/bin/env bash
# Soak of `tutti launch` (not in CI): the SIGKILL trial of tests/launch_test.cpp over many seeds.
# Each trial kills a random rank of a 2-rank run at a random step and requires the job to finish
# with the weights of the run without faults (bytes) and at most one checkpoint interval recomputed.
#
#   scripts/soak.sh [BUILD_DIR] [TRIALS] [FIRST_SEED]      # defaults: build 10 100
#
# Prints one line per trial (kill -> detected -> resumed) and the min/median/max recovery time.
set -euo pipefail
build=${1:-build}
trials=${2:-10}
seed=${3:-100}
test_bin="$build/tests/launch_test"
[ -x "$test_bin" ] || { echo "soak: no $test_bin (ninja -C $build launch_test)" >&2; exit 1; }
log=$(mktemp /tmp/tutti-soak.XXXXXX)
trap 'rm -f "$log"' EXIT
rc=0
TUTTI_LAUNCH_TRIALS=$trials TUTTI_LAUNCH_SEED=$seed "$test_bin" \
  --gtest_filter='Launch.SigkillOfARandomRankRecoversWithIdenticalWeights' >"$log" 2>&1 || rc=$?
grep -E '^seed ' "$log" || true
grep -E 'Failure|FAILED' "$log" || true
grep -E '^seed ' "$log" | sed -E 's/.*kill -> resumed ([0-9.]+) s/\1/' | sort -n | awk '
  { v[NR] = $1 }
  END {
    if (NR == 0) { print "soak: no trial finished"; exit }
    printf "soak: %d trials, kill -> training resumed: min %.2f s, median %.2f s, max %.2f s\n", NR, v[1], v[int((NR + 1) / 2)], v[NR]
  }'
[ "$rc" = 0 ] && echo "soak: PASS" || echo "soak: FAIL (exit $rc)"
exit "$rc"
