// The C++ API: linquant::QLinear from a torch::nn::Linear against an independently computed
// dequantized reference, and the op functions of linquant/ops.h.
#include <gtest/gtest.h>
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <sstream>

#include "error_of.h"
#include "linquant/ops.h"
#include "linquant/qlinear.h"
#include "reference_weight.h"

namespace {

// Each group's squared error (float64, [N, K / group]) of w_hat against w.
at::Tensor group_sse(const at::Tensor& w_hat, const at::Tensor& w, int64_t group) {
  const int64_t n = w.size(0), k = w.size(1);
  return (w_hat.to(at::kDouble) - w.to(at::kDouble)).square().view({n, k / group, group}).sum(-1);
}

TEST(QLinearCpp, MseScalesAreEachGroupsBestClippingRatio) {
  // Heavy-tailed rows, where clipping pays: every group's error is the least of the 21 reference
  // candidates (so never above minmax's), and from_linear holds the same scales.
  torch::manual_seed(7);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor w = (torch::randn({6, 96}) * torch::rand({6, 96}).pow(4) * 3).to(dtype);
    for (const auto& [bits, group, symmetric] : {std::tuple{4, 32, false}, {2, 16, true}, {8, 96, true},
                                                 {2, 96, false}}) {
      const std::optional<int64_t> g = group == 96 ? std::nullopt : std::optional<int64_t>(group);
      const linquant::QLinearOptions options{bits, g, symmetric};
      const linquant::QuantizedWeight qw = linquant::quantize_weight(w, options, linquant::ScaleMethod::kMse);
      const std::optional<at::Tensor> z = symmetric ? std::nullopt : std::optional<at::Tensor>(qw.zeros);
      const at::Tensor got = group_sse(linquant::dequantize_weight(qw.qweight, qw.scales, z, bits, g, 96, at::kFloat),
                                       w, group);
      std::vector<at::Tensor> candidates;
      for (int i = 0; i <= 20; ++i) {
        candidates.push_back(group_sse(reference_candidate(w, 1.0 - i / 40.0, bits, group, symmetric), w, group));
      }
      const at::Tensor best = std::get<0>(at::stack(candidates).min(0));
      const std::string where = std::to_string(bits) + " bits, group " + std::to_string(group);
      EXPECT_TRUE((got <= best * (1 + 1e-9)).all().item<bool>()) << where << ", " << dtype;
      EXPECT_TRUE((got <= candidates[0] * (1 + 1e-9)).all().item<bool>()) << where << ", " << dtype;
      if (bits < 8) {  // braces: EXPECT_* expands to an if / else
        EXPECT_LT(got.sum().item<double>(), candidates[0].sum().item<double>()) << where;
      }
      torch::nn::Linear lin(torch::nn::LinearOptions(96, 6).bias(false));
      lin->to(dtype);
      torch::NoGradGuard no_grad;
      lin->weight.copy_(w);
      auto layer = linquant::QLinearImpl::from_linear(lin, options, linquant::ScaleMethod::kMse);
      EXPECT_TRUE(at::equal(layer->scales, qw.scales) && at::equal(layer->qweight, qw.qweight)) << where;
    }
  }
}

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

