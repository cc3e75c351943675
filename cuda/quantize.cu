// CUDA kernels of the quantize family. dequantize for now; the rest of the family comes with the
// CUDA backend work (docs/architecture.md, "Status").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csrc/core/quant_math.h"
#include "../csrc/quant_layout.h"

namespace linquant::cuda {
namespace {

namespace core = linquant::core;

// One thread per element of the [rows, cols] matrix; group (row, col / group) owns s and z.
template <typename Q, typename T>
__global__ void dequantize_kernel(const Q* __restrict__ q, const float* __restrict__ scale,
                                  const int32_t* __restrict__ zero, T* __restrict__ out, int64_t n,
                                  int64_t cols, int64_t group, int64_t groups) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / cols;
    const int64_t u = row * groups + (i - row * cols) / group;
    const int32_t z = zero != nullptr ? zero[u] : 0;
    out[i] = core::from_float<T>(core::dequantize_value(static_cast<int32_t>(q[i]), scale[u], z));
  }
}

at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point, std::optional<int64_t> axis,
                           std::optional<int64_t> group_size, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(q.is_cuda(), "linquant: q must be a CUDA tensor for this kernel, got ", q.device());
  TORCH_CHECK_VALUE(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte,
                    "linquant: q must be int8 (symmetric) or uint8 (asymmetric), got ", q.scalar_type());
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
                    "linquant: dtype must be float32, float16 or bfloat16, got ", out_dtype);
  const c10::cuda::CUDAGuard guard(q.device());
  const QuantLayout l = make_layout(q, axis, group_size);
  const at::Tensor s = prepare_scale(scale, q, l);
  const at::Tensor z = zero_point.has_value() ? prepare_zero_point(*zero_point, q, l) : at::Tensor();
  const at::Tensor rows = to_rows(q, l);
  at::Tensor out = at::empty({l.rows, l.cols}, q.options().dtype(out_dtype));
  const int64_t n = rows.numel();
  if (n > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t{65535} * 8);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int32_t* zp = z.defined() ? z.const_data_ptr<int32_t>() : nullptr;
    const float* sp = s.const_data_ptr<float>();
    auto launch = [&](auto* dst) {
      if (q.scalar_type() == at::kChar) {
        dequantize_kernel<<<blocks, threads, 0, stream>>>(rows.const_data_ptr<int8_t>(), sp, zp, dst, n,
                                                          l.cols, l.group, l.groups);
      } else {
        dequantize_kernel<<<blocks, threads, 0, stream>>>(rows.const_data_ptr<uint8_t>(), sp, zp, dst, n,
                                                          l.cols, l.group, l.groups);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    void* dst = out.data_ptr();
    switch (out_dtype) {
      case at::kHalf:
        launch(static_cast<core::half_t*>(dst));
        break;
      case at::kBFloat16:
        launch(static_cast<core::bf16_t*>(dst));
        break;
      default:
        launch(static_cast<float*>(dst));
    }
  }
  return from_rows(out, q, l);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CUDA, m) { m.impl("dequantize", &dequantize_cuda); }

}  // namespace linquant::cuda
