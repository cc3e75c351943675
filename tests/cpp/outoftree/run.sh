#!/usr/bin/env bash
# Installs linquant from BUILD_DIR into a temporary prefix, then configures, builds and runs the
# consumer project against it with find_package(linquant).
set -euo pipefail
build_dir=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
torch_prefix=$(python3 -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake -S "$here" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix;$torch_prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/build" -j "$(nproc)" >/dev/null
"$work/build/consumer"
