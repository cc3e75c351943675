// The weight of the linear op's format dequantized into a dense [N, K] matrix, for the path that
// multiplies with cuBLAS (cuda/linear.cu): s * (q - z) in fp32 rounded once to T, exactly what
// linquant::dequantize gives.
#pragma once

#include <type_traits>

#include "linear_gemv.cuh"  // LinearParams, weight_at
#include "linear_mma.cuh"   // WeightChunk, fetch_chunk, dequant_chunk_to

namespace linquant::cuda {

// Layouts mma_supports takes: one thread per 32-value chunk, loaded whole and written with 16-byte
// stores when K is a multiple of the chunk (rows of out then start 16-byte aligned), value by value
// otherwise (only the row's last chunk reaches past K).
template <int BITS, typename T>
__global__ void dequant_chunks_kernel(LinearParams p, T* __restrict__ out) {
  constexpr int P = 8 / BITS;
  const int64_t per_row = p.row_bytes * P / kMmaChunk;
  const bool whole = p.K % kMmaChunk == 0;
  [[maybe_unused]] const bool pairs_exact = pairs_exact_for<BITS, T>(p);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.N * per_row;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / per_row, k0 = i % per_row * kMmaChunk;
    WeightChunk<BITS> c;
    fetch_chunk<BITS, true>(p, n, k0, c);
    T* const dst = out + n * p.K + k0;
    // The chunk's values as 32-bit words: fp32 values, or pairs of 16-bit ones.
    constexpr int WORDS = kMmaChunk * sizeof(T) / 4;
    uint32_t v[WORDS];
    if constexpr (std::is_same_v<T, float>) {
      float f[kMmaChunk];
      dequant_chunk<BITS>(c.w, p.flip, p.scales.value_of(c.scale), c.z, f);
      for (int j = 0; j < kMmaChunk; ++j) v[j] = core::f32_bits(f[j]);
    } else {
      dequant_chunk_to<BITS, T>(p, c, pairs_exact, v);
    }
    if (whole) {
#pragma unroll
      for (int j = 0; j < WORDS / 4; ++j) {
        reinterpret_cast<uint4*>(dst)[j] = make_uint4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kMmaChunk; ++j) {  // unrolled, so v stays in registers
        if (k0 + j >= p.K) break;
        if constexpr (std::is_same_v<T, float>) {
          dst[j] = core::f32_from_bits(v[j]);
        } else {
          dst[j] = T{static_cast<uint16_t>(v[j / 2] >> (16 * (j % 2)))};
        }
      }
    }
  }
}

// Any layout: one thread per value.
template <typename T>
__global__ void dequant_weight_kernel(LinearParams p, int bits, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.N * p.K;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = core::from_float<T>(weight_at(p, bits, i / p.K, i % p.K));
  }
}

}  // namespace linquant::cuda
