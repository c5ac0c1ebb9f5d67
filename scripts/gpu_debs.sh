#!/usr/bin/env bash
# Fetches (here, on a Debian machine) the library packages that the GPU machine's image lacks into
# .gpu-debs/, to be carried there (device tool: carry [".gpu-debs"]) and unpacked by gpu_build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-debs
cd .gpu-debs
apt-get download libdnnl2 libdnnl-dev ocl-icd-libopencl1 ocl-icd-opencl-dev opencl-c-headers \
  opencl-clhpp-headers libtomlplusplus-dev libtomlplusplus3 libxxhash-dev libxxhash0 libcli11-dev nlohmann-json3-dev libgtest-dev
