// The Hopper GEMM's CUTLASS types and launch, included by the two instantiation files
// (linear_hopper_f16.cu, linear_hopper_bf16.cu), which cmake/hopper compiles for sm_90a alone:
// for sm_90 or compute_90, CUTLASS builds stubs of its wgmma kernels that print an error and write
// nothing.
//
// The design of CUTLASS's example 55 (mixed-input GEMM):
// - TMA loads the weights (the GEMM's A, K-major as the format stores them, no prepack) and the
//   activations (B: x [M, K] row-major is x^T [K, M] column-major, K-major too);
// - the weights go through registers, converted as q * s + z' in fp32 (one fma), rounded to T;
// - wgmma multiplies with fp32 accumulators on 128 x 128 x 64 tiles, persistent data-parallel
//   scheduler, cooperative warp specialization;
// - the epilogue adds the fp32 bias per row of y^T (per output feature) before y's one rounding,
//   and stores y^T column-major, which is y [M, N] row-major.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <cute/tensor.hpp>

#include <stdexcept>
#include <string>

#include "linear_hopper.h"

namespace linquant::cuda::hopper {

template <typename Tag>
struct Activation;
template <>
struct Activation<F16> {
  using type = cutlass::half_t;
};
template <>
struct Activation<BF16> {
  using type = cutlass::bfloat16_t;
};

template <typename Q, typename T>
struct MixedGemm {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Q>::value;  // elements per 16 bytes
  static constexpr int kAlignT = 8;

  using Fusion = cutlass::epilogue::fusion::LinCombPerRowBias<T, float, float, T, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlignT,  // no source matrix: beta = 0
      T, cutlass::layout::ColumnMajor, kAlignT, cutlass::epilogue::TmaWarpSpecializedCooperative,
      Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Q, float, float>, cutlass::layout::RowMajor, kAlignW,  // W [N, K] with scales and zeros
      T, cutlass::layout::ColumnMajor, kAlignT,                           // x^T [K, M]
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const GemmArgs& a) {
    const int n = static_cast<int>(a.N), m = static_cast<int>(a.M), k = static_cast<int>(a.K);
    const int groups = static_cast<int>((a.K + a.group - 1) / a.group);
    using StrideW = typename Kernel::StrideA;
    using StrideX = typename Kernel::StrideB;
    using StrideY = typename Kernel::StrideD;
    using StrideS = typename Mainloop::StrideScale;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {static_cast<const Q*>(a.w), cutlass::make_cute_packed_stride(StrideW{}, cute::make_shape(n, k, 1)),
         static_cast<const T*>(a.x), cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(m, k, 1)), a.scales,
         cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(n, groups, 1)), static_cast<int>(a.group),
         a.zeros},
        {{}, nullptr, {}, static_cast<T*>(a.y),
         cutlass::make_cute_packed_stride(StrideY{}, cute::make_shape(n, m, 1))}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = a.bias;
    args.hw_info.device_id = a.device;
    args.hw_info.sm_count = a.sm_count;
    return args;
  }
};

inline void check(cutlass::Status status, const char* what) {
  if (status != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("linquant: the Hopper GEMM's ") + what + " failed: " +
                             cutlassGetStatusString(status));
  }
}

// Calls f with null pointers of the CUTLASS weight type and activation type T.
template <typename T, typename F>
auto by_weight_type(WeightType type, F&& f) {
  switch (type) {
    case WeightType::kU8:
      return f(static_cast<uint8_t*>(nullptr), static_cast<T*>(nullptr));
    case WeightType::kS8:
      return f(static_cast<int8_t*>(nullptr), static_cast<T*>(nullptr));
    case WeightType::kU4:
      return f(static_cast<cutlass::uint4b_t*>(nullptr), static_cast<T*>(nullptr));
    case WeightType::kU2:
      break;
  }
  return f(static_cast<cutlass::uint2b_t*>(nullptr), static_cast<T*>(nullptr));
}

// linear_hopper.h's entry points, instantiated once per activation type by the .cu files.
template <typename Tag>
size_t workspace_bytes(const GemmArgs& a) {
  return by_weight_type<typename Activation<Tag>::type>(a.type, [&](auto* q, auto* t) {
    using G = MixedGemm<std::remove_pointer_t<decltype(q)>, std::remove_pointer_t<decltype(t)>>;
    return G::Gemm::get_workspace_size(G::arguments(a));
  });
}

template <typename Tag>
bool gemm(const GemmArgs& a, void* workspace, cudaStream_t stream) {
  return by_weight_type<typename Activation<Tag>::type>(a.type, [&](auto* q, auto* t) {
    using G = MixedGemm<std::remove_pointer_t<decltype(q)>, std::remove_pointer_t<decltype(t)>>;
    typename G::Gemm gemm;
    const auto args = G::arguments(a);
    if (G::Gemm::can_implement(args) != cutlass::Status::kSuccess) return false;
    check(gemm.initialize(args, workspace, stream), "initialization");
    check(gemm.run(stream), "launch");
    return true;
  });
}

}  // namespace linquant::cuda::hopper