TEST(QLinearCpp, EveryFormatAndDtypeMatchesTheFormulas) {
  torch::manual_seed(1);
  for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    torch::nn::Linear lin(torch::nn::LinearOptions(96, 40));
    lin->to(dtype);
    const at::Tensor w = lin->weight.detach(), b = lin->bias.detach();
    for (int64_t bits : {8, 4, 2}) {
      for (bool symmetric : {true, false}) {
        for (const int64_t group : {32, 96}) {  // 96 = K: what per-channel gives
          const std::optional<int64_t> g = group == 96 ? std::nullopt : std::optional<int64_t>(group);
          auto q = linquant::QLinearImpl::from_linear(lin, {bits, g, symmetric});
          EXPECT_EQ(q->qweight.size(1), 96 * bits / 8);
          const at::Tensor ref = reference_weight(w, bits, group, symmetric);
          EXPECT_TRUE(at::equal(q->dequantize(), ref)) << bits << " bits, group " << group << ", " << dtype;
          // Forward: x in the layer's dtype against the float64 product with the reference weight,
          // within fp32 accumulation and the output's rounding (relative to sum |x| |w|; a dropped
          // term of K = 96 would be about 1e-2 of it).
          const at::Tensor x = torch::randn({3, 96}).to(dtype);
          const at::Tensor x64 = x.to(at::kDouble), w64 = ref.to(at::kDouble);
          const at::Tensor want = at::linear(x64, w64, b.to(at::kDouble));
          const at::Tensor err = (q->forward(x).to(at::kDouble) - want).abs();
          const double rel = dtype == at::kFloat ? 2e-6 : dtype == at::kHalf ? 1e-3 : 4e-3;
          const at::Tensor bound = (at::linear(x64.abs(), w64.abs()) + b.to(at::kDouble).abs()) * rel + 1e-30;
          EXPECT_TRUE((err <= bound).all().item<bool>()) << bits << " bits, group " << group << ", " << dtype;
        }
      }
    }
  }
}

TEST(QLinearCpp, QuantizeWeightGivesTheFormat) {
  // The format's tensors themselves: their float weight is the formulas', and the layer built from
  // the same weight holds exactly them.
  torch::manual_seed(5);
  const at::Tensor w = torch::randn({12, 64}).to(at::kBFloat16);
  for (int64_t bits : {8, 4, 2}) {
    for (bool symmetric : {true, false}) {
      const linquant::QuantizedWeight qw = linquant::quantize_weight(w, {bits, 16, symmetric});
      EXPECT_EQ(qw.qweight.sizes(), at::IntArrayRef({12, 64 * bits / 8}));
      EXPECT_EQ(qw.qweight.scalar_type(), bits == 8 && symmetric ? at::kChar : at::kByte);
      EXPECT_EQ(qw.scales.sizes(), at::IntArrayRef({12, 4}));
      EXPECT_EQ(qw.scales.scalar_type(), at::kBFloat16);
      EXPECT_EQ(qw.zeros.defined(), !symmetric);
      const std::optional<at::Tensor> z = symmetric ? std::nullopt : std::optional<at::Tensor>(qw.zeros);
      EXPECT_TRUE(at::equal(linquant::dequantize_weight(qw.qweight, qw.scales, z, bits, 16, 64, at::kBFloat16),
                            reference_weight(w, bits, 16, symmetric)));
    }
  }
  EXPECT_TRUE(throws<c10::ValueError>([&] { linquant::quantize_weight(w.flatten(), {}); },
                                      "linquant::quantize_weight: w must be a 2-D weight [out, in], got shape [768]"));
  EXPECT_TRUE(throws<c10::ValueError>([&] { linquant::quantize_weight(w, {3, std::nullopt, true}); },
                                      "linquant::quantize_weight: bits must be 8, 4 or 2, got 3"));
  EXPECT_TRUE(throws<c10::TypeError>([&] { linquant::quantize_weight(at::Tensor(), {}); },
                                     "linquant: w must be a tensor, got None (an undefined tensor)"));
}

TEST(QLinearCpp, AsymmetricWeightsComeBackWithinHalfAStoredStep) {
  // bf16 / fp16 weights far from 0: their asymmetric scales are rounded up in the weight's dtype
  // and the zero points chosen for the stored scales, so every weight is within half a stored step
  // (with the fp32 scale's zero point, 8-bit N(1, 0.1) groups in bf16 were up to 2.7 steps off).
  torch::manual_seed(6);
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    const at::Tensor w = (torch::randn({16, 256}) * 0.1 + 1).to(dtype);
    for (int64_t bits : {8, 4}) {
      const linquant::QuantizedWeight qw = linquant::quantize_weight(w, {bits, 64, false});
      const at::Tensor step = qw.scales.to(at::kDouble).repeat_interleave(64, 1);
      const at::Tensor err =
          (linquant::dequantize_weight(qw.qweight, qw.scales, qw.zeros, bits, 64, 256, at::kFloat).to(at::kDouble) -
           w.to(at::kDouble)).abs();
      EXPECT_LE((err / step).max().item<double>(), 0.5 + 1e-5) << bits << " bits, " << dtype;
    }
  }
}

