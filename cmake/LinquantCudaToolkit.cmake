# Points CMake and torch's CMake (FindCUDA) at the CUDA toolkit itself ($CUDA_HOME, $CUDA_PATH or
# /usr/local/cuda) rather than an nvcc wrapper on PATH, which they would otherwise take as the
# toolkit root. Used by linquant's build and by its installed package config.
foreach(_lq_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
  if(NOT CMAKE_CUDA_COMPILER AND _lq_root AND EXISTS "${_lq_root}/bin/nvcc")
    set(CMAKE_CUDA_COMPILER "${_lq_root}/bin/nvcc")
    set(CUDA_TOOLKIT_ROOT_DIR "${_lq_root}")
    set(CUDAToolkit_ROOT "${_lq_root}")
  endif()
endforeach()
