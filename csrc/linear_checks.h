// Argument checks of the weight-only quantized linear op, shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace linquant {

// The shape of one linear call, from its validated arguments.
struct LinearShape {
  int64_t M = 0;          // rows of x: numel / K
  int64_t N = 0;          // out_features
  int64_t K = 0;          // in_features (x's last dim)
  int64_t row_bytes = 0;  // ceil(K * bits / 8)
  int64_t group = 0;      // values per group (K when per-channel)
  int64_t groups = 0;     // ceil(K / group)
  bool symmetric = true;  // zeros is None
};

// Checks x, qweight, scales, zeros, bias, bits and group_size against docs/architecture.md's weight
// format and each other (dtypes, shapes, devices); raises ValueError naming the argument.
LinearShape check_linear_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                              int64_t bits, std::optional<int64_t> group_size);

// grouped_linear's own checks: x [T, K], weights stacked per expert ([E, N, ...]: zeros [E, N, G],
// bias [E, N]) and one row count per expert summing to T. Each expert's slice is then a linear
// call's (check_linear_args).
void check_grouped_linear_args(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                               const std::optional<at::Tensor>& bias);

}  // namespace linquant
