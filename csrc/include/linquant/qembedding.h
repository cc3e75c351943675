// linquant::QEmbedding for the LibTorch C++ frontend: the Python QEmbedding's buffers and behaviour
// (docs/architecture.md, "Models"): a token table [num_embeddings, embedding_dim] in the
// quantized-weight format (rows = tokens, groups along the embedding), of which a lookup
// dequantizes only the rows it reads; a head tied to it is a QLinear over the very same memory.
#pragma once

#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <ostream>

#include "linquant/qlinear.h"
#include "linquant/quantized_module.h"

namespace linquant {

// As QLinear: to(dtype) converts the scales only; torch::save / load carry and check the format.
class QEmbeddingImpl : public QuantizedModule<QEmbeddingImpl> {
 public:
  static constexpr const char* kName = "linquant::QEmbedding";

  QEmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim, QLinearOptions options,
                 std::optional<int64_t> padding_idx = std::nullopt, at::ScalarType dtype = at::kFloat);

  // Registers the buffers (zeros, scales of 1) for the format; clone() calls it on the copy.
  void reset() override;

  // Quantizes a torch::nn::Embedding's table, each token's row per channel or per group. One with
  // max_norm is refused: it rewrites the rows it looks up, which a quantized table cannot.
  static std::shared_ptr<QEmbeddingImpl> from_embedding(const torch::nn::Embedding& embedding, QLinearOptions options,
                                                        ScaleMethod method = ScaleMethod::kMinMax);

  // ids (int64 or int32, any shape) -> [*ids.shape, embedding_dim] in the scales' dtype. Ids
  // outside [0, num_embeddings) are an IndexError on the CPU (CUDA's index_select asserts).
  at::Tensor forward(const at::Tensor& ids);
  // The float table [num_embeddings, embedding_dim], in the scales' dtype.
  at::Tensor dequantize() const;
  // A QLinear computing x @ table^T (+ bias): a language model's output head tied to its token
  // embedding. Its qweight, scales and zeros share this table's memory: no second copy.
  QLinear tied_head(const at::Tensor& bias = at::Tensor()) const;
  // As the Python QEmbedding's repr.
  void pretty_print(std::ostream& stream) const override;

  // [bits, group_size (0: per-channel), symmetric, num_embeddings, embedding_dim]
  detail::NamedSizes format_record() const;

  int64_t num_embeddings, embedding_dim;
  QLinearOptions options;
  std::optional<int64_t> padding_idx;  // kept for the record, as nn.Embedding's: lookups do not use it
  at::Tensor qweight, scales, zeros;   // zeros undefined when symmetric

 private:
  at::ScalarType dtype_;
};

TORCH_MODULE(QEmbedding);

}  // namespace linquant
