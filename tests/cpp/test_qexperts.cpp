// linquant::QExpertsWeight: each expert of a [E, out, in] weight quantized as the format's formulas
// give it, each expert's linear against float64 with that weight, the format's checks, conversions,
// archives and clones.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>

#include "linquant/qexperts.h"
#include "error_of.h"
#include "reference_weight.h"

namespace {

using linquant::QExpertsWeight;
using linquant::QExpertsWeightImpl;
using linquant::QLinearOptions;

TEST(QExpertsWeightCpp, EachExpertIsItsOwnQuantizedWeight) {
  torch::manual_seed(21);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [bits, group, symmetric] : {std::tuple{8, 64, true}, {8, 16, false}, {4, 32, false},
                                                 {4, 64, true}, {2, 16, false}}) {
      // Experts of different magnitudes: a shared scale or an expert mixed up would show.
      const at::Tensor w = (torch::randn({3, 24, 64}) * torch::tensor({0.5, 4.0, 0.01}).view({3, 1, 1})).to(dtype);
      const std::optional<int64_t> g = group == 64 ? std::nullopt : std::optional<int64_t>(group);
      QExpertsWeight experts(QExpertsWeightImpl::from_weight(w, QLinearOptions{bits, g, symmetric}));
      const std::string where = std::to_string(bits) + " bits, group " + std::to_string(group) + ", " +
                                std::string(c10::toString(dtype));
      EXPECT_EQ(experts->qweight.sizes(), at::IntArrayRef({3, 24, 64 * bits / 8})) << where;
      EXPECT_EQ(experts->scales.scalar_type(), dtype) << where;
      const at::Tensor dequantized = experts->dequantize();
      const at::Tensor x = torch::randn({5, 64}).to(dtype), bias = torch::randn({24}).to(dtype);
      for (int64_t e = 0; e < 3; ++e) {
        const at::Tensor ref = reference_weight(w[e], bits, group, symmetric);
        EXPECT_TRUE(at::equal(dequantized[e], ref)) << where << ", expert " << e;
        const at::Tensor x64 = x.to(at::kDouble), w64 = ref.to(at::kDouble), b64 = bias.to(at::kDouble);
        const double rel = dtype == at::kFloat ? 2e-6 : dtype == at::kHalf ? 1e-3 : 4e-3;
        const at::Tensor bound = (at::linear(x64.abs(), w64.abs()) + b64.abs()) * rel + 1e-30;
        EXPECT_TRUE(((experts->linear(x, e, bias).to(at::kDouble) - at::linear(x64, w64, b64)).abs() <= bound)
                        .all().item<bool>()) << where << ", expert " << e;
        EXPECT_TRUE(((experts->linear(x, e).to(at::kDouble) - at::linear(x64, w64)).abs() <=
                     at::linear(x64.abs(), w64.abs()) * rel + 1e-30).all().item<bool>()) << where << ", expert " << e;
      }
    }
  }
}

TEST(QExpertsWeightCpp, GroupedLinearIsEachExpertsLinear) {
  // Rows of experts 0 and 2 in turn (none of 1): each block as that expert's linear, bit for bit.
  torch::manual_seed(23);
  QExpertsWeight experts(QExpertsWeightImpl::from_weight(torch::randn({3, 8, 32}), QLinearOptions{4, 16, false}));
  const at::Tensor x = torch::randn({7, 32}), bias = torch::randn({3, 8});
  const at::Tensor y = experts->grouped_linear(x, {4, 0, 3}, bias);
  EXPECT_TRUE(at::equal(y, at::cat({experts->linear(x.narrow(0, 0, 4), 0, bias[0]),
                                    experts->linear(x.narrow(0, 4, 3), 2, bias[2])})));
  EXPECT_EQ(experts->grouped_linear(x.narrow(0, 0, 0), {0, 0, 0}).sizes(), at::IntArrayRef({0, 8}));
  EXPECT_NE(error_of([&] { experts->grouped_linear(x, {4, 0, 2}); }).find("counts must sum to x's 7 rows, got 6"),
            std::string::npos);
  EXPECT_NE(error_of([&] { experts->grouped_linear(x.narrow(1, 0, 16), {4, 0, 3}); })
                .find("x must be [rows, in_features=32], got shape [7, 16]"),
            std::string::npos);
}

