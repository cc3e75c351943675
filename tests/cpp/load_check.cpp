// linquant_load_check DIR INPUTS.pt OUTPUT.pt: loads a save_quantized directory of
// tests/python/test_cpp_load.py's model with linquant::load_quantized, builds the same model in
// C++ with the loaded layers at its quantized places, runs it on the token ids of INPUTS.pt
// (torch.save) and writes the output for torch.load. Prints the model. Exit codes: 0 ok, 1 the
// load or the run failed (one line on stderr), 2 bad usage.
#include <torch/serialize.h>
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "linquant/serialization.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: linquant_load_check DIR INPUTS.pt OUTPUT.pt\n";
    return 2;
  }
  try {
    const linquant::LoadedModel loaded = linquant::load_quantized(argv[1]);
    // test_cpp_load.py's nn.Sequential: 1, 3 and 4 are quantized, 6 is tied to the embedding.
    torch::nn::Sequential model(torch::nn::Embedding(50, 32), loaded.layers.at("1"), torch::nn::ReLU(),
                                loaded.layers.at("3"), loaded.layers.at("4"),
                                torch::nn::LayerNorm(torch::nn::LayerNormOptions({32})),
                                torch::nn::Linear(torch::nn::LinearOptions(32, 50).bias(false)));
    linquant::load_into(*model, loaded);
    model->eval();
    std::cout << *model << "\n";

    std::ifstream in(argv[2], std::ios::binary);
    const std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    if (!in.is_open() || in.bad()) throw std::runtime_error(std::string("cannot read ") + argv[2]);
    const at::Tensor ids = torch::pickle_load(bytes).toTensor();
    torch::NoGradGuard no_grad;
    const std::vector<char> out = torch::pickle_save(model->forward(ids));
    std::ofstream f(argv[3], std::ios::binary);
    f.write(out.data(), static_cast<std::streamsize>(out.size()));
    if (!f.flush()) throw std::runtime_error(std::string("cannot write ") + argv[3]);
  } catch (const c10::Error& e) {
    std::cerr << "linquant_load_check: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "linquant_load_check: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
