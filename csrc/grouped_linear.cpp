// linquant::grouped_linear (csrc/schemas.cpp): every expert of a mixture through `linear` in one
// call. A composite (CompositeImplicitAutograd), so each backend's linear, its autograd and its
// autocast serve it, and a model calls one op per projection instead of one per expert from Python.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linquant/ops.h"

namespace linquant {
namespace {

constexpr const char* kWho = "linquant::grouped_linear";

// `t` (zeros or bias) holds one entry per expert: [E, ...] with E = experts.
void check_stacked(const std::optional<at::Tensor>& t, const char* name, int64_t experts, int64_t dims) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == dims && t->size(0) == experts, kWho, ": ", name, " must be [", experts,
                    dims == 2 ? ", N" : ", N, G", "] (one per expert), got shape ", t->sizes());
}

at::Tensor grouped_linear_composite(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                                    const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                    const std::optional<at::Tensor>& bias, int64_t bits,
                                    std::optional<int64_t> group_size) {
  TORCH_CHECK_VALUE(x.dim() == 2, kWho, ": x must be [T, K] (each expert's rows in turn), got shape ", x.sizes());
  TORCH_CHECK_VALUE(qweight.dim() == 3 && scales.dim() == 3 && scales.size(0) == qweight.size(0), kWho,
                    ": qweight and scales must be stacked per expert, [E, N, ...], got shapes ", qweight.sizes(),
                    " and ", scales.sizes());
  const int64_t experts = qweight.size(0);
  check_stacked(zeros, "zeros", experts, 3);
  check_stacked(bias, "bias", experts, 2);
  TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == experts, kWho, ": counts must hold one row count per expert (",
                    experts, "), got ", counts.size());
  int64_t total = 0;
  for (const int64_t c : counts) {
    TORCH_CHECK_VALUE(c >= 0, kWho, ": counts must be >= 0, got ", counts);
    total += c;
  }
  TORCH_CHECK_VALUE(total == x.size(0), kWho, ": counts must sum to x's ", x.size(0), " rows, got ", total);
  std::vector<at::Tensor> parts;
  int64_t start = 0;
  for (int64_t e = 0; e < experts; ++e) {
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

TORCH_LIBRARY_IMPL(linquant, CompositeImplicitAutograd, m) { m.impl("grouped_linear", &linquant::grouped_linear_composite); }
