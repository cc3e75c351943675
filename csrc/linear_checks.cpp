#include "linear_checks.h"

#include <ATen/ATen.h>

#include "quant_layout.h"

namespace linquant {

LinearShape check_linear_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                              int64_t bits, std::optional<int64_t> group_size) {
  TORCH_CHECK_VALUE(bits == 8 || bits == 4 || bits == 2, "linquant: linear supports bits 8, 4 and 2, got ", bits);
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "linquant: x must have at least one dim [..., K], got a 0-dim tensor");
  for (const auto& [t, name] : {std::pair{&qweight, "qweight"}, std::pair{&scales, "scales"}}) {
    check_defined(*t, name);
    TORCH_CHECK_VALUE(t->device() == x.device(), "linquant: ", name, " is on ", t->device(),
                      " but x is on ", x.device());
  }
  LinearShape s;
  s.symmetric = !zeros.has_value();
  s.K = x.size(-1);
  s.M = s.K == 0 ? 0 : x.numel() / s.K;
  if (s.K == 0) {
    s.M = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) s.M *= x.size(d);
  }

  const at::ScalarType want_q = bits == 8 && s.symmetric ? at::kChar : at::kByte;
  TORCH_CHECK_VALUE(qweight.scalar_type() == want_q, "linquant: qweight must be ",
                    want_q == at::kChar ? "int8 (8-bit symmetric)" : "uint8 (packed, or 8-bit asymmetric)",
                    " for bits=", bits, s.symmetric ? " symmetric" : " asymmetric", ", got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2, "linquant: qweight must be 2-D [out_features, packed in_features], got ",
                    qweight.dim(), " dims");
  s.N = qweight.size(0);
  const int64_t per_byte = 8 / bits;
  // Not (K * bits + 7) / 8: an expanded x can have K near INT64_MAX, where K * bits wraps.
  s.row_bytes = s.K / per_byte + (s.K % per_byte != 0 ? 1 : 0);
  TORCH_CHECK_VALUE(qweight.size(1) == s.row_bytes, "linquant: x has in_features K=", s.K, ", which at ", bits,
                    " bits packs into ", s.row_bytes, " bytes per weight row, but qweight has ", qweight.size(1));

  if (group_size.has_value()) {
    const int64_t g = *group_size;
    TORCH_CHECK_VALUE(g >= 1 && g % per_byte == 0, "linquant: group_size must be a positive multiple of ",
                      per_byte, " at ", bits, " bits (groups start on byte boundaries), got ", g);
    // As choose_qparams counts them (none when K = 0), without the overflow of (K + g - 1) / g near
    // INT64_MAX. A group that covers the row is the per-channel layout below.
    s.groups = s.K == 0 ? 0 : (s.K - 1) / g + 1;
    s.group = s.groups == 1 ? s.row_bytes * per_byte : g;
  } else {
    s.group = s.row_bytes * per_byte;  // per-channel: one group per row, K rounded up to whole bytes
    s.groups = 1;
  }

  // [N, G] exactly (or [N] with one group): a transposed [G, N], as some other formats store their
  // scales, has the same element count and would run with every scale in the wrong place.
  const auto param_shape_ok = [&](const at::Tensor& t) {
    return (t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.groups) ||
           (t.dim() == 1 && s.groups == 1 && t.size(0) == s.N);
  };
  check_float_dtype(scales, "scales");
  TORCH_CHECK_VALUE(param_shape_ok(scales), "linquant: scales must be [", s.N, ", ", s.groups,
                    "] (out_features x ceil(K / group_size)), got shape ", scales.sizes());
  if (zeros.has_value()) {
    check_defined(*zeros, "zeros");
    TORCH_CHECK_VALUE(zeros->device() == x.device(), "linquant: zeros is on ", zeros->device(), " but x is on ",
                      x.device());
    check_zero_point_dtype(*zeros, "zeros");
    TORCH_CHECK_VALUE(param_shape_ok(*zeros), "linquant: zeros must be [", s.N, ", ", s.groups,
                      "] like scales, got shape ", zeros->sizes());
  }
  if (bias.has_value()) {
    check_defined(*bias, "bias");
    TORCH_CHECK_VALUE(bias->device() == x.device(), "linquant: bias is on ", bias->device(), " but x is on ",
                      x.device());
    check_float_dtype(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.N, "linquant: bias must be [out_features] = [", s.N,
                      "], got shape ", bias->sizes());
  }
  return s;
}

namespace {

constexpr const char* kGrouped = "linquant::grouped_linear";

// `t` (zeros or bias) holds one entry per expert of N rows: [E, N, ...] with E = experts.
void check_stacked(const std::optional<at::Tensor>& t, const char* name, int64_t experts, int64_t n, int64_t dims) {
  if (!t.has_value()) return;
  check_defined(*t, name);
  TORCH_CHECK_VALUE(t->dim() == dims && t->size(0) == experts && t->size(1) == n, kGrouped, ": ", name, " must be [",
                    experts, ", ", n, dims == 2 ? "" : ", G", "] (one per expert), got shape ", t->sizes());
}

}  // namespace

void check_grouped_linear_args(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                               const std::optional<at::Tensor>& bias) {
  check_defined(x, "x");
  check_defined(qweight, "qweight");
  check_defined(scales, "scales");
  TORCH_CHECK_VALUE(x.dim() == 2, kGrouped, ": x must be [T, K] (each expert's rows in turn), got shape ", x.sizes());
  TORCH_CHECK_VALUE(qweight.dim() == 3 && scales.dim() == 3 && scales.size(0) == qweight.size(0), kGrouped,
                    ": qweight and scales must be stacked per expert, [E, N, ...], got shapes ", qweight.sizes(),
                    " and ", scales.sizes());
  const int64_t experts = qweight.size(0);
  check_stacked(zeros, "zeros", experts, qweight.size(1), 3);
  check_stacked(bias, "bias", experts, qweight.size(1), 2);
  TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == experts, kGrouped,
                    ": counts must hold one row count per expert (", experts, "), got ", counts.size());
  // The first bad count is named, not the whole list (hundreds of experts in large MoE models).
  int64_t total = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    const int64_t c = counts[e];
    TORCH_CHECK_VALUE(c >= 0, kGrouped, ": counts must be >= 0, got counts[", e, "] = ", c);
    // Checked before adding: counts summing past INT64_MAX would otherwise wrap to a valid total.
    TORCH_CHECK_VALUE(c <= x.size(0) - total, kGrouped, ": counts must sum to x's ", x.size(0), " rows, got more from counts[",
                      e, "] = ", c, " on (the counts before it add up to ", total, ")");
    total += c;
  }
  TORCH_CHECK_VALUE(total == x.size(0), kGrouped, ": counts must sum to x's ", x.size(0), " rows, got ", total);
}

}  // namespace linquant
