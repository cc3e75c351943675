// What the Hopper GEMM (linear_hopper.h) reads of the format besides the weight bytes: the CUTLASS
// matrix type those bytes are, and the scales and zero points rearranged per call. Torch-free, so
// the emulated C++ tests run it (tests/cpp/test_linear_emulated.cpp).
#pragma once

#include <cstdint>

#include "linear_gemv.cuh"  // LinearParams
#include "linear_hopper.h"

namespace linquant::cuda {

// The format's rows are CUTLASS's matrices as stored: sub-byte values unsigned (symmetric ones
// offset by 2^(bits-1)), 8-bit ones int8 when symmetric, uint8 otherwise.
inline hopper::WeightType hopper_weight_type(const LinearParams& p, int bits) {
  if (bits == 2) return hopper::WeightType::kU2;
  if (bits == 4) return hopper::WeightType::kU4;
  return p.zeros == nullptr ? hopper::WeightType::kS8 : hopper::WeightType::kU8;
}

// fp32 [G, N] (N contiguous) scales s and z' = -s * z, so that CUTLASS's q * s + z' is
// s * (q - z). The zero point of symmetric weights is 2^(bits-1) for sub-byte values (stored
// offset) and 0 for int8 (read as signed).
__global__ void hopper_qparams_kernel(LinearParams p, int bits, float* __restrict__ scales,
                                      float* __restrict__ zeros) {
  const int32_t symmetric_zero = bits == 8 ? 0 : 1 << (bits - 1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.N * p.groups;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = i / p.N, n = i % p.N, at = n * p.groups + g;
    const float s = p.scales[at];
    const int32_t z = p.zeros != nullptr ? p.zeros[at] : symmetric_zero;
    scales[i] = s;
    zeros[i] = -(s * static_cast<float>(z));  // z within +-2^23: exact in fp32
  }
}

}  // namespace linquant::cuda
