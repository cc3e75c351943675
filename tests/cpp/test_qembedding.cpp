// linquant::QEmbedding: a torch::nn::Embedding's table quantized against the format's formulas,
// lookups against rows of that reference table, the tied head over the same memory, the format's
// checks, conversions, archives and clones.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>

#include "linquant/qembedding.h"
#include "error_of.h"
#include "reference_weight.h"

namespace {

using linquant::QEmbedding;
using linquant::QEmbeddingImpl;
using linquant::QLinearOptions;

TEST(QEmbeddingCpp, LookupsAreRowsOfTheFormatsTable) {
  torch::manual_seed(11);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [bits, group, symmetric] : {std::tuple{8, 48, true}, {8, 16, false}, {4, 16, false},
                                                 {4, 48, true}, {2, 8, false}, {2, 16, true}}) {
      torch::nn::Embedding emb(torch::nn::EmbeddingOptions(37, 48).padding_idx(-2));
      {
        torch::NoGradGuard no_grad;  // padding_idx's row, zeros, is not the reference's case (0 / 0)
        emb->weight.normal_();
      }
      emb->to(dtype);
      const std::optional<int64_t> g = group == 48 ? std::nullopt : std::optional<int64_t>(group);
      QEmbedding table(QEmbeddingImpl::from_embedding(emb, QLinearOptions{bits, g, symmetric}));
      const std::string where = std::to_string(bits) + " bits, group " + std::to_string(group) + ", " +
                                std::string(c10::toString(dtype));
      EXPECT_EQ(table->padding_idx, std::optional<int64_t>(35)) << where;
      EXPECT_EQ(table->scales.scalar_type(), dtype) << where;
      const at::Tensor ref = reference_weight(emb->weight.detach(), bits, group, symmetric);
      EXPECT_TRUE(at::equal(table->dequantize(), ref)) << where;
      // Any shape of int64 or int32 ids, repeats, the first and last token, none at all.
      const at::Tensor ids = torch::tensor({{0, 36, 5}, {5, 17, 36}}, at::kLong);
      for (const at::Tensor& i : {ids, ids.to(at::kInt), ids.t(), ids.flatten(), ids.new_empty({0, 4})}) {
        const at::Tensor out = table->forward(i);
        std::vector<int64_t> shape = i.sizes().vec();
        shape.push_back(48);
        EXPECT_EQ(out.sizes(), at::IntArrayRef(shape)) << where;
        EXPECT_TRUE(at::equal(out, ref.index_select(0, i.flatten().to(at::kLong)).reshape(shape))) << where;
      }
    }
  }
}

TEST(QEmbeddingCpp, APaddingRowOfZerosLooksUpZeros) {
  // torch::nn::Embedding zeroes its padding row: its scale is the smallest subnormal, not 0 / 0.
  torch::manual_seed(14);
  for (const auto& [bits, symmetric] : {std::pair{8, true}, {4, false}, {2, true}}) {
    torch::nn::Embedding emb(torch::nn::EmbeddingOptions(9, 16).padding_idx(4));
    QEmbedding table(QEmbeddingImpl::from_embedding(emb, QLinearOptions{bits, 8, symmetric}));
    const at::Tensor row = table->forward(torch::tensor({4}));
    EXPECT_TRUE(at::equal(row, at::zeros({1, 16}))) << bits << " bits: " << row;
    EXPECT_TRUE(at::isfinite(table->scales).all().item<bool>() && (table->scales > 0).all().item<bool>());
  }
}

TEST(QEmbeddingCpp, ATiedHeadSharesTheTablesMemory) {
  torch::manual_seed(12);
  torch::nn::Embedding emb(torch::nn::EmbeddingOptions(40, 32));
  QEmbedding table(QEmbeddingImpl::from_embedding(emb, QLinearOptions{4, 16, false}));
  const at::Tensor bias = torch::randn({40});
  linquant::QLinear head = table->tied_head(bias);
  EXPECT_EQ(head->in_features, 32);
  EXPECT_EQ(head->out_features, 40);
  EXPECT_EQ(head->qweight.data_ptr(), table->qweight.data_ptr());
  EXPECT_EQ(head->scales.data_ptr(), table->scales.data_ptr());
  EXPECT_EQ(head->zeros.data_ptr(), table->zeros.data_ptr());
  const at::Tensor ref = reference_weight(emb->weight.detach(), 4, 16, false);
  EXPECT_TRUE(at::equal(head->dequantize(), ref));
  // The head computes x @ table^T + bias: against float64, within fp32 accumulation.
  const at::Tensor x = torch::randn({3, 32});
  const at::Tensor want = at::linear(x.to(at::kDouble), ref.to(at::kDouble), bias.to(at::kDouble));
  const at::Tensor bound = at::linear(x.abs().to(at::kDouble), ref.abs().to(at::kDouble), bias.abs().to(at::kDouble)) * 2e-6;
  EXPECT_TRUE(((head->forward(x).to(at::kDouble) - want).abs() <= bound).all().item<bool>());
  EXPECT_FALSE(table->tied_head()->bias.defined());
  EXPECT_NE(error_of([&] { table->tied_head(torch::zeros({39})); }).find("the head's bias must be [40], got shape [39]"),
            std::string::npos);
}