TEST(QLinearCpp, WeightsAtTheirDtypesLargestValueComeBackFinite) {
  // fp16 weights at 65504: the 8-bit symmetric scale 65504 / 127 = 515.8 stored as 516 put the
  // weight's grid point at 127 x 516 = 65532, inf in fp16. One step down, 515.5, spans the row;
  // where no step down spans ([-1000, 65504] at 4 bits asymmetric: 4432), the weight takes the
  // grid point a step in (14 x 4432). Every format of fp16 / bf16 weights at their largest value:
  // finite, within a stored step. The numbers are weights.py's.
  const at::Tensor w16 =
      at::tensor({65504.0, 1.0, -3.0, 0.5, 2.0, 7.0, -1.0, 0.0, 65504.0, -1000.0, 3.0, 5.0, 2.0, 7.0, -1.0, 0.0})
          .view({2, 8}).to(at::kHalf);
  const linquant::QuantizedWeight sym8 = linquant::quantize_weight(w16, {8, std::nullopt, true});
  EXPECT_EQ(sym8.scales[0][0].item<double>(), 515.5);
  EXPECT_EQ(linquant::dequantize_weight(sym8.qweight, sym8.scales, std::nullopt, 8, std::nullopt, 8, at::kHalf)[0][0]
                .item<double>(), 65472.0);
  const linquant::QuantizedWeight asym4 = linquant::quantize_weight(w16, {4, std::nullopt, false});
  EXPECT_EQ(asym4.scales[1][0].item<double>(), 4432.0);
  EXPECT_EQ(linquant::dequantize_weight(asym4.qweight, asym4.scales, asym4.zeros, 4, std::nullopt, 8, at::kHalf)[1][0]
                .item<double>(), 62048.0);
  torch::manual_seed(8);
  for (const at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    const double top = dtype == at::kHalf ? 65504.0 : std::ldexp(255.0, 120);
    at::Tensor w = torch::randn({4, 32}, at::kDouble);
    w[0][3] = top, w[1][20] = -top;
    w[2] = top * (1 - torch::rand({32}, at::kDouble) * std::ldexp(1.0, -6));
    w = w.to(dtype);
    for (int64_t bits : {8, 4, 2}) {
      for (bool symmetric : {true, false}) {
        for (const std::optional<int64_t> g : {std::optional<int64_t>(16), std::optional<int64_t>()}) {
          const linquant::QuantizedWeight qw = linquant::quantize_weight(w, {bits, g, symmetric});
          const std::optional<at::Tensor> z = symmetric ? std::nullopt : std::optional<at::Tensor>(qw.zeros);
          const at::Tensor w_hat = linquant::dequantize_weight(qw.qweight, qw.scales, z, bits, g, 32, dtype);
          const at::Tensor step = qw.scales.to(at::kDouble).repeat_interleave(g.value_or(32), 1);
          const at::Tensor err = (w_hat.to(at::kDouble) - w.to(at::kDouble)).abs() / step;
          EXPECT_TRUE(w_hat.isfinite().all().item<bool>()) << bits << " bits, " << dtype;
          EXPECT_LT(err.max().item<double>(), 1.0) << bits << " bits, symmetric " << symmetric << ", " << dtype;
        }
      }
    }
  }
}

TEST(QLinearCpp, TinyFp16ScalesAreSubnormalNotClampedToTheSmallestNormal) {
  // Rows of +-1e-6 and +-3e-4 in fp16, 8 bits: the first's scale (1e-6 / 127) rounds to 0 in fp16
  // and is stored as 2^-24, its smallest subnormal; the second's (2.4e-6) is a subnormal kept as it
  // rounds, where fp16's smallest normal (6.1e-5) would leave its values 5 of 127 levels.
  torch::nn::Linear lin(torch::nn::LinearOptions(8, 2).bias(false));
  lin->to(at::kHalf);
  const at::Tensor sign = at::tensor({1.0, -1.0}).repeat({4});
  {
    torch::NoGradGuard no_grad;
    lin->weight[0].copy_(sign * 1e-6);
    lin->weight[1].copy_(sign * 3e-4);
  }
  auto q = linquant::QLinearImpl::from_linear(lin, {8, std::nullopt, true});
  const at::Tensor w = lin->weight.detach().to(at::kDouble);
  EXPECT_EQ(q->scales[0].item<double>(), std::ldexp(1.0, -24));
  const double s1 = q->scales[1].item<double>();
  EXPECT_EQ(s1, at::tensor(w[1].abs().max().item<double>() / 127, at::kFloat).to(at::kHalf).item<double>());
  EXPECT_LT(s1, 6.1e-5);
  EXPECT_LE((q->dequantize()[1].to(at::kDouble) - w[1]).abs().max().item<double>(), s1);
}

