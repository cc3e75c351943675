#!/usr/bin/env bash
# One-shot GPU check of linquant on the device machine (H100, Python 3.12 + torch 2.11.0+cu130, nvcc 13.0,
# cmake, ninja, pytest, compute-sanitizer; no network). Through the device tool:
#     run(command="bash scripts/gpu_check.sh", timeout_s=600)
# Logs go to $OUT (default ./gpu_out); the device tool brings back at most 8 files, so there are 8:
#   gpu_check.log          everything printed here: versions, each step's tail, the summary
#   build.log              pip install (CMake + nvcc), C++ tests build, ctest
#   pytest_cuda.log        tests/python/test_cuda.py
#   pytest_all.log         the rest of tests/python (with GPU_CHECK_ALL=1)
#   sanitizer.log          compute-sanitizer (memcheck, racecheck, synccheck) over the kernel tests
#   bench_linear_cuda.txt, bench_linear_cuda.json     bench/bench_linear_cuda.py
#   bench_paths.txt        bench/bench_linear_cuda.py --paths --quick: each CUDA path forced at
#                          each M (where the dispatch thresholds belong), fp16 then bf16
#
# Steps, in order, each under `timeout` (budget in s = the most it may take):
#   1. versions: nvidia-smi, torch, nvcc, cmake, compute-sanitizer                      30
#   2. build: pip install against this machine's torch (LINQUANT_CUDA=1, archs 90; the    300
#      Hopper GEMM with CUTLASS's headers from LINQUANT_CUTLASS_DIR, default a carried
#      build/cutlass: `bash scripts/gpu_check.sh --stage-cutlass` fills it here first)
#      C++ tests and linquant-run with CMake (skipped with a message without GTest)    120
#      ctest (the out-of-tree find_package test is left to CPU CI)                      60
#   3. pytest -k hopper on test_cuda.py: the Hopper GEMM first, alone (a faulting kernel 120
#      would end the CUDA context of every later test); if it fails, it is left out of
#      the later steps
#      pytest tests/python/test_cuda.py -x --durations=10 (-k "not hopper")           120
#      pytest tests/python, test_cuda.py excepted, only with GPU_CHECK_ALL=1 (CI runs it) 180
#   4. ncu (speed of light, issue slots, stalls, occupancy) of the GEMV and both       90
#      tensor-core kernels, into gpu_check.log
#   5. compute-sanitizer memcheck over the linear tests that force each path and take odd  180
#      layouts ($MEMCHECK_K), with PyTorch's caching allocator off so out-of-bounds
#      accesses inside a block show; racecheck, then synccheck, on the forced-path tests  90 each
#   6. python3 bench/bench_linear_cuda.py --json                                        240
#   7. python3 bench/bench_linear_cuda.py --paths --quick, fp16 then bf16, if time is left  120
# The budgets add up to more than one device call allows, so the whole run also has a deadline,
# GPU_CHECK_DEADLINE_S (default 540 s, under the tool's 600 s): a step gets its budget or what is
# left before the deadline, less BENCH_RESERVE_S (default 150 s) kept for the benchmark, and a step
# with under 15 s left is skipped. Slow sanitizer runs are cut first; the benchmark always runs.
# A failed step is recorded and the next one runs; the exit status is 1 if any step failed, timed
# out or was skipped for lack of time (GTest missing is not a failure).
# Overrides: OUT, LINQUANT_BUILD_DIR (default build/gpu: inside the git-ignored build/, apart from a
# carried CPU build in build/ itself), MEMCHECK_K and SANITIZER_K (pytest -k selections for memcheck
# and for racecheck/synccheck; on the H100, memcheck of the 12 forced-path tests took 9 s, while
# memcheck over all ~570 CUDA tests needs far more than its budget and shows TIMEOUT).
set -u
cd "$(dirname "$0")/.." || exit
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEADLINE=${GPU_CHECK_DEADLINE_S:-540}
BENCH_RESERVE=${BENCH_RESERVE_S:-150}
BUILD_DIR=${LINQUANT_BUILD_DIR:-$ROOT/build/gpu}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$ROOT/$BUILD_DIR ;; esac
# The Hopper GEMM under the sanitizers: its smallest shape (every bits and mode) and the layouts it
# leaves to cuBLAS; all of its tests would take the sanitizers' whole budget.
HOPPER_K="hopper and (64 or leaves)"
MEMCHECK_K=${MEMCHECK_K:-forced or misaligned or empty or leading or large_zero or ($HOPPER_K)}
SANITIZER_K=${SANITIZER_K:-forced or ($HOPPER_K)}
export OUT BUILD_DIR ROOT # for the step functions run as child processes
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