TEST(QEmbeddingCpp, BadIdsAndOptionsRaiseSayingWhich) {
  QEmbedding table(10, 8, QLinearOptions{8, std::nullopt, true});
  EXPECT_TRUE(throws<c10::IndexError>([&] { table->forward(torch::tensor({0, 10})); },
                                      "linquant::QEmbedding: ids must be in [0, 10), got values from 0 to 10"));
  EXPECT_TRUE(throws<c10::IndexError>([&] { table->forward(torch::tensor({-1})); },
                                      "linquant::QEmbedding: ids must be in [0, 10), got values from -1 to -1"));
  EXPECT_NE(error_of([&] { table->forward(torch::tensor({3, 10, -1})); })
                .find("linquant::QEmbedding: ids must be in [0, 10), got values from -1 to 10"),
            std::string::npos);
  // One past the table alone: linquant's message, not index_select's.
  EXPECT_NE(error_of([&] { table->forward(torch::tensor({3, 10})); })
                .find("linquant::QEmbedding: ids must be in [0, 10), got values from 3 to 10"),
            std::string::npos);
  EXPECT_NO_THROW(table->forward(torch::tensor({0, 9})));
  EXPECT_TRUE(throws<c10::TypeError>([&] { table->forward(torch::tensor({1.0f})); },
                                     "linquant::QEmbedding: ids must be int64 or int32 indices, got Float"));
  EXPECT_TRUE(throws<c10::TypeError>([&] { table->forward(at::Tensor()); },
                                     "linquant: ids must be a tensor, got None (an undefined tensor)"));
  EXPECT_NE(error_of([] { QEmbedding(10, 8, QLinearOptions{3, std::nullopt, true}); })
                .find("linquant::QEmbedding: bits must be 8, 4 or 2, got 3"),
            std::string::npos);
  EXPECT_NE(error_of([] { QEmbedding(-1, 8, QLinearOptions{}); })
                .find("linquant::QEmbedding: num_embeddings must be >= 0, got -1"),
            std::string::npos);
  EXPECT_NE(error_of([] { QEmbedding(10, 8, QLinearOptions{4, 3, true}); }).find("group_size must be a positive multiple of 2"),
            std::string::npos);
  EXPECT_NE(error_of([] { QEmbedding(10, 8, QLinearOptions{}, 10); }).find("padding_idx must be within num_embeddings = 10"),
            std::string::npos);
  EXPECT_TRUE(throws<c10::ValueError>([&] { QEmbedding(10, 8, QLinearOptions{}, std::nullopt, at::kDouble); },
                                      "linquant::QEmbedding: dtype must be float32, float16 or bfloat16, got Double"));
  torch::nn::Embedding renorm(torch::nn::EmbeddingOptions(10, 8).max_norm(1.0));
  EXPECT_NE(error_of([&] { QEmbeddingImpl::from_embedding(renorm, {}); }).find("max_norm"), std::string::npos);
}

TEST(QEmbeddingCpp, PrintsConvertsSavesAndClones) {
  torch::manual_seed(13);
  torch::nn::Embedding emb(torch::nn::EmbeddingOptions(20, 16).padding_idx(0));
  QEmbedding table(QEmbeddingImpl::from_embedding(emb, QLinearOptions{4, 8, false}));
  std::ostringstream printed;
  printed << *table;
  EXPECT_EQ(printed.str(), "linquant::QEmbedding(20, 16, padding_idx=0, bits=4, group_size=8, asymmetric, dtype=Float)");
  // A dtype converts the scales only.
  table->to(at::kBFloat16);
  EXPECT_EQ(table->scales.scalar_type(), at::kBFloat16);
  EXPECT_EQ(table->qweight.scalar_type(), at::kByte);
  EXPECT_EQ(table->zeros.scalar_type(), at::kInt);
  EXPECT_TRUE(throws<c10::ValueError>([&] { table->to(at::kDouble); },
                                      "linquant::QEmbedding: dtype must be float32, float16 or bfloat16, got Double"));
  const at::Tensor ids = torch::tensor({3, 0, 19});
  // An archive loads into a table of the same format, and is refused by another.
  std::stringstream archive;
  torch::save(table, archive);
  QEmbedding same(20, 16, QLinearOptions{4, 8, false}, std::nullopt, at::kBFloat16);
  torch::load(same, archive);
  EXPECT_TRUE(at::equal(same->forward(ids), table->forward(ids)));
  std::stringstream again;
  torch::save(table, again);
  QEmbedding other(20, 16, QLinearOptions{2, 8, false});
  EXPECT_NE(error_of([&] { torch::load(other, again); })
                .find("linquant::QEmbedding: the archive holds a layer with bits = 4, this layer has 2"),
            std::string::npos);
  // clone() copies the buffers into storage of its own.
  auto copy = std::dynamic_pointer_cast<QEmbeddingImpl>(table->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(at::equal(copy->forward(ids), table->forward(ids)));
  EXPECT_NE(copy->qweight.data_ptr(), table->qweight.data_ptr());
  EXPECT_EQ(copy->padding_idx, table->padding_idx);
}

}  // namespace
