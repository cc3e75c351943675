#!/usr/bin/env bash
# linquant's CPU code on aarch64, without an ARM machine: cross-compiled with Debian's
# aarch64-linux-gnu-g++ against PyPI's aarch64 torch wheel, then run under qemu's user-mode
# emulation with Debian's arm64 Python 3.11: the C++ tests (tests/cpp, one binary) and the Python
# tests of the ops and modules (pytest arguments replace the default selection).
#     bash scripts/aarch64_check.sh [pytest args...]
# Needs root (apt), Debian's package mirrors and PyPI; about 3 GB under LINQUANT_AARCH64_DIR
# (default build/aarch64, git-ignored; kept between runs): the torch wheel links the CUDA
# libraries, so `import torch` needs them even with no GPU. Takes about 15 minutes on 2 cores,
# most of it the emulated tests. Not part of CI (its downloads and emulation would double CI's time).
# Only the plain C++ kernels exist there (LINQUANT_CPU_ISA is baseline); the bf16 kernels'
# tests skip. Emulation checks behaviour, not speed: qemu's timings mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${LINQUANT_AARCH64_DIR:-$ROOT/build/aarch64}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SYSROOT=$DIR/root  # Debian arm64 libraries and Python, where qemu -L looks first
SITE=$DIR/site     # aarch64 wheels: torch and what the tests import
OBJ=$DIR/obj
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

echo "== cross compiler, qemu, GoogleTest sources (apt)"
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null ||
  [ ! -d /usr/src/googletest/googletest ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++-aarch64-linux-gnu qemu-user-static libgtest-dev >/dev/null
fi

if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  echo "== Debian's arm64 Python 3.11 into $SYSROOT"
  dpkg --print-foreign-architectures | grep -qx arm64 || { $sudo dpkg --add-architecture arm64 && $sudo apt-get update -qq; }
  mkdir -p "$DIR/debs" "$SYSROOT"
  (cd "$DIR/debs" && apt-get download -qq $(printf '%s:arm64 ' python3.11 python3.11-minimal libpython3.11-minimal \
    libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 libgomp1 libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 \
    libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libnsl2 libtirpc3 libdb5.3 libcrypt1 \
    libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1))
  for deb in "$DIR"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  # qemu 7.2 passes the host's /proc/cpuinfo and sysfs through, and -L serves these first: torch's
  # cpuinfo wants ARM fields, and oneDNN's xbyak_aarch64 crashes at load without MIDR_EL1. A
  # Neoverse N1's entry, one per host core: only text for those readers, as the features the
  # code sees come from qemu's CPU model (its hwcaps offer SVE too; the kernels use none of them).
  mkdir -p "$SYSROOT/proc"
  : >"$SYSROOT/proc/cpuinfo"
  for ((c = 0; c < $(nproc); c++)); do
    printf '%s\n' "processor	: $c" "BogoMIPS	: 50.00" "Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 \
atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs" "CPU implementer	: 0x41" "CPU architecture: 8" \
      "CPU variant	: 0x3" "CPU part	: 0xd0c" "CPU revision	: 1" "" >>"$SYSROOT/proc/cpuinfo"
    mkdir -p "$SYSROOT/sys/devices/system/cpu/cpu$c/regs/identification"
    echo 0x00000000413fd0c1 >"$SYSROOT/sys/devices/system/cpu/cpu$c/regs/identification/midr_el1"
  done
fi

torch_version=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
transformers_version=$(python3 -c "import transformers; print(transformers.__version__)")
if ! grep -qs "__version__ = '$torch_version" "$SITE/torch/version.py" ||
  ! grep -qs "__version__ = \"$transformers_version\"" "$SITE/transformers/__init__.py"; then
  echo "== aarch64 torch==$torch_version and transformers==$transformers_version (this machine's versions) and"
  echo "   their dependencies from PyPI into $SITE"
  rm -rf "$SITE"
  # pip takes --platform tags literally: every manylinux level up to torch's own is named.
  platforms=(--platform manylinux2014_aarch64)
  for ((v = 17; v <= 28; v++)); do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
  python3 -m pip install -q --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --target "$SITE" --index-url https://pypi.org/simple \
    --only-binary=:all: --python-version 3.11 --implementation cp "${platforms[@]}" \
    "torch==$torch_version" "transformers==$transformers_version" numpy pytest safetensors
fi

# aarch64 Python under qemu, for the tests (and for anyone who wants to try something by hand).
cat >"$DIR/python" <<EOF
#!/bin/sh
exec qemu-aarch64-static -L "$SYSROOT" -E PYTHONPATH="$SITE:$ROOT/python:$ROOT/tests/python" \\
  -E LINQUANT_LIBRARY="$OBJ/liblinquant_ops.so" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$DIR/python"

echo "== cross-compiling the op library and the C++ tests ($(aarch64-linux-gnu-g++ --version | head -1))"
# The sources are CMakeLists.txt's own lists (LINQUANT_SOURCES, LINQUANT_ISA_SOURCES), with its
# flags. CMake itself cannot cross-build here: torch's CMake package, a CUDA build, insists on an
# aarch64 CUDA toolkit.
T=$SITE/torch
G=/usr/src/googletest/googletest
sources_of() { sed -n "/^set($1/,/)/p" CMakeLists.txt | grep -o 'csrc/[a-z_/]*\.cpp'; }
mkdir -p "$OBJ"
FLAGS=(-std=c++20 -O3 -ffp-contract=off -fno-math-errno -fopenmp-simd -Wall -Wextra -fPIC -fopenmp
  -D_GLIBCXX_USE_CXX11_ABI=1 -Icsrc -Icsrc/include -isystem "$T/include"
  -isystem "$T/include/torch/csrc/api/include")
{
  for s in $(sources_of LINQUANT_SOURCES); do echo "-c $s -o $OBJ/$(echo "$s" | tr / _).o"; done
  for s in $(sources_of LINQUANT_ISA_SOURCES); do echo "-DLINQUANT_CPU_ISA=baseline -c $s -o $OBJ/isa_$(echo "$s" | tr / _).o"; done
  echo "-isystem $G/include -I$G -O1 -c $G/src/gtest-all.cc -o $OBJ/gtest/gtest-all.o"
  echo "-isystem $G/include -I$G -O1 -c $G/src/gtest_main.cc -o $OBJ/gtest/gtest_main.o"
  for s in tests/cpp/test_*.cpp; do
    case $s in *_emulated.cpp) continue ;; esac # the CUDA emulation's tests: x86 CI runs them
    echo "-isystem $G/include -O2 -c $s -o $OBJ/tests/$(basename "$s" .cpp).o"
  done
} >"$OBJ/compile.txt"
mkdir -p "$OBJ/gtest" "$OBJ/tests"
# shellcheck disable=SC2016 # $0 and $@ belong to the inner shell
xargs -P "$(nproc)" -L 1 sh -c 'aarch64-linux-gnu-g++ "$0" "$@" || exit 255' "${FLAGS[@]}" <"$OBJ/compile.txt"
aarch64-linux-gnu-g++ -shared -fopenmp -o "$OBJ/liblinquant_ops.so" "$OBJ"/csrc_*.o "$OBJ"/isa_*.o \
  -L"$T/lib" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$T/lib"
