#!/usr/bin/env bash
# Installs linquant from BUILD_DIR into a temporary prefix, then configures, builds and runs the
# consumer project against it with find_package(linquant).
set -euo pipefail
build_dir=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
# Only linquant's prefix: its package config finds the torch it was built against. --as-needed,
# as some toolchains pass by default, would drop a library whose symbols go unused.
cmake -S "$here" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed >/dev/null
cmake --build "$work/build" -j "$(nproc)" >/dev/null
"$work/build/consumer"
"$work/build/consumer_ops_only"
