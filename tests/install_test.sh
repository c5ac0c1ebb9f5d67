#!/usr/bin/env bash
# tutti as a library from another CMake project: install the build into a temporary prefix, then
# configure, build and run examples/mlp_classifier as an outside project with find_package(tutti).
set -euo pipefail
build_dir=$1
source_dir=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
mkdir -p "$work/project"
cp "$source_dir/examples/mlp_classifier/main.cpp" "$work/project/"
cat >"$work/project/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(my_model CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(tutti REQUIRED)
add_executable(my_model main.cpp)
target_link_libraries(my_model PRIVATE tutti::tutti)
CMAKE
cmake -S "$work/project" -B "$work/project/build" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/project/build" >/dev/null
"$work/project/build/my_model" --threads 2
