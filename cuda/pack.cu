// CUDA kernels of pack / unpack: one thread per 8-value unit of a row (a unit packs into exactly
// `bits` bytes, so threads never share an output byte), using the CPU's torch-free unit
// transforms (csrc/core/pack_span.h), hence identical bytes.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csrc/core/pack_span.h"
#include "../csrc/pack_checks.h"
#include "launch.cuh"

namespace linquant::cuda {
namespace {

namespace core = linquant::core;

constexpr int kThreads = 256;

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

// Calls fn with std::integral_constant<int, bits> for bits 1..8.
template <typename Fn>
void dispatch_bits(int64_t bits, Fn&& fn) {
  switch (bits) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 4: fn(std::integral_constant<int, 4>()); break;
    case 5: fn(std::integral_constant<int, 5>()); break;
    case 6: fn(std::integral_constant<int, 6>()); break;
    case 7: fn(std::integral_constant<int, 7>()); break;
    default: fn(std::integral_constant<int, 8>()); break;
  }
}

at::Tensor pack_cuda(const at::Tensor& q, int64_t bits) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const PackJob job = prepare_pack(q, bits);
  const int64_t work = job.rows * ((job.n + 7) / 8);
  if (work == 0) return job.out;
  ErrorFlag flag(q);
  dispatch_bits(bits, [&](auto b) {
    pack_kernel<decltype(b)::value><<<grid_for(work, kThreads), kThreads, 0, current_stream()>>>(
        job.values.const_data_ptr<uint8_t>(), job.rows, job.n, job.out.data_ptr<uint8_t>(), job.packed_n,
        flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (flag.value() != 0) report_out_of_range(job.values.view(q.sizes()), bits);
  return job.out;
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t bits, int64_t size) {
  check_cuda(packed, "packed");
  const c10::cuda::CUDAGuard guard(packed.device());
  const PackJob job = prepare_unpack(packed, bits, size);
  const int64_t work = job.rows * ((job.n + 7) / 8);
  if (work == 0) return job.out;
  dispatch_bits(bits, [&](auto b) {
    unpack_kernel<decltype(b)::value><<<grid_for(work, kThreads), kThreads, 0, current_stream()>>>(
        job.values.const_data_ptr<uint8_t>(), job.rows, job.n, job.packed_n, job.out.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return job.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace linquant::cuda
