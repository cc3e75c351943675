// Autograd of choose_qparams and dequantize, the quantize family's ops with a float output that
// depends on a float input. Neither has a gradient. Without a kernel at the Autograd key, torch's
// fallback marks their outputs as requiring grad and backward leaves None, with a warning at
// most: a scale learned through dequantize would silently never move.
// - choose_qparams (called on Parameters, as in quantizing a model) gives outputs that do not
//   require grad, as argmax does;
// - dequantize with a scale that requires grad is an error, as linear's scales are.
#include <torch/autograd.h>
#include <torch/library.h>

#include "linquant/ops.h"

namespace linquant {
namespace {

std::tuple<at::Tensor, at::Tensor> choose_qparams_autograd(const at::Tensor& x, int64_t bits, bool symmetric,
                                                           std::optional<int64_t> axis,
                                                           std::optional<int64_t> group_size) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return choose_qparams(x, bits, symmetric, axis, group_size);
}

at::Tensor dequantize_autograd(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                               std::optional<int64_t> axis, std::optional<int64_t> group_size,
                               std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(at::GradMode::is_enabled() && scale.requires_grad()),
                              "linquant: dequantize has no gradient for scale (the quantized values are fixed); "
                              "pass scale.detach(), or dequantize under torch.no_grad()");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return dequantize(q, scale, zero_point, axis, group_size, dtype);
}

}  // namespace
}  // namespace linquant

TORCH_LIBRARY_IMPL(linquant, Autograd, m) {
  m.impl("choose_qparams", &linquant::choose_qparams_autograd);
  m.impl("dequantize", &linquant::dequantize_autograd);
}