STEPS=()   # "name|status|seconds|log" per step, for the summary
FAILED=0
LAST_RC=0

record() {  # record NAME STATUS SECONDS LOG
  STEPS+=("$1|$2|$3|$4")
  case $2 in PASS*) ;; *) FAILED=1 ;; esac
}

# run_step NAME BUDGET_S RESERVE_S LOG CMD...: runs CMD under timeout, appending to LOG ("-": this
# script's output), and records PASS / FAIL (rc) / TIMEOUT / SKIP; LAST_RC is CMD's exit status.
# CMD may be one of this script's step functions: `timeout` runs it as `bash gpu_check.sh --step FN`.
run_step() {
  local name=$1 budget=$2 reserve=$3 log=$4
  shift 4
  local left=$((DEADLINE - SECONDS - reserve - 15)) # 15: timeout's grace before SIGKILL
  local t=$((budget < left ? budget : left))
  if ((t < 15)); then
    echo "== [$name] SKIPPED: out of time (${left}s left before the deadline and reserve)"
    record "$name" "SKIP (out of time)" 0 "$log"
    LAST_RC=124
    return
  fi
  if declare -F "$1" >/dev/null; then set -- bash "$ROOT/scripts/gpu_check.sh" --step "$@"; fi
  local shown
  shown=$(printf '%q ' "$@")
  echo "== [$name] (timeout ${t}s) $shown"
  local start=$SECONDS rc status
  if [ "$log" = - ]; then
    timeout -k 15 "$t" "$@"
    rc=$?
  else
    echo "\$ $shown" >>"$log"
    timeout -k 15 "$t" "$@" >>"$log" 2>&1
    rc=$?
  fi
  case $rc in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT (${t}s)" ;;
    5) status="FAIL (rc 5: no tests ran)" ;; # pytest's code for an empty selection
    *) status="FAIL (rc $rc)" ;;
  esac
  echo "== [$name] $status in $((SECONDS - start))s"
  if [ "$log" != - ]; then
    echo "   last lines of $(basename "$log"):"
    tail -n 15 "$log" | sed 's/^/   | /'
  fi
  record "$name" "$status" $((SECONDS - start)) "$log"
  LAST_RC=$rc
}

# shellcheck disable=SC2329 # step functions are run through run_step (--step)
versions() {
  nvidia-smi
  python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs,",
          getattr(p, "L2_cache_size", 0) >> 20, "MiB L2,", p.total_memory >> 30, "GiB")
EOF
  if command -v nvcc >/dev/null; then nvcc --version; else "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version; fi
  cmake --version | head -1
  "$SANITIZER" --version | tail -1
  python3 -m pytest --version
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
}

# shellcheck disable=SC2329
build_cpp_tests() {
  cmake --build "$BUILD_DIR" -j "$(nproc)" || return
  [ -d "$BUILD_DIR/tests/cpp" ] || echo "GTest not found on this machine: C++ tests not built (linquant-run was)"
}

# shellcheck disable=SC2329
bench_paths() {  # the path sweep for both activation dtypes (the thresholds were measured on fp16)
  local skip=()
  [ -n "${BENCH_PATHS_SKIP:-}" ] && skip=(--skip-path "$BENCH_PATHS_SKIP")
  python3 bench/bench_linear_cuda.py --paths --quick ${skip[@]+"${skip[@]}"} &&
    python3 bench/bench_linear_cuda.py --paths --quick --dtype bf16 ${skip[@]+"${skip[@]}"}
}