# One binary for every C++ test of the op library (the ops register in static initializers).
aarch64-linux-gnu-g++ -fopenmp -o "$OBJ/cpp_tests" "$OBJ"/tests/*.o "$OBJ"/gtest/*.o -L"$OBJ" -Wl,--no-as-needed \
  -llinquant_ops -L"$T/lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$T/lib" -Wl,-rpath,"$OBJ" \
  -Wl,-rpath-link,"$T/lib" -Wl,-rpath-link,"$SITE/nvidia/cu13/lib" -lpthread

echo "== C++ tests under qemu-aarch64"
(cd "$DIR" && qemu-aarch64-static -L "$SYSROOT" "$OBJ/cpp_tests" --gtest_brief=1)

echo "== Python tests under qemu-aarch64 ($("$DIR/python" -c 'import platform, torch; print(platform.machine(), "torch", torch.__version__)'))"
# Without binfmt_misc no aarch64 executable can be started from inside the emulation, so what
# starts a child Python is left out: test_cpu_variants.py (the suite again per instruction set;
# aarch64 has only the baseline one) and torch.compile's inductor backend (test_embedding's
# compiled test; the other compile tests use aot_eager and run).
if [ $# -eq 0 ]; then
  set -- tests/python/test_pack.py tests/python/test_quantize.py tests/python/test_linear.py \
    tests/python/test_seeds.py tests/python/test_errors.py tests/python/test_qlinear.py \
    tests/python/test_opcheck.py tests/python/test_files.py tests/python/test_experts.py \
    tests/python/test_embedding.py --deselect tests/python/test_embedding.py::test_compiled_fullgraph_and_traced
fi
"$DIR/python" -m pytest -q -p no:cacheprovider -rs "$@"
