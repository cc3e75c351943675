#!/usr/bin/env bash
# Configures linquant from SOURCE_DIR with LINQUANT_CUDA=0 against PYTHON's torch, with GENERATOR
# (the main build's), in a temporary directory: a CPU-only library must configure whatever torch
# is (a CUDA build of torch makes its own CMake look for the toolkit, which once stopped this
# configuration). Configuring is the step that broke; building the CPU library again would add
# minutes for nothing new.
set -euo pipefail
source_dir=$1
python=$2
generator=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! log=$(cmake -S "$source_dir" -B "$work" -G "$generator" -DLINQUANT_CUDA=0 -DPython3_EXECUTABLE="$python" 2>&1); then
  echo "$log"
  echo "configuring with LINQUANT_CUDA=0 failed"
  exit 1
fi
if ! grep -q "CUDA kernels: OFF" <<<"$log"; then
  echo "$log"
  echo "expected 'CUDA kernels: OFF' with LINQUANT_CUDA=0"
  exit 1
fi
