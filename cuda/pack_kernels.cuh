// Device kernels of pack / unpack: one thread per 8-value unit of a row (a unit packs into exactly
// `bits` bytes, so threads never share an output byte), using the CPU's torch-free unit
// transforms (csrc/core/pack_span.h), hence identical bytes. Apart from the ATen glue in pack.cu
// so the GoogleTest suites can also run them on the host (tests/cpp/cuda_emulation).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../csrc/core/pack_span.h"

namespace linquant::cuda {

namespace core = linquant::core;

// Up to 8 bytes from p into the low bytes of a little-endian word (the rest zero).
__device__ __forceinline__ uint64_t load_bytes(const uint8_t* p, int n) {
  uint64_t w = 0;
  for (int k = 0; k < n; ++k) w |= static_cast<uint64_t>(p[k]) << (8 * k);
  return w;
}

__device__ __forceinline__ void store_bytes(uint8_t* p, uint64_t w, int n) {
  for (int k = 0; k < n; ++k) p[k] = static_cast<uint8_t>(w >> (8 * k));
}

template <int BITS>
__global__ void pack_kernel(const uint8_t* __restrict__ q, int64_t rows, int64_t n, uint8_t* __restrict__ out,
                            int64_t packed_n, unsigned* flag) {
  const int64_t units = (n + 7) / 8;
  uint64_t seen = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * units;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / units, u = i - row * units;
    const int len = static_cast<int>(n - u * 8 < 8 ? n - u * 8 : 8);
    const uint64_t w = load_bytes(q + row * n + u * 8, len);
    seen |= w;
    store_bytes(out + row * packed_n + u * BITS, core::pack8<BITS>(w),
                static_cast<int>(core::packed_size(len, BITS)));
  }
  // Any byte with a bit at or above BITS is out of range; the host then names the first one.
  constexpr uint64_t high = 0x0101010101010101ull * static_cast<uint8_t>(0xFFu << BITS);
  if (BITS < 8 && (seen & high) != 0) atomicOr(flag, 1u);
}

template <int BITS>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, int64_t rows, int64_t n, int64_t packed_n,
                              uint8_t* __restrict__ q) {
  const int64_t units = (n + 7) / 8;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * units;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / units, u = i - row * units;
    const int len = static_cast<int>(n - u * 8 < 8 ? n - u * 8 : 8);
    const uint64_t acc = load_bytes(packed + row * packed_n + u * BITS, static_cast<int>(core::packed_size(len, BITS)));
    store_bytes(q + row * n + u * 8, core::unpack8<BITS>(acc), len);
  }
}

}  // namespace linquant::cuda