TEST(QExpertsWeightCpp, BadArgumentsRaiseSayingWhich) {
  QExpertsWeight experts(2, 16, 8, QLinearOptions{4, 8, false});
  EXPECT_TRUE(throws<c10::IndexError>([&] { experts->linear(torch::randn({3, 16}), 2); },
                                      "linquant::QExpertsWeight: expert must be in [0, 2), got 2"));
  EXPECT_NE(error_of([&] { experts->linear(torch::randn({3, 16}), -1); })
                .find("linquant::QExpertsWeight: expert must be in [0, 2), got -1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { experts->linear(torch::randn({3, 15}), 0); })
                .find("x must have in_features=16 in its last dim, got shape [3, 15]"),
            std::string::npos);
  EXPECT_TRUE(throws<c10::TypeError>([&] { experts->linear(at::Tensor(), 0); },
                                     "linquant: x must be a tensor, got None (an undefined tensor)"));
  EXPECT_NE(error_of([] { QExpertsWeight(-2, 16, 8, QLinearOptions{}); })
                .find("linquant::QExpertsWeight: num_experts must be >= 0, got -2"),
            std::string::npos);
  EXPECT_NE(error_of([] { QExpertsWeightImpl::from_weight(torch::randn({16, 8}), QLinearOptions{}); })
                .find("weight must be [num_experts, out_features, in_features], got shape [16, 8]"),
            std::string::npos);
  at::Tensor w = torch::randn({3, 4, 8});
  w[2][1][5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(error_of([&] { QExpertsWeightImpl::from_weight(w, QLinearOptions{}); }).find("expert 2: "),
            std::string::npos);
  QExpertsWeight none(QExpertsWeightImpl::from_weight(torch::randn({0, 4, 8}), QLinearOptions{}));
  EXPECT_EQ(none->dequantize().sizes(), at::IntArrayRef({0, 4, 8}));
}

TEST(QExpertsWeightCpp, PrintsConvertsSavesAndClones) {
  torch::manual_seed(22);
  QExpertsWeight experts(QExpertsWeightImpl::from_weight(torch::randn({2, 8, 32}), QLinearOptions{2, 16, false}));
  std::ostringstream printed;
  printed << *experts;
  EXPECT_EQ(printed.str(), "linquant::QExpertsWeight(num_experts=2, in_features=32, out_features=8, bits=2, "
                           "group_size=16, asymmetric, dtype=Float)");
  experts->to(at::kHalf);
  EXPECT_EQ(experts->scales.scalar_type(), at::kHalf);
  EXPECT_EQ(experts->qweight.scalar_type(), at::kByte);
  const at::Tensor x = torch::randn({4, 32}).to(at::kHalf);
  std::stringstream archive;
  torch::save(experts, archive);
  QExpertsWeight same(2, 32, 8, QLinearOptions{2, 16, false}, at::kHalf);
  torch::load(same, archive);
  EXPECT_TRUE(at::equal(same->linear(x, 1), experts->linear(x, 1)));
  std::stringstream again;
  torch::save(experts, again);
  QExpertsWeight more(3, 32, 8, QLinearOptions{2, 16, false});
  EXPECT_NE(error_of([&] { torch::load(more, again); })
                .find("the archive holds a layer with num_experts = 2, this layer has 3"),
            std::string::npos);
  auto copy = std::dynamic_pointer_cast<QExpertsWeightImpl>(experts->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(at::equal(copy->linear(x, 0), experts->linear(x, 0)));
  EXPECT_NE(copy->scales.data_ptr(), experts->scales.data_ptr());
}

}  // namespace
