// linquant::QExpertsWeight (csrc/include/linquant/qexperts.h): the C++ twin of
// python/linquant/experts.py's QExpertsWeight, built from the public op functions.
#include "linquant/qexperts.h"

#include <ATen/ATen.h>

#include "linquant/ops.h"
#include "quantized_module.h"

namespace linquant {

QExpertsWeightImpl::QExpertsWeightImpl(int64_t num_experts_, int64_t in_features_, int64_t out_features_,
                                       QLinearOptions options_, at::ScalarType dtype)
    : num_experts(num_experts_),
      in_features(in_features_),
      out_features(out_features_),
      options(options_),
      dtype_(dtype) {
  detail::check_format(
      kName, {{"num_experts", num_experts}, {"in_features", in_features}, {"out_features", out_features}},
      in_features, options, dtype);
  reset();
}

void QExpertsWeightImpl::reset() {
  auto b = detail::register_format(*this, {num_experts}, out_features, in_features, options, dtype_);
  qweight = b.qweight, scales = b.scales, zeros = b.zeros;
}

std::shared_ptr<QExpertsWeightImpl> QExpertsWeightImpl::from_weight(const at::Tensor& weight, QLinearOptions options,
                                                                    ScaleMethod method) {
  detail::check_defined(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 3, kName, ": weight must be [num_experts, out_features, in_features], got shape ",
                    weight.sizes());
  const at::Tensor w = weight.detach();
  auto experts = std::make_shared<QExpertsWeightImpl>(w.size(0), w.size(2), w.size(1), options, w.scalar_type());
  for (int64_t e = 0; e < experts->num_experts; ++e) {  // one expert's temporaries at a time
    QuantizedWeight qw;
    try {
      qw = quantize_weight(w[e], options, method);
    } catch (const c10::ValueError& err) {  // NaN or infinite weights: say which expert
      C10_THROW_ERROR(ValueError, std::string(kName) + ": expert " + std::to_string(e) + ": " +
                                      err.what_without_backtrace());
    }
    experts->qweight[e].copy_(qw.qweight);
    experts->scales[e].copy_(qw.scales.reshape(experts->scales[e].sizes()));
    if (!options.symmetric) experts->zeros[e].copy_(qw.zeros.reshape(experts->zeros[e].sizes()));
  }
  return experts;
}

at::Tensor QExpertsWeightImpl::linear(const at::Tensor& x, int64_t expert, const at::Tensor& bias) const {
  detail::check_defined(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, kName, ": x must have in_features=", in_features,
                    " in its last dim, got shape ", x.sizes());
  TORCH_CHECK_INDEX(expert >= 0 && expert < num_experts, kName, ": expert must be in [0, ", num_experts, "), got ",
                    expert);
  return linquant::linear(x, qweight[expert], scales[expert],
                          zeros.defined() ? std::optional<at::Tensor>(zeros[expert]) : std::nullopt,
                          detail::optional_of(bias), options.bits, options.group_size);
}

at::Tensor QExpertsWeightImpl::grouped_linear(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& bias) const {
  detail::check_defined(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in_features, kName, ": x must be [rows, in_features=", in_features,
                    "], got shape ", x.sizes());
  return linquant::grouped_linear(x, counts, qweight, scales, detail::optional_of(zeros), detail::optional_of(bias),
                                  options.bits, options.group_size);
}

at::Tensor QExpertsWeightImpl::dequantize() const {
  std::vector<at::Tensor> weights;
  for (int64_t e = 0; e < num_experts; ++e) {
    weights.push_back(dequantize_weight(qweight[e], scales[e],
                                        zeros.defined() ? std::optional<at::Tensor>(zeros[e]) : std::nullopt,
                                        options.bits, options.group_size, in_features, scales.scalar_type()));
  }
  return num_experts ? at::stack(weights) : scales.new_empty({0, out_features, in_features});
}

void QExpertsWeightImpl::pretty_print(std::ostream& stream) const {
  stream << "linquant::QExpertsWeight(num_experts=" << num_experts << ", in_features=" << in_features
         << ", out_features=" << out_features << ", ";
  detail::print_format(stream, options, scales.scalar_type());
  stream << ")";
}

detail::NamedSizes QExpertsWeightImpl::format_record() const {
  return detail::format_record(options, {{"num_experts", num_experts}, {"in_features", in_features}, {"out_features", out_features}});
}

}  // namespace linquant
