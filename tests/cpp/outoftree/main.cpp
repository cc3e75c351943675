// Quantizes a small Linear and an Embedding with the installed linquant (every public header
// included) and checks them against their dequantized weights.
#include <linquant/ops.h>
#include <linquant/qembedding.h>
#include <linquant/qexperts.h>
#include <linquant/qlinear.h>
#include <linquant/serialization.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear lin(torch::nn::LinearOptions(64, 16));
  auto q = linquant::QLinearImpl::from_linear(lin, {4, 32, false});
  const at::Tensor x = torch::randn({2, 64});
  auto table = linquant::QEmbeddingImpl::from_embedding(torch::nn::Embedding(10, 64), {8, std::nullopt, true});
  const at::Tensor ids = torch::tensor({3, 9});
  const bool ok = at::allclose(q->forward(x), at::linear(x, q->dequantize(), lin->bias.detach()), 1e-5, 1e-5) &&
                  at::equal(table->forward(ids), table->dequantize().index_select(0, ids));
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << std::endl;
  return ok ? 0 : 1;
}
