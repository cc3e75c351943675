// linquant::QEmbedding (csrc/include/linquant/qembedding.h): the C++ twin of
// python/linquant/embedding.py, built from the public op functions.
#include "linquant/qembedding.h"

#include <ATen/ATen.h>

#include "linquant/ops.h"
#include "quantized_module.h"

namespace linquant {
QEmbeddingImpl::QEmbeddingImpl(int64_t num_embeddings_, int64_t embedding_dim_, QLinearOptions options_,
                               std::optional<int64_t> padding_idx_, at::ScalarType dtype)
    : num_embeddings(num_embeddings_),
      embedding_dim(embedding_dim_),
      options(options_),
      padding_idx(padding_idx_),
      dtype_(dtype) {
  detail::check_format(kName, {{"num_embeddings", num_embeddings}, {"embedding_dim", embedding_dim}}, embedding_dim,
                       options, dtype);
  if (padding_idx.has_value()) {  // as torch::nn::Embedding: counted from the end when negative
    TORCH_CHECK_VALUE(*padding_idx >= -num_embeddings && *padding_idx < num_embeddings, kName,
                      ": padding_idx must be within num_embeddings = ", num_embeddings, ", got ", *padding_idx);
    if (*padding_idx < 0) *padding_idx += num_embeddings;
  }
  reset();
}

void QEmbeddingImpl::reset() {
  auto b = detail::register_format(*this, {}, num_embeddings, embedding_dim, options, dtype_);
  qweight = b.qweight, scales = b.scales, zeros = b.zeros;
}

std::shared_ptr<QEmbeddingImpl> QEmbeddingImpl::from_embedding(const torch::nn::Embedding& embedding,
                                                                QLinearOptions options, ScaleMethod method) {
  TORCH_CHECK_VALUE(!embedding->options.max_norm().has_value(), kName,
                    ": an embedding with max_norm rewrites its rows at each lookup; a quantized table cannot");
  const at::Tensor w = embedding->weight.detach();
  auto table = std::make_shared<QEmbeddingImpl>(w.size(0), w.size(1), options, embedding->options.padding_idx(),
                                                w.scalar_type());
  const QuantizedWeight qw = quantize_weight(w, options, method);
  table->qweight.copy_(qw.qweight);
  table->scales.copy_(qw.scales.reshape(table->scales.sizes()));
  if (!options.symmetric) table->zeros.copy_(qw.zeros.reshape(table->zeros.sizes()));
  return table;
}

at::Tensor QEmbeddingImpl::forward(const at::Tensor& ids) {
  detail::check_defined(ids, "ids");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, kName,
                   ": ids must be int64 or int32 indices, got ", ids.scalar_type());
  const at::Tensor flat = ids.reshape(-1);
  if (flat.numel() && flat.device().is_cpu()) {
    const auto [min, max] = at::aminmax(flat);  // one pass over the ids
    const int64_t low = min.item<int64_t>(), high = max.item<int64_t>();
    TORCH_CHECK_INDEX(low >= 0 && high < num_embeddings, kName, ": ids must be in [0, ", num_embeddings,
                      "), got values from ", low, " to ", high);
  }
  const at::Tensor rows = dequantize_weight(qweight.index_select(0, flat), scales.index_select(0, flat),
                                            zeros.defined() ? std::optional<at::Tensor>(zeros.index_select(0, flat))
                                                            : std::nullopt,
                                            options.bits, options.group_size, embedding_dim, scales.scalar_type());
  std::vector<int64_t> shape = ids.sizes().vec();
  shape.push_back(embedding_dim);
  return rows.reshape(shape);
}

at::Tensor QEmbeddingImpl::dequantize() const {
  return dequantize_weight(qweight, scales, detail::optional_of(zeros), options.bits, options.group_size, embedding_dim,
                           scales.scalar_type());
}

QLinear QEmbeddingImpl::tied_head(const at::Tensor& bias) const {
  QLinear head(embedding_dim, num_embeddings, bias.defined(), options, scales.scalar_type());
  // set_data points the head's registered buffers at the table's storage (the placeholders go).
  head->qweight.set_data(qweight);
  head->scales.set_data(scales);
  if (zeros.defined()) head->zeros.set_data(zeros);
  if (bias.defined()) {
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == num_embeddings, kName, ": the head's bias must be [",
                      num_embeddings, "], got shape ", bias.sizes());
    head->bias.set_data(bias);
  }
  return head;
}

void QEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "linquant::QEmbedding(" << num_embeddings << ", " << embedding_dim;
  if (padding_idx.has_value()) stream << ", padding_idx=" << *padding_idx;
  stream << ", ";
  detail::print_format(stream, options, scales.scalar_type());
  stream << ")";
}

detail::NamedSizes QEmbeddingImpl::format_record() const {
  return detail::format_record(options, {{"num_embeddings", num_embeddings}, {"embedding_dim", embedding_dim}});
}

}  // namespace linquant
