# Finds LibTorch from the active Python's torch package and decides whether to build CUDA kernels.
#
# Inputs (cache variables, or environment variables of the same name):
#   LINQUANT_CUDA        1 / 0 / unset: force CUDA on / off, or build it when torch is a CUDA build
#                        and nvcc is found.
#   LINQUANT_CUDA_ARCHS  CUDA architectures, e.g. "80;90" (the default) or "90".
# Outputs: Torch's variables and targets, LINQUANT_TORCH_LIBRARIES, LINQUANT_WITH_CUDA.

find_package(Python3 COMPONENTS Interpreter REQUIRED)

execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
          "import torch; print(torch.utils.cmake_prefix_path); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _lq_torch_info
  RESULT_VARIABLE _lq_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _lq_torch_rc EQUAL 0)
  message(FATAL_ERROR "linquant: `import torch` failed with ${Python3_EXECUTABLE}; install torch first")
endif()
string(REPLACE "\n" ";" _lq_torch_info "${_lq_torch_info}")
list(GET _lq_torch_info 0 _lq_torch_prefix)
list(LENGTH _lq_torch_info _lq_n)
set(LINQUANT_TORCH_CUDA_VERSION "")
if(_lq_n GREATER 1)
  list(GET _lq_torch_info 1 LINQUANT_TORCH_CUDA_VERSION)
endif()
list(APPEND CMAKE_PREFIX_PATH "${_lq_torch_prefix}")

# A build directory configured for another torch (a different Python, or torch upgraded in
# place) keeps that torch's paths in its cache, Torch_DIR and the libraries found from it, and
# would build a library that does not load with the torch now installed: forget them.
get_filename_component(_lq_torch_root "${_lq_torch_prefix}/../.." ABSOLUTE)
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c "import torch; print(torch.__version__)"
  OUTPUT_VARIABLE _lq_torch_version
  OUTPUT_STRIP_TRAILING_WHITESPACE)
set(_lq_torch_id "${_lq_torch_root} ${_lq_torch_version}")
if(DEFINED LINQUANT_TORCH_ID AND NOT LINQUANT_TORCH_ID STREQUAL _lq_torch_id)
  message(STATUS "linquant: torch changed (${LINQUANT_TORCH_ID} -> ${_lq_torch_id}); forgetting the old one's cached paths")
  string(REPLACE " " ";" _lq_old_id "${LINQUANT_TORCH_ID}")
  list(GET _lq_old_id 0 _lq_old_root)
  get_cmake_property(_lq_cached CACHE_VARIABLES)
  foreach(_lq_var IN LISTS _lq_cached)
    get_property(_lq_value CACHE "${_lq_var}" PROPERTY VALUE)
    string(FIND "${_lq_value}" "${_lq_old_root}" _lq_at)
    if(NOT _lq_at EQUAL -1)
      unset(${_lq_var} CACHE)
    endif()
  endforeach()
endif()
set(LINQUANT_TORCH_ID "${_lq_torch_id}" CACHE INTERNAL "torch root and version this build directory is configured for")

if(NOT DEFINED LINQUANT_CUDA AND DEFINED ENV{LINQUANT_CUDA})
  set(LINQUANT_CUDA "$ENV{LINQUANT_CUDA}")
endif()
if(NOT DEFINED LINQUANT_CUDA_ARCHS)
  if(DEFINED ENV{LINQUANT_CUDA_ARCHS})
    set(LINQUANT_CUDA_ARCHS "$ENV{LINQUANT_CUDA_ARCHS}")
  else()
    set(LINQUANT_CUDA_ARCHS "80;90")
  endif()
endif()

set(LINQUANT_WITH_CUDA OFF)
if(LINQUANT_TORCH_CUDA_VERSION)
  # Torch's own CMake looks for the toolkit whenever torch is a CUDA build, even for a CPU-only
  # library (LINQUANT_CUDA=0): without this it takes an nvcc wrapper on PATH for the toolkit root
  # and stops ("cannot find the CUDA libraries").
  include(${CMAKE_CURRENT_LIST_DIR}/LinquantCudaToolkit.cmake)
endif()
if(LINQUANT_TORCH_CUDA_VERSION AND NOT (DEFINED LINQUANT_CUDA AND NOT LINQUANT_CUDA))
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(LINQUANT_WITH_CUDA ON)
  elseif(LINQUANT_CUDA)
    message(FATAL_ERROR "linquant: LINQUANT_CUDA=1 but no CUDA compiler (nvcc) was found")
  else()
    message(STATUS "linquant: torch is a CUDA build but nvcc was not found; building CPU only")
  endif()
elseif(LINQUANT_CUDA AND NOT LINQUANT_TORCH_CUDA_VERSION)
  message(FATAL_ERROR "linquant: LINQUANT_CUDA=1 but the installed torch is a CPU-only build")
endif()

if(LINQUANT_WITH_CUDA)
  # Torch's CMake turns TORCH_CUDA_ARCH_LIST into -gencode flags; give it ours ("80;90" ->
  # "8.0;9.0+PTX") so it does not fall back to building for every architecture. The last
  # architecture's PTX rides along, so a newer GPU than those listed JIT-compiles the kernels
  # instead of failing with "no kernel image is available".
  set(_lq_arch_list "")
  foreach(_arch IN LISTS LINQUANT_CUDA_ARCHS)
    string(REGEX REPLACE "^([0-9]+)([0-9]a?)$" "\\1.\\2" _dotted "${_arch}")
    list(APPEND _lq_arch_list "${_dotted}")
  endforeach()
  list(SORT _lq_arch_list COMPARE NATURAL)
  list(POP_BACK _lq_arch_list _lq_newest)
  list(APPEND _lq_arch_list "${_lq_newest}+PTX")
  set(TORCH_CUDA_ARCH_LIST "${_lq_arch_list}")
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  enable_language(CUDA)
endif()

find_package(Torch REQUIRED)
# What linquant links: torch's libraries less NVRTC, which it never uses and which pip-installed
# toolkits often lack (torch's CMake then leaves a NOTFOUND entry behind).
set(LINQUANT_TORCH_LIBRARIES ${TORCH_LIBRARIES})
list(FILTER LINQUANT_TORCH_LIBRARIES EXCLUDE REGEX "nvrtc|NOTFOUND")
message(STATUS "linquant: torch at ${_lq_torch_prefix}, CUDA kernels: ${LINQUANT_WITH_CUDA}"
               " (archs ${LINQUANT_CUDA_ARCHS})")
