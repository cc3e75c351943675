// The linear op's side of the Hopper GEMM (linear_hopper.h): which calls it takes and the launch,
// after the per-call rearrangement of scales and zero points (linear_hopper_qparams.cuh).
// Included by linear.cu when the build has the GEMM (LINQUANT_WITH_HOPPER: CUTLASS headers found
// and sm_90 among the archs).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "launch.cuh"
#include "linear_gemv.cuh"  // LinearParams
#include "linear_hopper.h"
#include "linear_hopper_qparams.cuh"

namespace linquant::cuda {

// The GEMM is built for sm_90a, which runs on compute capability 9.0 alone.
inline bool hopper_device(c10::DeviceIndex device) {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(device) == 9 &&
         device_attribute<cudaDevAttrComputeCapabilityMinor>(device) == 0;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Layouts the GEMM takes (anything else goes to dequantize + cuBLAS): fp16 / bf16 activations; TMA
// needs 16-byte aligned rows and bases (K a multiple of 128 / bits, so rows of W and x are whole
// 16-byte units; N a multiple of 8 for y's columns); CUTLASS's groups are whole 64-value K tiles
// or one per row. With fp16, K must be whole tiles too: TMA fills the last tile past K with q = 0,
// which dequantizes to z' = -s * z, and where that exceeds fp16's range (weights near its limit)
// the inf times the zero-filled x would be NaN.
inline bool hopper_gemm_supports(const LinearParams& p, int bits, const at::Tensor& x2) {
  const bool half = x2.scalar_type() == at::kHalf;
  if (!half && x2.scalar_type() != at::kBFloat16) return false;
  if (!hopper_device(x2.device().index())) return false;
  if (p.K % (half ? 64 : 128 / bits) != 0 || p.N % 8 != 0) return false;
  if (p.groups != 1 && p.group % 64 != 0) return false;
  if (p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return false;  // CUTLASS's int problem shape
  return aligned16(p.w) && aligned16(x2.const_data_ptr());
}

// Runs y = x W^T + bias through the GEMM; false (nothing launched) when CUTLASS refuses the problem.
inline bool hopper_gemm(const LinearParams& p, int bits, const at::Tensor& x2, const at::Tensor& bias,
                        at::Tensor& y) {
  at::Tensor qparams = at::empty({2, p.groups, p.N}, x2.options().dtype(at::kFloat));
  hopper_qparams_kernel<<<grid_for(p.N * p.groups, 256), 256, 0, current_stream()>>>(
      p, bits, qparams[0].data_ptr<float>(), qparams[1].data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor b;
  if (bias.defined()) {
    b = bias.to(at::kFloat).contiguous();
    if (!aligned16(b.const_data_ptr())) b = b.clone();  // the epilogue loads it in 16-byte units
  }
  hopper::GemmArgs a;
  a.w = p.w;
  a.x = x2.const_data_ptr();
  a.y = y.data_ptr();
  a.scales = qparams[0].const_data_ptr<float>();
  a.zeros = qparams[1].const_data_ptr<float>();
  a.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  a.M = p.M;
  a.N = p.N;
  a.K = p.K;
  a.group = p.groups == 1 ? p.K : p.group;
  a.type = hopper_weight_type(p, bits);
  a.device = x2.device().index();
  a.sm_count = multiprocessors(x2.device().index());
  const bool half = x2.scalar_type() == at::kHalf;
  const size_t bytes = half ? hopper::workspace_bytes<hopper::F16>(a) : hopper::workspace_bytes<hopper::BF16>(a);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x2.options().dtype(at::kByte));
  void* const ws = bytes > 0 ? workspace.data_ptr() : nullptr;
  const cudaStream_t stream = current_stream();
  return half ? hopper::gemm<hopper::F16>(a, ws, stream) : hopper::gemm<hopper::BF16>(a, ws, stream);
}

}  // namespace linquant::cuda
