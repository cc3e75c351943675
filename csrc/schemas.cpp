// Every schema of the `linquant` op library, in one place. Backends only register kernels
// (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and cuda/*.cu); fake kernels live in
// python/linquant/_ops.py. docs/architecture.md documents the semantics.
#include <torch/library.h>

TORCH_LIBRARY(linquant, m) {
  // Scale (float32) and zero point (int32; all zeros when symmetric) of x at the granularity
  // chosen by axis / group_size (both None: per-tensor).
  m.def(
      "choose_qparams(Tensor x, int bits, bool symmetric, int? axis=None, int? group_size=None)"
      " -> (Tensor scale, Tensor zero_point)");
  // q = clamp(round(x / scale) + zero_point): int8 when zero_point is None (symmetric), else uint8.
  m.def(
      "quantize(Tensor x, Tensor scale, Tensor? zero_point, int bits, int? axis=None,"
      " int? group_size=None) -> Tensor");
  // x_hat = scale * (q - zero_point) in dtype (float32 when None).
  m.def(
      "dequantize(Tensor q, Tensor scale, Tensor? zero_point, int? axis=None, int? group_size=None,"
      " ScalarType? dtype=None) -> Tensor");
  // Values in [0, 2^bits) packed along the last dim into uint8, lowest index in the lowest bits;
  // the last dim becomes ceil(n * bits / 8). bits 1..8.
  m.def("pack(Tensor q, int bits) -> Tensor");
  // Inverse of pack: `size` is the original last dim.
  m.def("unpack(Tensor packed, int bits, int size) -> Tensor");
  // y = x @ dequantize(qweight).T + bias for x [..., K] in fp32/fp16/bf16 (y in x's dtype), with
  // qweight in the quantized-weight format: int8 [N, K] (8-bit symmetric), uint8 [N, K] (8-bit
  // asymmetric) or uint8 [N, ceil(K * bits / 8)] packed; scales / zeros [N, ceil(K / group_size)];
  // zeros None means symmetric. group_size None is per-channel.
  m.def(
      "linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros=None, Tensor? bias=None, int bits=8,"
      " int? group_size=None) -> Tensor");
  // A mixture's experts at once: x [T, K] holds each expert's rows in turn, counts[e] of them for
  // expert e (sum(counts) = T); expert e's rows get linear(rows, qweight[e], scales[e], zeros[e],
  // bias[e]) from the stacked [E, ...] weights (QExpertsWeight's). y [T, N] in x's dtype. One
  // call instead of one per expert: on the CPU one parallel loop over every expert's weights.
  m.def(
      "grouped_linear(Tensor x, int[] counts, Tensor qweight, Tensor scales, Tensor? zeros=None, Tensor? bias=None,"
      " int bits=8, int? group_size=None) -> Tensor");
  // CUDA builds only: the batch sizes where CUDA `linear` changes path (the GEMV for
  // M <= gemv_max_m, at most 8; the register-dequantizing tensor-core kernels for M <= tc_max_m,
  // at most 64; the shared-memory tensor-core kernel for M <= mma_max_m; the Hopper GEMM for
  // M <= hopper_max_m where _cuda_has_hopper_gemm; dequantize + cuBLAS beyond). A negative value
  // keeps the current one. Returns the previous [gemv_max_m, tc_max_m, mma_max_m, hopper_max_m].
  // For tuning on a new GPU (bench/bench_linear_cuda.py --paths) and for tests.
  m.def(
      "_cuda_linear_dispatch(int gemv_max_m=-1, int tc_max_m=-1, int mma_max_m=-1, int hopper_max_m=-1)"
      " -> int[]");
  // CUDA builds only: whether linear on CUDA device `device` can take the Hopper (wgmma) GEMM: the
  // build has it (CUTLASS headers, sm_90 among the archs) and the device is compute capability 9.0.
  m.def("_cuda_has_hopper_gemm(int device) -> bool");
  // The CPU kernels' instruction-set variant in use: "baseline", "avx2" or "avx512" (the CPU's
  // best, narrowed by LINQUANT_CPU_ISA). For tests and benchmark reports.
  m.def("_cpu_isa() -> str");
}
