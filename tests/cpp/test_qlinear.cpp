// The C++ API: linquant::QLinear from a torch::nn::Linear against an independently computed
// dequantized reference, and the op functions of linquant/ops.h.
#include <gtest/gtest.h>
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

TEST(OpsCpp, PackRoundTrip) {
  const at::Tensor v = at::tensor({0, 1, 2, 3}, at::kByte);
  EXPECT_EQ(linquant::pack(v, 2).item<uint8_t>(), 228);
  EXPECT_TRUE(at::equal(linquant::unpack(linquant::pack(v, 2), 2, 4), v));
}

}  // namespace
