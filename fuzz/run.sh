#!/usr/bin/env bash
# Builds the checkpoint-parser fuzz targets with clang's libFuzzer and AddressSanitizer and runs
# each for a bounded time; exits non-zero on any crash, sanitizer report or unexpected exception.
#
#   fuzz/run.sh [SECONDS]        # per target, default 20
#
# The targets compile src/ckpt/safetensors.cpp and src/ckpt/manifest.cpp directly with a host-only
# Tensor (fuzz/host_tensor.cpp), not the whole library. Builds and the working corpus go to
# $FUZZ_BUILD_DIR (default build-fuzz/); fuzz/corpus/<target>/ holds the seeds and is only read.
# Crash inputs are left as $FUZZ_BUILD_DIR/crash-*. Exits 77 (a CTest skip) without clang++ or
# libFuzzer (Debian: clang-14 libclang-rt-14-dev) or libxxhash-dev.
set -euo pipefail
seconds="${1:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${FUZZ_BUILD_DIR:-$root/build-fuzz}"
cxx="${FUZZ_CXX:-clang++}"
mkdir -p "$out"

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "fuzz: $cxx not found; install clang-14 and libclang-rt-14-dev (skipped)"; exit 77
fi
probe="$out/probe.cpp"
printf '#include <cstddef>\n#include <cstdint>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n' >"$probe"
if ! "$cxx" -fsanitize=fuzzer,address "$probe" -o "$out/probe" 2>/dev/null; then
  echo "fuzz: $cxx cannot link -fsanitize=fuzzer,address; install libclang-rt-14-dev (skipped)"; exit 77
fi
if [ ! -f /usr/include/xxhash.h ]; then echo "fuzz: xxhash.h not found; install libxxhash-dev (skipped)"; exit 77; fi

flags=(-std=c++20 -g -O1 -fno-omit-frame-pointer -I"$root/include" -I"$root/src")
sanitize=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
# Rebuilds an object only when its source or any header under include/ is newer.
compile() {  # source object
  if [ ! -f "$2" ] || [ -n "$(find "$1" "$root/include" -newer "$2" -print -quit)" ]; then
    echo "fuzz: compiling ${1#$root/}"
    "$cxx" "${flags[@]}" "${sanitize[@]}" -fsanitize=fuzzer-no-link -c "$1" -o "$2"
  fi
}
common=()
pids=()
for src in src/ckpt/safetensors.cpp src/ckpt/manifest.cpp fuzz/host_tensor.cpp; do
  obj="$out/$(basename "${src%.cpp}").o"
  compile "$root/$src" "$obj" &
  pids+=($!)
  common+=("$obj")
done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed compile fails the script
status=0
for target in safetensors manifest; do
  obj="$out/${target}_fuzz.o"
  compile "$root/fuzz/${target}_fuzz.cpp" "$obj"
  "$cxx" "${sanitize[@]}" -fsanitize=fuzzer "$obj" "${common[@]}" -lxxhash -o "$out/${target}_fuzz"
  work="$out/corpus_$target"
  mkdir -p "$work"
  echo "fuzz: running ${target}_fuzz for ${seconds}s"
  if ! (cd "$out" && TMPDIR="$out" "./${target}_fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -max_len=4096 -print_final_stats=1 -artifact_prefix="$out/${target}-" "$work" "$root/fuzz/corpus/$target" \
        >"$out/${target}.log" 2>&1); then
    echo "fuzz: ${target}_fuzz FAILED; the report:"; tail -n 40 "$out/${target}.log"; status=1
  else
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$out/${target}.log" | sed "s/^/fuzz: ${target}: /"
  fi
done
exit $status
