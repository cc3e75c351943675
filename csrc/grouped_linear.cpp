// linquant::grouped_linear (csrc/schemas.cpp) on every backend without a kernel of its own (CUDA):
// each expert's rows through that backend's `linear`, one call per expert with rows. The CPU has
// a kernel that runs every expert's register kernels in one parallel loop (csrc/cpu/linear.cpp);
// autograd and autocast are csrc/linear_autograd.cpp's and csrc/linear_autocast.cpp's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear_checks.h"
#include "linquant/ops.h"

namespace linquant {
namespace {

at::Tensor grouped_linear_per_expert(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                                     const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                     const std::optional<at::Tensor>& bias, int64_t bits,
                                     std::optional<int64_t> group_size) {
  check_grouped_linear_args(x, counts, qweight, scales, zeros, bias);
  std::vector<at::Tensor> parts;
  int64_t start = 0;
  for (int64_t e = 0; e < qweight.size(0); ++e) {
    if (counts[e] == 0) continue;
    parts.push_back(linear(x.narrow(0, start, counts[e]), qweight[e], scales[e],
                           zeros.has_value() ? std::optional<at::Tensor>((*zeros)[e]) : std::nullopt,
                           bias.has_value() ? std::optional<at::Tensor>((*bias)[e]) : std::nullopt, bits, group_size));
    start += counts[e];
  }
  if (parts.empty()) return at::empty({0, qweight.size(1)}, x.options());
  return parts.size() == 1 ? parts[0] : at::cat(parts);
}

}  // namespace
}  // namespace linquant

TORCH_LIBRARY_IMPL(linquant, CompositeExplicitAutograd, m) {
  m.impl("grouped_linear", &linquant::grouped_linear_per_expert);
}
