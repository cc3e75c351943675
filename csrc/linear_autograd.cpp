// Autograd of linquant::linear, registered in C++ so that C++ programs get it as Python does:
// gradients for x and bias, the quantized weight frozen (a LoRA or a prompt trained through a
// quantized model). dx = dy @ W_hat, with W_hat dequantized in dy's dtype for the call, as
// bitsandbytes and quanto do: the packed weight is all that stays in memory. Asking for a gradient
// of scales raises.
#include <torch/autograd.h>
#include <torch/library.h>

#include "linquant/ops.h"
#include "quant_layout.h"  // check_defined

namespace linquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                            std::optional<int64_t> group_size) {
    at::Tensor y;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the backend kernel, not this one again
      y = linear(x, qweight, scales, zeros, bias, bits, group_size);  // checks the arguments first
    }
    ctx->save_for_backward({qweight, scales, zeros.value_or(at::Tensor())});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size.has_value() ? c10::IValue(*group_size) : c10::IValue();
    ctx->saved_data["in_features"] = x.size(-1);
    const bool with_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias_dtype"] = with_bias ? c10::IValue(bias->scalar_type()) : c10::IValue();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!ctx->needs_input_grad(2),
                                "linquant: linear has no gradient for scales (the quantized weight is frozen)");
    const variable_list saved = ctx->get_saved_variables();  // qweight, scales, zeros (undefined if None)
    const at::Tensor& dy = grads[0];
    at::Tensor dx, dbias;
    if (ctx->needs_input_grad(0)) {
      const c10::IValue group = ctx->saved_data["group_size"];
      const at::Tensor w_hat = dequantize_weight(
          saved[0], saved[1], saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt,
          ctx->saved_data["bits"].toInt(), group.isNone() ? std::nullopt : std::optional<int64_t>(group.toInt()),
          ctx->saved_data["in_features"].toInt(), dy.scalar_type());
      dx = dy.matmul(w_hat);
    }
    // needs_input_grad counts the tensor arguments that are there: bias follows zeros when given.
    const c10::IValue bias_dtype = ctx->saved_data["bias_dtype"];
    if (!bias_dtype.isNone() && ctx->needs_input_grad(saved[2].defined() ? 4 : 3)) {
      dbias = dy.reshape({-1, dy.size(-1)}).sum(0).to(bias_dtype.toScalarType());
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), dbias, at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                           std::optional<int64_t> group_size) {
  // A None tensor is named here: autograd's bookkeeping would fail on it with a message that does not.
  check_defined(x, "x");
  check_defined(qweight, "qweight");
  check_defined(scales, "scales");
  return LinearFunction::apply(x, qweight, scales, zeros, bias, bits, group_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, Autograd, m) { m.impl("linear", &linear_autograd); }

}  // namespace linquant
