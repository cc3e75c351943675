// The C++ API: linquant::QLinear from a torch::nn::Linear against an independently computed
// dequantized reference, and the op functions of linquant/ops.h.
#include <gtest/gtest.h>
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "linquant/ops.h"
#include "linquant/qlinear.h"

namespace {

TEST(QLinearCpp, Int8PerChannelMatchesTheAbsmaxReference) {
  torch::manual_seed(0);
  torch::nn::Linear lin(torch::nn::LinearOptions(70, 24));
  auto q = linquant::QLinearImpl::from_linear(lin, {8, std::nullopt, true});
  // Reference: s = max|w| / 127 per row, q = round(w / s), w_hat = s * q, all fp32 steps.
  const at::Tensor w = lin->weight.detach();
  const at::Tensor s = w.abs().amax(1, true) / 127;
  const at::Tensor ref = s * at::round(w / s).clamp(-128, 127);
  EXPECT_TRUE(at::equal(q->dequantize(), ref));
  const at::Tensor x = torch::randn({5, 70});
  const at::Tensor y = q->forward(x);
  EXPECT_TRUE(at::allclose(y, at::linear(x, ref, lin->bias.detach()), 1e-5, 1e-5));
}

TEST(QLinearCpp, SubByteForwardMatchesItsDequantizedWeight) {
  torch::manual_seed(1);
  torch::nn::Linear lin(torch::nn::LinearOptions(96, 40));
  for (int64_t bits : {4, 2}) {
    for (bool symmetric : {true, false}) {
      auto q = linquant::QLinearImpl::from_linear(lin, {bits, 32, symmetric});
      EXPECT_EQ(q->qweight.size(1), 96 * bits / 8);
      const at::Tensor w_hat = q->dequantize();
      const at::Tensor err = (w_hat - lin->weight.detach()).abs();
      EXPECT_LE(err.max().item<float>(), q->scales.max().item<float>() * 0.5001f);
      const at::Tensor x = torch::randn({3, 96});
      EXPECT_TRUE(at::allclose(q->forward(x), at::linear(x, w_hat, lin->bias.detach()), 1e-5, 1e-5));
    }
  }
}

TEST(QLinearCpp, BadOptionsRaise) {
  EXPECT_THROW(linquant::QLinear(16, 8, true, linquant::QLinearOptions{3, std::nullopt, true}), c10::ValueError);
  EXPECT_THROW(linquant::QLinear(16, 8, true, linquant::QLinearOptions{2, 6, true}), c10::ValueError);
}

TEST(QLinearCpp, InFeaturesChecked) {
  // 7 and 8 values pack into the same 4 bytes at 4 bits: only the layer can tell them apart.
  linquant::QLinear layer(8, 3, true, linquant::QLinearOptions{4, std::nullopt, false});
  EXPECT_THROW(layer->forward(at::randn({2, 7})), c10::ValueError);
  EXPECT_EQ(layer->forward(at::randn({2, 8})).sizes(), at::IntArrayRef({2, 3}));
}

TEST(QLinearCpp, BackwardGivesXAndBiasTheirGradients) {
  // Training through a frozen quantized layer from C++ alone (no Python registers anything here):
  // dx = dy @ W_hat and dbias = the sum of dy over rows, against the layer's own float weight.
  torch::manual_seed(2);
  torch::nn::Linear lin(torch::nn::LinearOptions(80, 24));
  for (bool symmetric : {true, false}) {
    auto q = linquant::QLinearImpl::from_linear(lin, {4, 16, symmetric});
    q->bias.requires_grad_(true);
    const at::Tensor x = torch::randn({2, 3, 80}).requires_grad_(true);
    const at::Tensor dy = torch::randn({2, 3, 24});
    q->forward(x).backward(dy);
    const at::Tensor w_hat = q->dequantize();
    EXPECT_TRUE(at::allclose(x.grad(), at::matmul(dy, w_hat), 1e-5, 1e-5));
    EXPECT_TRUE(at::allclose(q->bias.grad(), dy.sum({0, 1}), 1e-5, 1e-5));
    q->scales.requires_grad_(true);  // the weight is frozen: a gradient for it is refused
    EXPECT_THROW(q->forward(x).sum().backward(), c10::NotImplementedError);
  }
}

TEST(QLinearCpp, AutocastRunsInTheAutocastDtype) {
  // As nn.Linear under torch.autocast: x is cast to the autocast dtype, and so is y.
  torch::manual_seed(3);
  torch::nn::Linear lin(torch::nn::LinearOptions(64, 12));
  auto q = linquant::QLinearImpl::from_linear(lin, {8, std::nullopt, true});
  const at::Tensor x = torch::randn({4, 64});
  at::Tensor y;
  {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    y = q->forward(x);
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::clear_cache();
  }
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(y, q->forward(x.to(at::kBFloat16))));
  EXPECT_EQ(q->forward(x).scalar_type(), at::kFloat);  // and not once autocast is off
}

TEST(OpsCpp, DequantizeWeightIsTheFormatsFloatWeight) {
  // 2-bit symmetric values are stored offset by 2: byte 0b11100100 holds 0, 1, 2, 3, i.e. -2 .. 1.
  const at::Tensor packed = at::tensor({228}, at::kByte).reshape({1, 1});
  const at::Tensor scales = at::tensor({0.5f}).reshape({1, 1});
  const at::Tensor w = linquant::dequantize_weight(packed, scales, std::nullopt, 2, std::nullopt, 4, at::kFloat);
  EXPECT_TRUE(at::equal(w, at::tensor({-1.0f, -0.5f, 0.0f, 0.5f}).reshape({1, 4})));
  const at::Tensor zeros = at::tensor({1}, at::kInt).reshape({1, 1});  // asymmetric: s (q - z)
  EXPECT_TRUE(at::equal(linquant::dequantize_weight(packed, scales, zeros, 2, 4, 4, at::kHalf),
                        at::tensor({-0.5f, 0.0f, 0.5f, 1.0f}).reshape({1, 4}).to(at::kHalf)));
}

TEST(OpsCpp, PackRoundTrip) {
  const at::Tensor v = at::tensor({0, 1, 2, 3}, at::kByte);
  EXPECT_EQ(linquant::pack(v, 2).item<uint8_t>(), 228);
  EXPECT_TRUE(at::equal(linquant::unpack(linquant::pack(v, 2), 2, 4), v));
}

}  // namespace
