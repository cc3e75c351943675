// The weight of the linear op's format dequantized into a dense [N, K] matrix, for the path that
// multiplies with cuBLAS (cuda/linear.cu): s * (q - z) in fp32 rounded once to T, exactly what
// linquant::dequantize gives.
#pragma once

#include "linear_gemv.cuh"  // LinearParams

namespace linquant::cuda {

// The weight dequantized into out [N, K] (any layout): one thread per value.
template <typename T>
__global__ void dequant_weight_kernel(LinearParams p, int bits, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.N * p.K;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = core::from_float<T>(weight_at(p, bits, i / p.K, i % p.K));
  }
}

}  // namespace linquant::cuda
