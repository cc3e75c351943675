// The weight of the linear op's format dequantized into a dense [N, K] matrix, for the path that
// multiplies with cuBLAS (cuda/linear.cu): s * (q - z) in fp32 rounded once to T, exactly what
// linquant::dequantize gives.
#pragma once

#include "linear_gemv.cuh"  // LinearParams

namespace linquant::cuda {

// The weight dequantized into out [N, K] (any layout): one thread per packed byte.
template <typename T>
__global__ void dequant_weight_kernel(LinearParams p, int bits, T* __restrict__ out) {
  const int per_byte = 8 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const int64_t bytes = p.N * p.row_bytes;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < bytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / p.row_bytes, j = i - n * p.row_bytes;
    const uint32_t byte = p.w[i] ^ (p.flip & 0xFFu);
    for (int r = 0; r < per_byte; ++r) {
      const int64_t k = j * per_byte + r;
      if (k >= p.K) break;
      const int64_t u = n * p.groups + k / p.group;
      const int32_t z = p.zeros != nullptr ? p.zeros[u] : p.zero_const;
      const int32_t q = static_cast<int32_t>((byte >> (r * bits)) & mask);
      out[n * p.K + k] = core::from_float<T>(core::dequantize_value(q, p.scales[u], z));
    }
  }
}

}  // namespace linquant::cuda
