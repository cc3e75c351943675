// The Hopper GEMM of the linear op (M past the fused tensor-core kernels): CUTLASS's mixed-input
// warp-specialized GEMM, compiled for sm_90a alone in linear_hopper_{f16,bf16}.cu (cmake/hopper).
// This header is what linear.cu sees of it: plain types, no CUTLASS.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace linquant::cuda::hopper {

// Which CUTLASS matrix the format's qweight is: the same bytes, K-major rows with the lowest index
// in the lowest bits (uint8 / uint4b_t / uint2b_t; int8 for 8-bit symmetric).
enum class WeightType : int { kU8, kS8, kU4, kU2 };

// y = x W^T + bias, computed as y^T = W x^T: CUTLASS passes the narrow operand through registers
// as A. Each weight is dequantized as q * scale + zero in fp32, from [G, N] fp32 arrays (zero =
// -scale * zero point), then rounded to the activation type for wgmma.
struct GemmArgs {
  const void* w = nullptr;       // [N, K] at the weight type's width
  const void* x = nullptr;       // [M, K], fp16 or bf16
  void* y = nullptr;             // [M, N], x's type
  const float* scales = nullptr; // [G, N]
  const float* zeros = nullptr;  // [G, N]
  const float* bias = nullptr;   // [N] or null
  int64_t M = 0, N = 0, K = 0;
  int64_t group = 0;  // K when G = 1, else a multiple of 64
  WeightType type = WeightType::kU8;
  // The tensors' device and its SMs, which CUTLASS's persistent scheduler sizes its grid by (left
  // unset, it would ask the driver for device 0's on every call).
  int device = 0, sm_count = 0;
};

// The activation types, spelled without CUTLASS.
struct F16 {};
struct BF16 {};

// Every pointer 16-byte aligned, K a multiple of 128 / bits, N a multiple of 8, groups as above:
// hopper_gemm_supports (linear_hopper_launch.cuh) checks the layout. Returns false when CUTLASS's
// can_implement refuses the problem (nothing launched), else launches on `stream` into
// `workspace` (at least workspace_bytes) and throws on a launch error. Defined in
// linear_hopper_gemm.cuh, instantiated for F16 and BF16 in linear_hopper_{f16,bf16}.cu.
template <typename Tag>
size_t workspace_bytes(const GemmArgs& a);
template <typename Tag>
bool gemm(const GemmArgs& a, void* workspace, cudaStream_t stream);
extern template size_t workspace_bytes<F16>(const GemmArgs& a);
extern template size_t workspace_bytes<BF16>(const GemmArgs& a);
extern template bool gemm<F16>(const GemmArgs& a, void* workspace, cudaStream_t stream);
extern template bool gemm<BF16>(const GemmArgs& a, void* workspace, cudaStream_t stream);

}  // namespace linquant::cuda::hopper