# shellcheck disable=SC2329
profile_kernels() {  # Nsight Compute on the linear kernels, W4 g128 8192x8192: bandwidth, issue slots, stalls
  ncu --kernel-name regex:"gemv_kernel|tc_gemv_kernel|mma_kernel" --launch-count 6 --section SpeedOfLight \
    --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats python3 - <<'EOF_PY'
import torch, linquant as lq
qw = lq.quantize_weight(torch.randn(8192, 8192), 4, 128, symmetric=False, dtype=torch.float16)
w = [t.cuda() if t is not None else None for t in (qw.qweight, qw.scales, qw.zeros)]
def call(m):
    lq.linear(torch.randn(m, 8192, device="cuda", dtype=torch.float16), *w, None, 4, 128)
for m in (1, 1):  # the GEMV, twice (the first call warms up)
    call(m)
with lq.cuda_linear_dispatch(gemv_max_m=0, tc_max_m=16):  # the register tensor-core kernel
    for m in (1, 16):
        call(m)
for m in (16, 16):  # the shared-memory tensor-core kernel
    call(m)
torch.cuda.synchronize()
EOF_PY
}

if [ "${1:-}" = --step ]; then # a step function run under `timeout` (see run_step)
  shift
  "$@"
  exit
fi
if [ "${1:-}" = --stage-cutlass ]; then # on the CPU machine: CUTLASS's headers into build/cutlass to carry
  src=$(python3 -c "import importlib.util as u, os; print(os.path.join(u.find_spec('cutlass_library').submodule_search_locations[0], 'source'))") || exit
  mkdir -p "$ROOT/build/cutlass/tools/util" && cp -r "$src/include" "$ROOT/build/cutlass/" &&
    cp -r "$src/tools/util/include" "$ROOT/build/cutlass/tools/util/" && du -sh "$ROOT/build/cutlass"
  exit
fi

