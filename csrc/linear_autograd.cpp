// Autograd of linquant::linear and grouped_linear, registered in C++ so that C++ programs get it
// as Python does: gradients for x and bias, the quantized weight frozen (a LoRA or a prompt
// trained through a quantized model). dx = dy @ W_hat, with W_hat dequantized in dy's dtype for
// the call, as bitsandbytes and quanto do: the packed weight is all that stays in memory. Asking
// for a gradient of scales raises.
#include <torch/autograd.h>
#include <torch/library.h>

#include "linquant/ops.h"
#include "quant_layout.h"  // check_defined

namespace linquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What both backward passes need of the forward's arguments: the quantized weight and its
// format, x's in_features and the bias dtype (none without a bias).
void save_weight(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                 std::optional<int64_t> group_size) {
  ctx->save_for_backward({qweight, scales, zeros.value_or(at::Tensor())});
  ctx->saved_data["bits"] = bits;
  ctx->saved_data["group_size"] = group_size.has_value() ? c10::IValue(*group_size) : c10::IValue();
  ctx->saved_data["in_features"] = x.size(-1);
  const bool with_bias = bias.has_value() && bias->defined();
  ctx->saved_data["bias_dtype"] = with_bias ? c10::IValue(bias->scalar_type()) : c10::IValue();
}

// W_hat [N, in_features] in dtype from the saved qweight, scales and zeros (saved: their list,
// zeros undefined if None), or expert e's from stacked ones.
at::Tensor saved_weight(AutogradContext* ctx, const variable_list& saved, at::ScalarType dtype,
                        std::optional<int64_t> e = std::nullopt) {
  const auto pick = [&](const at::Tensor& t) { return e.has_value() ? t[*e] : t; };
  const c10::IValue group = ctx->saved_data["group_size"];
  return dequantize_weight(pick(saved[0]), pick(saved[1]),
                           saved[2].defined() ? std::optional<at::Tensor>(pick(saved[2])) : std::nullopt,
                           ctx->saved_data["bits"].toInt(),
                           group.isNone() ? std::nullopt : std::optional<int64_t>(group.toInt()),
                           ctx->saved_data["in_features"].toInt(), dtype);
}

// The bias dtype when the bias needs a gradient, else None. needs_input_grad counts the tensor
// arguments that are there: x, qweight, scales, then bias after zeros when given.
std::optional<at::ScalarType> bias_grad_dtype(AutogradContext* ctx, const variable_list& saved) {
  const c10::IValue bias_dtype = ctx->saved_data["bias_dtype"];
  if (bias_dtype.isNone() || !ctx->needs_input_grad(saved[2].defined() ? 4 : 3)) return std::nullopt;
  return bias_dtype.toScalarType();
}

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
    save_weight(ctx, x, qweight, scales, zeros, bias, bits, group_size);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!ctx->needs_input_grad(2),
                                "linquant: linear has no gradient for scales (the quantized weight is frozen)");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& dy = grads[0];
    at::Tensor dx, dbias;
    if (ctx->needs_input_grad(0)) dx = dy.matmul(saved_weight(ctx, saved, dy.scalar_type()));
    if (const auto bias_dtype = bias_grad_dtype(ctx, saved)) {
      dbias = dy.reshape({-1, dy.size(-1)}).sum(0).to(*bias_dtype);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), dbias, at::Tensor(), at::Tensor()};
  }
};

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
    save_weight(ctx, x, qweight, scales, zeros, bias, bits, group_size);
    ctx->saved_data["counts"] = counts.vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!ctx->needs_input_grad(2),
                                "linquant: grouped_linear has no gradient for scales (the quantized weight is frozen)");
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const at::Tensor& dy = grads[0];
    const bool want_dx = ctx->needs_input_grad(0);
    const auto bias_dtype = bias_grad_dtype(ctx, saved);
    std::vector<at::Tensor> dx_parts;
    at::Tensor dbias = bias_dtype ? at::zeros({saved[0].size(0), saved[0].size(1)}, dy.options().dtype(*bias_dtype))
                                  : at::Tensor();
    int64_t start = 0;
    for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); start += counts[e], ++e) {
      if (counts[e] == 0) continue;
      const at::Tensor dy_e = dy.narrow(0, start, counts[e]);
      if (want_dx) dx_parts.push_back(dy_e.matmul(saved_weight(ctx, saved, dy.scalar_type(), e)));
      if (dbias.defined()) dbias[e].copy_(dy_e.sum(0));
    }
    at::Tensor dx;
    if (want_dx) {
      dx = dx_parts.empty() ? at::zeros({0, ctx->saved_data["in_features"].toInt()}, dy.options()) : at::cat(dx_parts);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), dbias, at::Tensor(), at::Tensor()};
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
