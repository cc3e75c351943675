// linquant::QExpertsWeight for the LibTorch C++ frontend: the Python QExpertsWeight's buffers and
// behaviour (docs/architecture.md, "Models"): one projection of a mixture's num_experts experts,
// each expert's [out_features, in_features] weight in the quantized-weight format of a QLinear,
// stacked ([E, out, packed in] qweight, [E, out, G] scales and zeros). The routing is the model's:
// linear(x, e) runs expert e's rows, grouped_linear all experts' at once.
#pragma once

#include <torch/nn/pimpl.h>

#include <ostream>

#include "linquant/qlinear.h"
#include "linquant/quantized_module.h"

namespace linquant {

// As QLinear: to(dtype) converts the scales only; torch::save / load carry and check the format.
class QExpertsWeightImpl : public QuantizedModule<QExpertsWeightImpl> {
 public:
  static constexpr const char* kName = "linquant::QExpertsWeight";

  QExpertsWeightImpl(int64_t num_experts, int64_t in_features, int64_t out_features, QLinearOptions options,
                     at::ScalarType dtype = at::kFloat);

  // Registers the buffers (zeros, scales of 1) for the format; clone() calls it on the copy.
  void reset() override;

  // Quantizes a float weight [num_experts, out_features, in_features], each expert as
  // quantize_weight quantizes a layer (scales in the weight's dtype).
  static std::shared_ptr<QExpertsWeightImpl> from_weight(const at::Tensor& weight, QLinearOptions options,
                                                         ScaleMethod method = ScaleMethod::kMinMax);

  // x [..., in_features] @ W_hat[expert]^T (+ bias [out_features]) through linquant::linear.
  at::Tensor linear(const at::Tensor& x, int64_t expert, const at::Tensor& bias = at::Tensor()) const;
  // Every expert at once: x [T, in_features] holds counts[e] rows of expert e in turn (+ bias
  // [num_experts, out_features]), through linquant::grouped_linear: one call, not one per expert.
  at::Tensor grouped_linear(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& bias = at::Tensor()) const;
  // The float weight [num_experts, out_features, in_features], in the scales' dtype.
  at::Tensor dequantize() const;
  // As the Python QExpertsWeight's repr.
  void pretty_print(std::ostream& stream) const override;

  // [bits, group_size (0: per-channel), symmetric, num_experts, in_features, out_features]
  detail::NamedSizes format_record() const;

  int64_t num_experts, in_features, out_features;
  QLinearOptions options;
  at::Tensor qweight, scales, zeros;  // zeros undefined when symmetric

 private:
  at::ScalarType dtype_;
};

TORCH_MODULE(QExpertsWeight);

}  // namespace linquant
