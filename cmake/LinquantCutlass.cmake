# Decides whether the build has the Hopper GEMM (cmake/hopper): sm_90 among LINQUANT_CUDA_ARCHS and
# CUTLASS's headers found, in LINQUANT_CUTLASS_DIR (a CUTLASS checkout, or the `source` folder of
# PyPI's nvidia-cutlass, which scripts/setup.sh installs) or else in the active Python's
# cutlass_library package. Outputs: LINQUANT_WITH_HOPPER, LINQUANT_CUTLASS_INCLUDE_DIRS.
set(LINQUANT_WITH_HOPPER OFF)
if(NOT DEFINED LINQUANT_CUTLASS_DIR AND DEFINED ENV{LINQUANT_CUTLASS_DIR})
  set(LINQUANT_CUTLASS_DIR "$ENV{LINQUANT_CUTLASS_DIR}")
endif()
if(NOT LINQUANT_CUTLASS_DIR)
  # find_spec, not import: the package's Python dependencies are not installed (--no-deps).
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
            "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source') if s else '')"
    OUTPUT_VARIABLE LINQUANT_CUTLASS_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()
if(NOT LINQUANT_CUDA_ARCHS MATCHES "(^|;)90a?(;|$)")
  message(STATUS "linquant: no Hopper GEMM (sm_90 is not among the archs ${LINQUANT_CUDA_ARCHS})")
elseif(NOT LINQUANT_CUTLASS_DIR OR NOT EXISTS "${LINQUANT_CUTLASS_DIR}/include/cutlass/cutlass.h")
  message(STATUS "linquant: no Hopper GEMM (CUTLASS headers not found: pip install --no-deps "
                 "nvidia-cutlass==4.2.0.0, or set LINQUANT_CUTLASS_DIR)")
else()
  set(LINQUANT_WITH_HOPPER ON)
  set(LINQUANT_CUTLASS_INCLUDE_DIRS "${LINQUANT_CUTLASS_DIR}/include" "${LINQUANT_CUTLASS_DIR}/tools/util/include")
  message(STATUS "linquant: Hopper GEMM with CUTLASS from ${LINQUANT_CUTLASS_DIR}")
endif()