TEST(QLinearCpp, PrintsItsFormat) {
  std::ostringstream os;
  os << linquant::QLinear(64, 16, true, linquant::QLinearOptions{4, 32, false});
  EXPECT_EQ(os.str(), "linquant::QLinear(in_features=64, out_features=16, bias=true, bits=4, group_size=32, "
                      "asymmetric, dtype=Float)");
  os.str("");
  os << linquant::QLinear(8, 2, false, linquant::QLinearOptions{8, std::nullopt, true}, at::kBFloat16);
  EXPECT_EQ(os.str(), "linquant::QLinear(in_features=8, out_features=2, bias=false, bits=8, per-channel, symmetric, "
                      "dtype=BFloat16)");
}

TEST(QLinearCpp, BadOptionsRaise) {
  EXPECT_TRUE(throws<c10::ValueError>(
      [&] { linquant::QLinear(16, 8, true, linquant::QLinearOptions{3, std::nullopt, true}); },
      "linquant::QLinear: bits must be 8, 4 or 2, got 3"));
  EXPECT_TRUE(throws<c10::ValueError>([&] { linquant::QLinear(16, 8, true, linquant::QLinearOptions{2, 6, true}); },
                                      "linquant::QLinear: group_size must be a positive multiple of 4 at 2 bits"));
}

TEST(QLinearCpp, TooManyInFeaturesRaise) {
  EXPECT_TRUE(throws<c10::ValueError>(
      [&] { linquant::QLinear(std::numeric_limits<int64_t>::max() / 4, 1, false, linquant::QLinearOptions{}); },
      "linquant::QLinear: a row of 2305843009213693951 values is too large for 8 bits"));
}

TEST(QLinearCpp, ToDtypeConvertsOnlyTheFloatBuffers) {
  // As nn.Module.to in Python: the quantized values and zero points keep their integer dtypes, also
  // when the layer sits in a model that is converted.
  torch::manual_seed(3);
  torch::nn::Linear fp(torch::nn::LinearOptions(64, 8));
  torch::nn::Sequential model(linquant::QLinear(linquant::QLinearImpl::from_linear(fp, {4, 16, false})));
  auto layer = model[0]->as<linquant::QLinearImpl>();
  const at::Tensor q = layer->qweight.clone(), z = layer->zeros.clone();
  model->to(torch::kBFloat16);
  EXPECT_EQ(layer->qweight.scalar_type(), at::kByte);
  EXPECT_EQ(layer->zeros.scalar_type(), at::kInt);
  EXPECT_TRUE(at::equal(layer->qweight, q) && at::equal(layer->zeros, z));
  EXPECT_EQ(layer->scales.scalar_type(), at::kBFloat16);
  EXPECT_EQ(layer->bias.scalar_type(), at::kBFloat16);
  EXPECT_EQ(layer->named_buffers()["scales"].scalar_type(), at::kBFloat16);  // the registered buffer itself
  // It runs bf16 activations: against float64 with its (bf16-scaled) weight, to bf16 rounding of
  // the products' magnitude.
  const at::Tensor x = at::randn({3, 64}).to(at::kBFloat16);
  const at::Tensor x64 = x.to(at::kDouble), w64 = layer->dequantize().to(at::kDouble);
  const at::Tensor ref = at::matmul(x64, w64.t()) + layer->bias.to(at::kDouble);
  const at::Tensor bound = (at::matmul(x64.abs(), w64.abs().t()) + layer->bias.to(at::kDouble).abs()) * std::ldexp(1.0, -7);
  EXPECT_TRUE(((model->forward(x).to(at::kDouble) - ref).abs() <= bound).all().item<bool>());
  model->to(torch::Device(torch::kCPU), torch::kHalf);
  EXPECT_EQ(layer->qweight.scalar_type(), at::kByte);
  EXPECT_EQ(layer->scales.scalar_type(), at::kHalf);
  EXPECT_TRUE(throws<c10::ValueError>([&] { model->to(torch::kDouble); },
                                      "linquant::QLinear: dtype must be float32, float16 or bfloat16, got Double"));
}

