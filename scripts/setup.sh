#!/usr/bin/env bash
# Installs what tutti needs to build and test on Debian 12 or Ubuntu 24.04 (apt packages only).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
packages=(
  build-essential cmake ninja-build pkg-config
  libdnnl-dev ocl-icd-opencl-dev opencl-headers   # oneDNN (CPU GEMM); Debian builds it with OpenCL
  libopenblas-dev                                 # only for bench/gemm_bench (oneDNN vs OpenBLAS)
  libtomlplusplus-dev libcli11-dev nlohmann-json3-dev
  libtbb-dev                                      # oneTBB: the workflow's task runtime
  libxxhash-dev clang-14 libclang-rt-14-dev       # checkpoint checksums; libFuzzer + ASan for fuzz/run.sh
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin                      # the mpi communicator backend and mpirun
  iproute2                                        # ip netns: the simulated hosts of tests/multihost_test.sh
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: dependencies present"
