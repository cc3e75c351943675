// CUDA kernels of pack / unpack (cuda/pack_kernels.cuh): checks, launches, and the report of
// out-of-range values.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csrc/pack_checks.h"
#include "launch.cuh"
#include "pack_kernels.cuh"

namespace linquant::cuda {
namespace {

constexpr int kThreads = 256;

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
