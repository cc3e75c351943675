// CUDA kernels of choose_qparams / quantize / dequantize. Same layout (quant_layout.h) and the same
// torch-free formulas (csrc/core/quant_math.h) as the CPU kernels, each step one correctly rounded
// fp32 operation (built with --fmad=false), so both backends agree bit for bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csrc/quant_layout.h"
#include "launch.cuh"
#include "quantize_kernels.cuh"

namespace linquant::cuda {
namespace {

constexpr int kThreads = 256;

std::tuple<at::Tensor, at::Tensor> choose_qparams_cuda(const at::Tensor& x, int64_t bits, bool symmetric,
                                                       std::optional<int64_t> axis,
                                                       std::optional<int64_t> group_size) {
  check_bits(bits);
  check_float_dtype(x, "x");
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantLayout l = make_layout(x, axis, group_size);
  const at::Tensor rows = to_rows(x, l);
  const Pieces pieces = make_pieces(l.cols, l.group, l.groups);
  const int64_t n_params = l.num_params();
  const int64_t n_pieces = n_params * pieces.per_group;
  at::Tensor lo = at::empty({n_pieces}, x.options().dtype(at::kFloat));
  at::Tensor hi = at::empty({n_pieces}, x.options().dtype(at::kFloat));
  at::Tensor scale = at::empty({n_params}, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({n_params}, x.options().dtype(at::kInt));
  ErrorFlag flag(x);
  if (n_params > 0) {
    const cudaStream_t stream = current_stream();
    dispatch_float(x.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      minmax_kernel<<<grid_for(n_pieces * 32, kThreads), kThreads, 0, stream>>>(
          static_cast<const T*>(rows.const_data_ptr()), pieces, n_pieces, lo.data_ptr<float>(), hi.data_ptr<float>(),
          flag.ptr());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    qparams_kernel<<<grid_for(n_params, kThreads), kThreads, 0, stream>>>(
        lo.const_data_ptr<float>(), hi.const_data_ptr<float>(), pieces.per_group, n_params, static_cast<int>(bits),
        symmetric, scale.data_ptr<float>(), zero.data_ptr<int32_t>(), flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int32_t raised = flag.value();
    TORCH_CHECK_VALUE(!(raised & kNonFinite), "linquant: x contains NaN or Inf; cannot choose qparams");
    TORCH_CHECK_VALUE(!(raised & kOverflow), "linquant: the value range of x overflows a float32 scale");
  }
  const auto shape = param_shape(x, l);
  return {scale.view(shape), zero.view(shape)};
}

at::Tensor quantize_cuda(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                         int64_t bits, std::optional<int64_t> axis, std::optional<int64_t> group_size) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernel checks the scales' values (kBadScale); an empty x launches none, so they are checked
  // here, as the CPU does.
  const QuantJob job = prepare_quantize(x, scale, zero_point, bits, axis, group_size, x.numel() == 0);
  const QuantLayout& l = job.layout;
  const bool symmetric = job.symmetric();
  const core::QRange r = core::q_range(static_cast<int>(bits), symmetric);
  const int64_t n = job.rows.numel();
  if (n > 0) {
    ErrorFlag flag(x);
    const GroupIndex gi{l.cols, l.group, l.groups};
    const float* sp = job.scale.const_data_ptr<float>();
    const int32_t* zp = symmetric ? nullptr : job.zero_point.const_data_ptr<int32_t>();
    dispatch_float(x.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* in = static_cast<const T*>(job.rows.const_data_ptr());
      const unsigned blocks = grid_for(n, kThreads);
      if (symmetric) {
        quantize_kernel<<<blocks, kThreads, 0, current_stream()>>>(in, sp, zp, job.out.data_ptr<int8_t>(), n, gi, r,
                                                                   flag.ptr());
      } else {
        quantize_kernel<<<blocks, kThreads, 0, current_stream()>>>(in, sp, zp, job.out.data_ptr<uint8_t>(), n, gi, r,
                                                                   flag.ptr());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int32_t raised = flag.value();
    TORCH_CHECK_VALUE(!(raised & kBadScale), kBadScaleValues);  // first, as on the CPU
    TORCH_CHECK_VALUE(!(raised & kNonFinite), "linquant: x contains NaN or Inf; cannot quantize");
  }
  return from_rows(job.out, x, l);
}

at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                           std::optional<int64_t> axis, std::optional<int64_t> group_size,
                           std::optional<at::ScalarType> dtype) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  // While a CUDA graph is being captured, the scales' values go unchecked: the check reads its
  // verdict back to the host, which would end the capture (a QEmbedding lookup in a captured
  // decoding step dequantizes the rows it gathers). Eager calls check them.
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const QuantJob job = prepare_dequantize(q, scale, zero_point, axis, group_size, dtype, !capturing);
  const QuantLayout& l = job.layout;
  const int64_t n = job.rows.numel();
  if (n > 0) {
    const GroupIndex gi{l.cols, l.group, l.groups};
    const float* sp = job.scale.const_data_ptr<float>();
    const int32_t* zp = job.zero_point.defined() ? job.zero_point.const_data_ptr<int32_t>() : nullptr;
    dispatch_float(job.out.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      T* dst = static_cast<T*>(job.out.data_ptr());
      const unsigned blocks = grid_for(n, kThreads);
      if (q.scalar_type() == at::kChar) {
        dequantize_kernel<<<blocks, kThreads, 0, current_stream()>>>(job.rows.const_data_ptr<int8_t>(), sp, zp, dst,
                                                                     n, gi);
      } else {
        dequantize_kernel<<<blocks, kThreads, 0, current_stream()>>>(job.rows.const_data_ptr<uint8_t>(), sp, zp, dst,
                                                                     n, gi);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return from_rows(job.out, q, l);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CUDA, m) {
  m.impl("choose_qparams", &choose_qparams_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace linquant::cuda
