// Quantizes a small Linear with the installed linquant and checks it against its dequantized weight.
#include <linquant/ops.h>
#include <linquant/qlinear.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear lin(torch::nn::LinearOptions(64, 16));
  auto q = linquant::QLinearImpl::from_linear(lin, {4, 32, false});
  const at::Tensor x = torch::randn({2, 64});
  const bool ok = at::allclose(q->forward(x), at::linear(x, q->dequantize(), lin->bias.detach()), 1e-5, 1e-5);
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << std::endl;
  return ok ? 0 : 1;
}
