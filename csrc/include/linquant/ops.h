// linquant's public C++ API: plain functions that call the registered ops through the PyTorch
// dispatcher (as torchvision::ops does), so C++ programs, TorchScript and Python run the same
// kernels on CPU or CUDA. Link the op library (CMake: target_link_libraries(app linquant::ops)).
// Semantics: docs/architecture.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace linquant {
namespace detail {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
  TORCH_CHECK(handle.has_value(), "linquant: the op ", name,
              " is not registered; link the linquant op library (linquant::ops, with --no-as-needed) "
              "or load liblinquant_ops.so before calling it");
  return handle->typed<Signature>();
}

// A None / undefined tensor is a TypeError naming the argument, before the dispatcher, which
// would otherwise report "no tensor arguments" for an op whose only tensor is missing.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "linquant: ", name, " must be a tensor, got None (an undefined tensor)");
}

}  // namespace detail

// Scale (float32) and zero point (int32; zeros when symmetric) of x. axis / group_size as in Python.
inline std::tuple<at::Tensor, at::Tensor> choose_qparams(const at::Tensor& x, int64_t bits, bool symmetric,
                                                         std::optional<int64_t> axis = std::nullopt,
                                                         std::optional<int64_t> group_size = std::nullopt) {
  static const auto h = detail::op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, bool, std::optional<int64_t>, std::optional<int64_t>)>("linquant::choose_qparams");
  detail::check_defined(x, "x");
  return h.call(x, bits, symmetric, axis, group_size);
}

// clamp(round(x / scale) + zero_point): int8 when zero_point is nullopt (symmetric), else uint8.
inline at::Tensor quantize(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                           int64_t bits, std::optional<int64_t> axis = std::nullopt,
                           std::optional<int64_t> group_size = std::nullopt) {
  static const auto h = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                              int64_t, std::optional<int64_t>, std::optional<int64_t>)>(
      "linquant::quantize");
  return h.call(x, scale, zero_point, bits, axis, group_size);
}

// scale * (q - zero_point) in dtype (float32 when nullopt).
inline at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                             std::optional<int64_t> axis = std::nullopt, std::optional<int64_t> group_size = std::nullopt,
                             std::optional<at::ScalarType> dtype = std::nullopt) {
  static const auto h = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                              std::optional<int64_t>, std::optional<int64_t>,
                                              std::optional<at::ScalarType>)>("linquant::dequantize");
  return h.call(q, scale, zero_point, axis, group_size, dtype);
}

// Values in [0, 2^bits) packed along the last dim, lowest index in the lowest bits.
inline at::Tensor pack(const at::Tensor& q, int64_t bits) {
  static const auto h = detail::op<at::Tensor(const at::Tensor&, int64_t)>("linquant::pack");
  detail::check_defined(q, "q");
  return h.call(q, bits);
}

inline at::Tensor unpack(const at::Tensor& packed, int64_t bits, int64_t size) {
  static const auto h = detail::op<at::Tensor(const at::Tensor&, int64_t, int64_t)>("linquant::unpack");
  detail::check_defined(packed, "packed");
  return h.call(packed, bits, size);
}

// x @ dequantized(qweight).T + bias over the quantized-weight format.
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                         std::optional<int64_t> group_size) {
  static const auto h = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                              int64_t, std::optional<int64_t>)>("linquant::linear");
  return h.call(x, qweight, scales, zeros, bias, bits, group_size);
}

// A mixture's experts at once: x [T, K] holds counts[e] rows of expert e in turn; each gets
// linear with expert e's slice of the stacked [E, ...] weights (and bias [E, N]). y [T, N].
inline at::Tensor grouped_linear(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                 const std::optional<at::Tensor>& bias, int64_t bits,
                                 std::optional<int64_t> group_size) {
  static const auto h = detail::op<at::Tensor(const at::Tensor&, at::IntArrayRef, const at::Tensor&, const at::Tensor&,
                                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                              int64_t, std::optional<int64_t>)>("linquant::grouped_linear");
  detail::check_defined(x, "x");
  detail::check_defined(qweight, "qweight");
  detail::check_defined(scales, "scales");
  return h.call(x, counts, qweight, scales, zeros, bias, bits, group_size);
}

// The float weight [N, in_features] that a weight in the quantized-weight format stands for, in
// dtype (Python: linquant.dequantize_weight): sub-byte rows unpacked, symmetric sub-byte values
// (stored offset by 2^(bits-1)) back to signed, then dequantize per channel or per group.
inline at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, int64_t bits,
                                    std::optional<int64_t> group_size, int64_t in_features, at::ScalarType dtype) {
  detail::check_defined(qweight, "qweight");
  TORCH_CHECK_VALUE(bits == 8 || bits == 4 || bits == 2, "linquant: bits must be 8, 4 or 2, got ", bits);
  TORCH_CHECK_VALUE(bits < 8 || (qweight.dim() == 2 && qweight.size(1) == in_features),
                    "linquant: an 8-bit qweight must be [N, in_features=", in_features, "], got shape ",
                    qweight.sizes());
  at::Tensor q = qweight;
  if (bits < 8) {
    q = unpack(q, bits, in_features);
    if (!zeros.has_value()) q = q.to(at::kShort).sub(int64_t{1} << (bits - 1)).to(at::kChar);
  }
  if (group_size.has_value()) return dequantize(q, scales, zeros, std::nullopt, group_size, dtype);
  return dequantize(q, scales.reshape({-1, 1}), zeros, 0, std::nullopt, dtype);
}

}  // namespace linquant
