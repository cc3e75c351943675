// linquant::linear and grouped_linear under torch.autocast: x is cast to the autocast dtype, as
// for nn.Linear (a lower-precision op), so a QLinear in an fp32 model runs in fp16 / bf16 like the
// layers around it and takes the same kernels a model in that dtype would. scales and bias stay
// as stored: the kernels read them in any float dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "linquant/ops.h"
#include "quant_layout.h"  // check_defined

namespace linquant {
namespace {

template <c10::DeviceType D>
at::Tensor linear_autocast(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                           std::optional<int64_t> group_size) {
  check_defined(x, "x");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(D));
  return linear(at::autocast::cached_cast(at::autocast::get_autocast_dtype(D), x, D), qweight, scales, zeros, bias,
                bits, group_size);
}

template <c10::DeviceType D>
at::Tensor grouped_linear_autocast(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                                   const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                   const std::optional<at::Tensor>& bias, int64_t bits,
                                   std::optional<int64_t> group_size) {
  check_defined(x, "x");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(D));
  return grouped_linear(at::autocast::cached_cast(at::autocast::get_autocast_dtype(D), x, D), counts, qweight,
                        scales, zeros, bias, bits, group_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, AutocastCPU, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CPU>);
  m.impl("grouped_linear", &grouped_linear_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(linquant, AutocastCUDA, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CUDA>);
  m.impl("grouped_linear", &grouped_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace linquant