TEST(QLinearCpp, LoadChecksTheFormatItWasSavedWith) {
  torch::manual_seed(4);
  torch::nn::Linear fp(torch::nn::LinearOptions(32, 6));
  linquant::QLinear saved(linquant::QLinearImpl::from_linear(fp, {4, 16, false}));
  std::stringstream archive;
  torch::save(saved, archive);
  const std::string bytes = archive.str();
  auto load_into = [&](linquant::QLinear layer) {
    std::stringstream in(bytes);
    torch::load(layer, in);
    return layer;
  };
  linquant::QLinear same = load_into(linquant::QLinear(32, 6, true, linquant::QLinearOptions{4, 16, false}));
  const at::Tensor x = at::randn({5, 32});
  EXPECT_TRUE(at::equal(same->forward(x), saved->forward(x)));
  auto message = [&](linquant::QLinear layer) {
    try {
      load_into(layer);
    } catch (const c10::ValueError& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(linquant::QLinear(32, 6, true, linquant::QLinearOptions{4, 16, true})).find("symmetric = 0, this layer has 1"),
            std::string::npos);
  EXPECT_NE(message(linquant::QLinear(32, 6, true, linquant::QLinearOptions{8, 16, false})).find("bits = 4, this layer has 8"),
            std::string::npos);
  EXPECT_NE(message(linquant::QLinear(32, 6, true, linquant::QLinearOptions{4, 32, false})).find("group_size"), std::string::npos);
  EXPECT_NE(message(linquant::QLinear(32, 6, true, linquant::QLinearOptions{4, std::nullopt, false})).find("group_size"), std::string::npos);
}

TEST(QLinearCpp, CloneDeepCopiesModelsHoldingIt) {
  // torch::nn::Cloneable: Module::clone() of a model with QLinear layers (refused before) copies
  // each layer's format and buffers (their dtypes too) into storage of its own.
  torch::manual_seed(6);
  torch::nn::Linear first(torch::nn::LinearOptions(48, 12));
  first->to(at::kBFloat16);
  torch::nn::Linear second(torch::nn::LinearOptions(12, 8).bias(false));
  torch::nn::Sequential model(linquant::QLinear(linquant::QLinearImpl::from_linear(first, {4, 16, false})),
                              torch::nn::ReLU(),
                              linquant::QLinear(linquant::QLinearImpl::from_linear(second, {8, std::nullopt, true})));
  const auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  ASSERT_TRUE(copy);
  const at::Tensor x = torch::randn({3, 48}).to(at::kBFloat16);
  EXPECT_TRUE(at::equal(copy->forward(x), model->forward(x)));
  for (size_t i : {0, 2}) {
    auto* mine = model[i]->as<linquant::QLinear>();
    auto* theirs = (*copy)[i]->as<linquant::QLinear>();
    ASSERT_TRUE(mine && theirs && mine != theirs);
    std::ostringstream a, b;
    mine->pretty_print(a);
    theirs->pretty_print(b);
    EXPECT_EQ(a.str(), b.str());  // sizes, bias, bits, granularity, mode, dtype
    const auto buffers = mine->named_buffers(), copied = theirs->named_buffers();
    ASSERT_EQ(buffers.size(), copied.size());
    for (const auto& buffer : buffers) {
      const at::Tensor& c = copied[buffer.key()];
      EXPECT_TRUE(at::equal(c, buffer.value())) << buffer.key();
      EXPECT_NE(c.data_ptr(), buffer.value().data_ptr()) << buffer.key();
    }
    EXPECT_EQ(theirs->qweight.data_ptr(), copied["qweight"].data_ptr());  // the members are the buffers
  }
  (*copy)[0]->as<linquant::QLinear>()->scales.mul_(2);
  EXPECT_FALSE(at::equal(copy->forward(x), model->forward(x)));
}

TEST(QLinearCpp, InFeaturesChecked) {
  // 7 and 8 values pack into the same 4 bytes at 4 bits: only the layer can tell them apart.
  linquant::QLinear layer(8, 3, true, linquant::QLinearOptions{4, std::nullopt, false});
  EXPECT_TRUE(throws<c10::ValueError>(
      [&] { layer->forward(at::randn({2, 7})); },
      "linquant::QLinear: x must have in_features=8 in its last dim, got shape [2, 7]"));
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
    const at::Tensor w_hat = reference_weight(lin->weight.detach(), 4, 16, symmetric);
    EXPECT_TRUE(at::allclose(x.grad(), at::matmul(dy, w_hat), 1e-5, 1e-5));
    EXPECT_TRUE(at::allclose(q->bias.grad(), dy.sum(at::IntArrayRef{0, 1}), 1e-5, 1e-5));
    q->scales.requires_grad_(true);  // the weight is frozen: a gradient for it is refused
    EXPECT_TRUE(throws<c10::NotImplementedError>(
        [&] { q->forward(x).sum().backward(); },
        "linquant: linear has no gradient for scales (the quantized weight is frozen)"));
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

TEST(OpsCpp, DequantizeWeightChecksItsArguments) {
  const at::Tensor q8 = at::zeros({2, 16}, at::kChar), s = at::ones({2, 1});
  EXPECT_TRUE(throws<c10::ValueError>(
      [&] { linquant::dequantize_weight(q8, s, std::nullopt, 12, std::nullopt, 16, at::kFloat); },
      "linquant: bits must be 8, 4 or 2, got 12"));
  EXPECT_TRUE(throws<c10::ValueError>(
      [&] { linquant::dequantize_weight(q8, s, std::nullopt, 8, std::nullopt, 999, at::kFloat); },
      "linquant: an 8-bit qweight must be [N, in_features=999], got shape [2, 16]"));
  EXPECT_TRUE(throws<c10::TypeError>(
      [&] { linquant::dequantize_weight(at::Tensor(), s, std::nullopt, 8, std::nullopt, 16, at::kFloat); },
      "linquant: qweight must be a tensor, got None (an undefined tensor)"));
  EXPECT_EQ(linquant::dequantize_weight(q8, s, std::nullopt, 8, std::nullopt, 16, at::kFloat).sizes(),
            at::IntArrayRef({2, 16}));
}

TEST(OpsCpp, AnUndefinedTensorIsATypeError) {
  // The dispatcher itself would say "no tensor arguments" for ops whose only tensor is missing.
  EXPECT_TRUE(throws<c10::TypeError>([&] { linquant::choose_qparams(at::Tensor(), 4, true); },
                                     "linquant: x must be a tensor, got None (an undefined tensor)"));
  EXPECT_TRUE(throws<c10::TypeError>([&] { linquant::pack(at::Tensor(), 4); },
                                     "linquant: q must be a tensor, got None (an undefined tensor)"));
  EXPECT_TRUE(throws<c10::TypeError>([&] { linquant::unpack(at::Tensor(), 4, 8); },
                                     "linquant: packed must be a tensor, got None (an undefined tensor)"));
  EXPECT_TRUE(throws<c10::TypeError>([&] { linquant::quantize(at::Tensor(), at::ones({1}), std::nullopt, 8); },
                                     "linquant: x must be a tensor, got None (an undefined tensor)"));
}

TEST(OpsCpp, PackRoundTrip) {
  const at::Tensor v = at::tensor({0, 1, 2, 3}, at::kByte);
  EXPECT_EQ(linquant::pack(v, 2).item<uint8_t>(), 228);
  EXPECT_TRUE(at::equal(linquant::unpack(linquant::pack(v, 2), 2, 4), v));
}

}  // namespace