main() {
  echo "== gpu_check $(date -u +%FT%TZ): logs in $OUT, build dir $BUILD_DIR, deadline ${DEADLINE}s"
  # The toolkit itself, not an nvcc wrapper on PATH (see cmake/LinquantCudaToolkit.cmake).
  if [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    export CUDA_HOME
  fi
  SANITIZER=$(command -v compute-sanitizer)
  local c
  for c in "${CUDA_HOME:-/usr/local/cuda}"/{bin,compute-sanitizer}/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER=$c
  done
  export SANITIZER=${SANITIZER:-compute-sanitizer}
  # pip's cmake (>= 3.26) and ninja first on PATH, as the other scripts do.
  # shellcheck source=scripts/env.sh
  source scripts/env.sh

  # 1. versions
  run_step versions 30 "$BENCH_RESERVE" - versions

  # 2. build against this machine's torch; a separate build dir, so a carried CPU build is not reused.
  export LINQUANT_CUDA=1 LINQUANT_CUDA_ARCHS=90 LINQUANT_BUILD_DIR=$BUILD_DIR
  if [ -z "${LINQUANT_CUTLASS_DIR:-}" ] && [ -f "$ROOT/build/cutlass/include/cutlass/cutlass.h" ]; then
    export LINQUANT_CUTLASS_DIR=$ROOT/build/cutlass
  fi
  echo "== CUTLASS for the Hopper GEMM: ${LINQUANT_CUTLASS_DIR:-the cutlass_library package, if installed}"
  run_step build 300 "$BENCH_RESERVE" "$OUT/build.log" \
    python3 -m pip install --no-build-isolation --no-deps -v "$ROOT"
  if ((LAST_RC)) && [ -f "$BUILD_DIR/liblinquant_ops.so" ]; then
    # pip failed after the library was built: use it in place rather than lose every later step.
    echo "== pip install failed; using $BUILD_DIR/liblinquant_ops.so with python/ on PYTHONPATH"
    export LINQUANT_LIBRARY=$BUILD_DIR/liblinquant_ops.so PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
  fi
  run_step cpp-build 120 "$BENCH_RESERVE" "$OUT/build.log" build_cpp_tests
  if [ -d "$BUILD_DIR/tests/cpp" ]; then
    run_step ctest 60 "$BENCH_RESERVE" "$OUT/build.log" \
      ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" -E OutOfTree
  elif ((LAST_RC == 0)); then # GTest missing is not a failure
    STEPS[-1]=${STEPS[-1]/|PASS|/|PASS (no GTest)|}
  fi
  # test_cpp_program.py runs this build's linquant-run (it skips when that is missing), never a
  # carried CPU one from build/.
  export LINQUANT_RUN=$BUILD_DIR/linquant-run

  # 3. pytest: the CUDA suite, then the rest (test files needing absent packages skip themselves).
  local per_test=()
  python3 -c "import pytest_timeout" >/dev/null 2>&1 && per_test=(--timeout=120)
  local hopper_ok=1
  run_step pytest-hopper 120 "$BENCH_RESERVE" "$OUT/pytest_cuda.log" \
    python3 -m pytest tests/python/test_cuda.py -q -p no:cacheprovider -k hopper -rs ${per_test[@]+"${per_test[@]}"}
  if ((LAST_RC)); then
    hopper_ok=0
    echo "== the Hopper GEMM failed its tests: left out of the sanitizers and the path sweep"
  fi
  run_step pytest-cuda 120 "$BENCH_RESERVE" "$OUT/pytest_cuda.log" \
    python3 -m pytest tests/python/test_cuda.py -q -x --durations=10 -p no:cacheprovider -k "not hopper" \
    ${per_test[@]+"${per_test[@]}"}
  # The CPU suites are CI's job; here they only spend device time, unless asked for.
  if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then
    run_step pytest-all 180 "$BENCH_RESERVE" "$OUT/pytest_all.log" \
      python3 -m pytest tests/python -q --ignore=tests/python/test_cuda.py --durations=10 -p no:cacheprovider \
      ${per_test[@]+"${per_test[@]}"}
  fi

  # 4. a profile of the linear kernels (into this log): quick, and worth more than the slow
  # sanitizer runs that come after it.
  run_step profile 90 "$BENCH_RESERVE" - profile_kernels

  # 5. compute-sanitizer. Without the caching allocator every tensor is its own cudaMalloc, so an
  # out-of-bounds access inside a cached block is caught too.
  export LINQUANT_TESTS_NO_PROFILER=1 # the hopper tests' kernel check (CUPTI) is off under the sanitizer
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck 180 "$BENCH_RESERVE" "$OUT/sanitizer.log" \
    "$SANITIZER" --tool memcheck --error-exitcode 1 \
    python3 -m pytest tests/python/test_cuda.py -q -p no:cacheprovider -k "($MEMCHECK_K)$( ((hopper_ok)) || echo ' and not hopper')"
  for tool in racecheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "$tool" 90 "$BENCH_RESERVE" "$OUT/sanitizer.log" \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      python3 -m pytest tests/python/test_cuda.py -q -p no:cacheprovider -k "($SANITIZER_K)$( ((hopper_ok)) || echo ' and not hopper')"
  done

  unset LINQUANT_TESTS_NO_PROFILER

  # 6. the benchmark (its table is printed whole below).
  run_step bench 240 0 "$OUT/bench_linear_cuda.txt" \
    python3 bench/bench_linear_cuda.py --json "$OUT/bench_linear_cuda.json"
  echo "== bench_linear_cuda.txt:"
  cat "$OUT/bench_linear_cuda.txt"
  # 7. the path sweep (8192x8192), with what time is left.
  ((hopper_ok)) || export BENCH_PATHS_SKIP=hopper
  run_step bench-paths 120 0 "$OUT/bench_paths.txt" bench_paths

  echo
  echo "== summary ($SECONDS s; logs in $OUT)"
  local s name status secs log
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name status secs log <<<"$s"
    printf '   %-12s %-22s %5ss  %s\n' "$name" "$status" "$secs" "$(basename "$log")"
  done
  if ((FAILED)); then
    echo "== gpu_check: FAILED"
    return 1
  fi
  echo "== gpu_check: all steps passed"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
