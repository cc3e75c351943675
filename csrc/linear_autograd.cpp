// Autograd of linquant::linear and grouped_linear, registered in C++ so that C++ programs get it
// as Python does: gradients for x and bias, the quantized weight frozen (a LoRA or a prompt
// trained through a quantized model). dx = dy @ W_hat, with W_hat dequantized in dy's dtype for the call, as
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

// grouped_linear's: each expert's rows get linear's gradients, dx = dy_e @ W_hat_e and
// dbias[e] = sum of dy_e (zero for an expert no row took).
class GroupedLinearFunction : public torch::autograd::Function<GroupedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef counts,
                            const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                            const std::optional<at::Tensor>& bias, int64_t bits, std::optional<int64_t> group_size) {
    at::Tensor y;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      y = grouped_linear(x, counts, qweight, scales, zeros, bias, bits, group_size);
    }
    ctx->save_for_backward({qweight, scales, zeros.value_or(at::Tensor())});
    ctx->saved_data["counts"] = counts.vec();
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size.has_value() ? c10::IValue(*group_size) : c10::IValue();
    ctx->saved_data["in_features"] = x.size(-1);
    const bool with_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias_dtype"] = with_bias ? c10::IValue(bias->scalar_type()) : c10::IValue();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!ctx->needs_input_grad(2),
                                "linquant: grouped_linear has no gradient for scales (the quantized weight is frozen)");
    const variable_list saved = ctx->get_saved_variables();  // qweight, scales, zeros (undefined if None)
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const at::Tensor& dy = grads[0];
    const int64_t in_features = ctx->saved_data["in_features"].toInt();
    const c10::IValue group = ctx->saved_data["group_size"];
    const c10::IValue bias_dtype = ctx->saved_data["bias_dtype"];
    const bool want_dx = ctx->needs_input_grad(0);
    const bool want_dbias = !bias_dtype.isNone() && ctx->needs_input_grad(saved[2].defined() ? 4 : 3);
    std::vector<at::Tensor> dx_parts;
    at::Tensor dbias = want_dbias ? at::zeros({saved[0].size(0), saved[0].size(1)}, dy.options().dtype(bias_dtype.toScalarType()))
                                  : at::Tensor();
    int64_t start = 0;
    for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); start += counts[e], ++e) {
      if (counts[e] == 0) continue;
      const at::Tensor dy_e = dy.narrow(0, start, counts[e]);
      if (want_dx) {
        dx_parts.push_back(dy_e.matmul(dequantize_weight(
            saved[0][e], saved[1][e], saved[2].defined() ? std::optional<at::Tensor>(saved[2][e]) : std::nullopt,
            ctx->saved_data["bits"].toInt(), group.isNone() ? std::nullopt : std::optional<int64_t>(group.toInt()),
            in_features, dy.scalar_type())));
      }
      if (want_dbias) dbias[e].copy_(dy_e.sum(0));
    }
    at::Tensor dx;
    if (want_dx) dx = dx_parts.empty() ? at::zeros({0, in_features}, dy.options()) : at::cat(dx_parts);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), dbias, at::Tensor(), at::Tensor()};
  }
};

at::Tensor grouped_linear_autograd(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                                   const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                   const std::optional<at::Tensor>& bias, int64_t bits,
                                   std::optional<int64_t> group_size) {
  check_defined(x, "x");
  check_defined(qweight, "qweight");
  check_defined(scales, "scales");
  return GroupedLinearFunction::apply(x, counts, qweight, scales, zeros, bias, bits, group_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("grouped_linear", &grouped_linear_autograd);
}

}  // namespace linquant
