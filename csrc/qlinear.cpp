// linquant::QLinear (csrc/include/linquant/qlinear.h): the C++ twin of python/linquant/nn.py and
// weights.py, built from the public op functions.
#include "linquant/qlinear.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "core/quant_math.h"
#include "linquant/ops.h"
#include "quantized_module.h"

namespace linquant {
namespace {

std::optional<int64_t> axis_of(const QLinearOptions& o) {
  return o.group_size.has_value() ? std::nullopt : std::optional<int64_t>(0);
}

// The smallest positive value of a float dtype: 2^-24 in fp16, 2^-133 in bf16.
double smallest_subnormal(at::ScalarType t) {
  if (t == at::kHalf) return std::ldexp(1.0, -24);
  if (t == at::kBFloat16) return std::ldexp(1.0, -133);
  return std::numeric_limits<float>::denorm_min();
}

// The largest finite value of a float dtype.
double largest_value(at::ScalarType t) {
  if (t == at::kHalf) return 65504.0;
  if (t == at::kBFloat16) return std::ldexp(255.0, 120);  // 0x7F7F
  return std::numeric_limits<float>::max();
}

}  // namespace

QLinearImpl::QLinearImpl(int64_t in_features_, int64_t out_features_, bool with_bias, QLinearOptions options_,
                         at::ScalarType dtype)
    : in_features(in_features_), out_features(out_features_), options(options_), with_bias_(with_bias), dtype_(dtype) {
  detail::check_format(kName, {{"in_features", in_features}, {"out_features", out_features}}, in_features, options,
                       dtype);
  reset();
}

void QLinearImpl::reset() {
  auto b = detail::register_format(*this, {}, out_features, in_features, options, dtype_);
  qweight = b.qweight, scales = b.scales, zeros = b.zeros;
  if (with_bias_) bias = register_buffer("bias", at::zeros({out_features}, at::TensorOptions(dtype_)));
}

namespace {

// t [N, K] as [N, G, g], the last group padded with `fill`.
at::Tensor by_group(const at::Tensor& t, int64_t g, double fill = 0.0) {
  const int64_t n = t.size(0), k = t.size(1), groups = k == 0 ? 0 : (k - 1) / g + 1;
  return at::constant_pad_nd(t, {0, groups * g - k}, fill).reshape({n, groups, g});
}

// Each row's (per-channel) or group's minimum and maximum of w in fp32, [N] or [N, G] each; 0 and 0
// for an empty one, as choose_qparams counts it.
std::pair<at::Tensor, at::Tensor> group_range(const at::Tensor& w, const QLinearOptions& o) {
  const at::Tensor wf = w.to(at::kFloat);
  if (!o.group_size.has_value()) {
    if (w.size(1) == 0) return {at::zeros({w.size(0)}, wf.options()), at::zeros({w.size(0)}, wf.options())};
    return {wf.amin(1), wf.amax(1)};
  }
  const double inf = std::numeric_limits<double>::infinity();
  return {by_group(wf, *o.group_size, inf).amin(-1), by_group(wf, *o.group_size, -inf).amax(-1)};
}

// Asymmetric scales as stored in a dtype that cannot hold them all exactly, and zero points chosen
// for the stored scales, round(-min / s): a scale rounded to nearest is kept where its range still
// reaches within half a step of the group's max (z within the kernels' exact range), else rounded
// up, so every weight comes back within half a stored step (weights.py's _spanning_asymmetric).
std::pair<at::Tensor, at::Tensor> spanning_asymmetric(const at::Tensor& w, at::Tensor stored, const QLinearOptions& o) {
  auto [mn, mx] = group_range(w, o);
  mn = mn.reshape(stored.sizes()), mx = mx.reshape(stored.sizes());
  const at::Tensor z = at::round(mn.neg().div(stored.to(at::kFloat))).to(at::kDouble);
  const at::Tensor s64 = stored.to(at::kDouble);
  const double levels = static_cast<double>((int64_t{1} << o.bits) - 1), limit = core::kZeroPointLimit - (levels + 1);
  const at::Tensor spans = (s64 * (levels - z)).ge(mx.to(at::kDouble) - 0.5 * s64).logical_and(z.abs().le(limit));
  const at::Tensor up = at::nextafter(stored, at::full_like(stored, std::numeric_limits<double>::infinity()));
  stored = at::where(spans.logical_or(up.isfinite().logical_not()), stored, up);
  return {stored, at::round(mn.neg().div(stored.to(at::kFloat))).to(at::kInt)};
}

// Per group, the least and the greatest value q whose weight s (q - z) is within +-top; whether any
// group's grid reaches past it (else no weight can).
struct CodesWithin {
  at::Tensor lo, hi;
  bool reaches;
};
CodesWithin codes_within(const at::Tensor& stored, const std::optional<at::Tensor>& zp, int bits, double top) {
  const at::Tensor s64 = stored.to(at::kDouble);
  const at::Tensor reach = at::floor(at::full_like(s64, top) / s64);  // steps from z
  const at::Tensor z = zp.has_value() ? zp->to(at::kDouble) : at::zeros_like(reach);
  const core::QRange r = core::q_range(bits, !zp.has_value());
  const at::Tensor lo = (z - reach).clamp_min(r.qmin), hi = (z + reach).clamp_max(r.qmax);
  return {lo, hi, lo.gt(r.qmin).logical_or(hi.lt(r.qmax)).any().item<bool>()};
}

// Per group, the grid points s (q - z) that its min and its max quantize to, [2, ...] in float64
// (exact: s (q - z) fits it).
at::Tensor end_points(const at::Tensor& mn, const at::Tensor& mx, const at::Tensor& stored,
                      const std::optional<at::Tensor>& zp, int bits) {
  const at::Tensor s = stored.to(at::kFloat);
  const at::Tensor z = zp.has_value() ? zp->to(at::kFloat) : at::zeros_like(s);
  const core::QRange r = core::q_range(bits, !zp.has_value());
  const at::Tensor s64 = s.to(at::kDouble);
  std::vector<at::Tensor> points;
  for (const at::Tensor& end : {mn, mx}) {
    points.push_back(s64 * ((at::round(end.div(s)) + z).clamp(r.qmin, r.qmax) - z).to(at::kDouble));
  }
  return at::stack(points);
}

// Stored scales (and zero points) one step down where the chosen scale puts the grid point of a
// group's min or max beyond w's dtype's largest value and one step down (its zero point chosen
// again, within the kernels' exact range) brings both within it and within half a step of them
// (weights.py's _within_dtype_max: fp16 weights at 65504 stored the 8-bit symmetric scale 515.8 as
// 516, and 127 x 516 came back inf; 515.5 spans).
std::pair<at::Tensor, std::optional<at::Tensor>> within_dtype_max(const at::Tensor& w, const at::Tensor& stored,
                                                                  std::optional<at::Tensor> zp, const QLinearOptions& o) {
  const double top = largest_value(w.scalar_type());
  if (!codes_within(stored, zp, o.bits, top).reaches) return {stored, zp};
  auto [mn, mx] = group_range(w, o);
  mn = mn.reshape(stored.sizes()), mx = mx.reshape(stored.sizes());
  const at::Tensor over = end_points(mn, mx, stored, zp, o.bits).abs().gt(top).any(0);
  const at::Tensor down = at::nextafter(stored, at::zeros_like(stored));
  std::optional<at::Tensor> zd;
  if (zp.has_value()) zd = at::round(mn.neg().div(down.to(at::kFloat))).to(at::kInt);
  const at::Tensor points = end_points(mn, mx, down, zd, o.bits);
  const at::Tensor spans = (points - at::stack({mn, mx}).to(at::kDouble)).abs().le(down.to(at::kDouble) / 2);
  at::Tensor take = over.logical_and(points.abs().le(top).logical_and(spans).all(0));
  if (zp.has_value()) {
    take = take.logical_and(zd->abs().le(core::kZeroPointLimit - static_cast<double>(int64_t{1} << o.bits)));
    zp = at::where(take, *zd, *zp);
  }
  return {at::where(take, down, stored), zp};
}

// choose_qparams' scale and zero point for w, the scale as stored (in w's dtype, as the Python side
// does): one that rounds to 0 there becomes the dtype's smallest subnormal (as weights.py does);
// asymmetric ones in fp16 / bf16 through spanning_asymmetric; groups at the dtype's limit through
// within_dtype_max.
std::tuple<at::Tensor, std::optional<at::Tensor>> stored_qparams(const at::Tensor& w, const QLinearOptions& o) {
  auto [scale, zp] = choose_qparams(w, o.bits, o.symmetric, axis_of(o), o.group_size);
  at::Tensor stored = scale.to(w.scalar_type());
  if (!o.symmetric && w.scalar_type() != at::kFloat) std::tie(stored, zp) = spanning_asymmetric(w, stored, o);
  std::optional<at::Tensor> z = o.symmetric ? std::nullopt : std::optional<at::Tensor>(zp);
  std::tie(stored, z) = within_dtype_max(w, stored, z, o);
  return {stored.clamp_min(smallest_subnormal(w.scalar_type())), z};
}

// quantize(w), each group's values kept to those whose weight s (q - z) is within w's dtype's
// largest value: where within_dtype_max kept a scale that puts a group's end beyond it, that
// weight takes the grid point one step in (weights.py's _values_within_dtype).
at::Tensor values_within_dtype(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& zp,
                               const QLinearOptions& o) {
  const at::Tensor q = quantize(w, scale, zp, o.bits, axis_of(o), o.group_size);
  auto [lo, hi, reaches] = codes_within(scale, zp, o.bits, largest_value(w.scalar_type()));
  if (!reaches) return q;
  if (o.group_size.has_value()) {
    lo = lo.repeat_interleave(*o.group_size, 1).slice(1, 0, w.size(1));
    hi = hi.repeat_interleave(*o.group_size, 1).slice(1, 0, w.size(1));
  }
  return at::clamp(q.to(at::kInt), lo.to(at::kInt), hi.to(at::kInt)).to(q.scalar_type());
}

// Each group's (or row's) squared error after quantizing w, summed in float64, shaped like scale.
at::Tensor group_errors(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& zp,
                        const QLinearOptions& o) {
  at::Tensor err = (dequantize(values_within_dtype(w, scale, zp, o), scale, zp, axis_of(o), o.group_size,
                               at::kFloat) - w).square();
  if (o.group_size.has_value()) err = by_group(err, *o.group_size);
  return err.sum(-1, /*keepdim=*/false, at::kDouble).reshape(scale.sizes());
}

// ScaleMethod::kMse: per group, the candidate of the least error, minmax's kept on ties.
void search_qparams(const at::Tensor& w, const QLinearOptions& o, at::Tensor& scale, std::optional<at::Tensor>& zp) {
  at::Tensor best = group_errors(w, scale, zp, o);
  for (int i = 1; i <= 20; ++i) {
    auto [s, z] = stored_qparams(w * (1.0 - i / 40.0), o);
    const at::Tensor err = group_errors(w, s, z, o);
    const at::Tensor better = err < best;
    best = at::where(better, err, best);
    scale = at::where(better, s, scale);
    if (zp.has_value()) zp = at::where(better, *z, *zp);
  }
}

}  // namespace

QuantizedWeight quantize_weight(const at::Tensor& w, QLinearOptions options, ScaleMethod method) {
  detail::check_defined(w, "w");
  TORCH_CHECK_VALUE(w.dim() == 2, "linquant::quantize_weight: w must be a 2-D weight [out, in], got shape ", w.sizes());
  TORCH_CHECK_VALUE(options.bits == 8 || options.bits == 4 || options.bits == 2,
                    "linquant::quantize_weight: bits must be 8, 4 or 2, got ", options.bits);
  auto [scale, zp] = stored_qparams(w, options);
  if (method == ScaleMethod::kMse) search_qparams(w, options, scale, zp);
  at::Tensor values = values_within_dtype(w, scale, zp, options);
  if (options.bits < 8) {
    if (options.symmetric) values = (values.to(at::kShort) + (1 << (options.bits - 1))).to(at::kByte);
    values = pack(values, options.bits);
  }
  const int64_t out = w.size(0);
  return {values, scale.reshape({out, -1}), zp.has_value() ? zp->reshape({out, -1}) : at::Tensor()};
}

std::shared_ptr<QLinearImpl> QLinearImpl::from_linear(const torch::nn::Linear& linear, QLinearOptions options,
                                                      ScaleMethod method) {
  const at::Tensor w = linear->weight.detach();
  const bool with_bias = linear->bias.defined();
  auto q = std::make_shared<QLinearImpl>(w.size(1), w.size(0), with_bias, options, w.scalar_type());
  const QuantizedWeight qw = quantize_weight(w, options, method);
  q->qweight.copy_(qw.qweight);
  q->scales.copy_(qw.scales.reshape(q->scales.sizes()));
  if (!options.symmetric) q->zeros.copy_(qw.zeros.reshape(q->zeros.sizes()));
  if (with_bias) q->bias.copy_(linear->bias.detach());
  return q;
}

at::Tensor QLinearImpl::forward(const at::Tensor& x) {
  // The op sees only packed bytes, so at 4 or 2 bits it cannot tell K = 7 from K = 8: check here.
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, "linquant::QLinear: x must have in_features=",
                    in_features, " in its last dim, got shape ", x.sizes());
  return linear(x, qweight, scales, detail::optional_of(zeros), detail::optional_of(bias), options.bits,
                options.group_size);
}

void QLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "linquant::QLinear(in_features=" << in_features << ", out_features=" << out_features
         << ", bias=" << (bias.defined() ? "true" : "false") << ", ";
  detail::print_format(stream, options, scales.scalar_type());
  stream << ")";
}

at::Tensor QLinearImpl::dequantize() const {
  return dequantize_weight(qweight, scales, detail::optional_of(zeros), options.bits, options.group_size, in_features,
                           scales.scalar_type());
}

detail::NamedSizes QLinearImpl::format_record() const {
  return detail::format_record(options, {{"in_features", in_features}, {"out_features", out_features}});
}

}  // namespace linquant
