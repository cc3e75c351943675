// linquant::QLinear for the LibTorch C++ frontend: the Python QLinear's buffers and behaviour
// (docs/architecture.md, "Quantized weight format"), running linquant::linear.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <ostream>

#include "linquant/quantized_module.h"

namespace linquant {

struct QLinearOptions {
  int64_t bits = 8;
  std::optional<int64_t> group_size;  // nullopt: per output channel
  bool symmetric = true;
};

// A float weight [out, in] in the quantized-weight format (Python: linquant.quantize_weight):
// qweight int8 / uint8 [out, in] or packed uint8 [out, ceil(in * bits / 8)], scales [out, G] in
// w's dtype, zeros [out, G] int32 (undefined when symmetric).
struct QuantizedWeight {
  at::Tensor qweight, scales, zeros;
};

// How quantize_weight chooses each group's scale and zero point (Python's `method`): kMinMax spans
// the group's range (absmax when symmetric); kMse tries the range shrunk by 1, 0.975, ..., 0.5
// (choose_qparams of w * ratio) and keeps, per group, the candidate with the least squared error
// (ties keep the larger range), 21 times the work. The format is the same either way.
enum class ScaleMethod { kMinMax, kMse };

QuantizedWeight quantize_weight(const at::Tensor& w, QLinearOptions options,
                                ScaleMethod method = ScaleMethod::kMinMax);

// Cloneable: module->clone() deep-copies a model holding QLinear layers (buffers copied, format kept).
// to(dtype) converts the scales and bias only; torch::save / load carry and check the format
// (QuantizedModule).
class QLinearImpl : public QuantizedModule<QLinearImpl> {
 public:
  static constexpr const char* kName = "linquant::QLinear";

  QLinearImpl(int64_t in_features, int64_t out_features, bool bias, QLinearOptions options,
              at::ScalarType dtype = at::kFloat);

  // Registers the buffers (zeros, scales of 1) for the format; clone() calls it on the copy.
  void reset() override;

  // Quantizes a torch::nn::Linear (its weight [out, in] and bias) into a new layer.
  static std::shared_ptr<QLinearImpl> from_linear(const torch::nn::Linear& linear, QLinearOptions options,
                                                  ScaleMethod method = ScaleMethod::kMinMax);

  at::Tensor forward(const at::Tensor& x);
  // The float weight [out, in] the layer computes with, in the scales' dtype.
  at::Tensor dequantize() const;
  // As the Python QLinear's repr: sizes, bias, bits, granularity, mode and dtype.
  void pretty_print(std::ostream& stream) const override;

  // [bits, group_size (0: per-channel), symmetric, in_features, out_features]
  detail::NamedSizes format_record() const;

  int64_t in_features, out_features;
  QLinearOptions options;
  at::Tensor qweight, scales, zeros, bias;  // zeros / bias undefined when absent

 private:
  bool with_bias_;
  at::ScalarType dtype_;  // of the buffers reset() makes; clone() then gives them the originals' data and dtype
};

TORCH_MODULE(QLinear);

}  // namespace linquant
