// The C++ side of tests/python/test_cpp_load.py: reads save_quantized directories with
// linquant::load_quantized. Exit codes: 0 ok, 1 the load or the run failed (one line on stderr),
// 2 bad usage.
//   linquant_load_check DIR INPUTS.pt OUTPUT.pt: builds test_cpp_load.py's model in C++ with the
//     loaded modules at its quantized places (its embedding and tied head quantized or not), runs
//     it on the token ids of INPUTS.pt (torch.save) and writes the output for torch.load. Prints
//     the model.
//   linquant_load_check --dequantized DIR OUTPUT.pt: writes {name: float weight} of every loaded
//     QLinear, QEmbedding and QExpertsWeight, for any model's save.
#include <torch/serialize.h>
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "linquant/serialization.h"

namespace {

void write(const c10::IValue& value, const char* path) {
  const std::vector<char> out = torch::pickle_save(value);
  std::ofstream f(path, std::ios::binary);
  f.write(out.data(), static_cast<std::streamsize>(out.size()));
  if (!f.flush()) throw std::runtime_error(std::string("cannot write ") + path);
}

void run_model(const char* dir, const char* inputs, const char* output) {
  const linquant::LoadedModel loaded = linquant::load_quantized(dir);
  // test_cpp_load.py's nn.Sequential: 1, 3 and 4 are quantized, 6 is tied to the embedding 0,
  // both quantized or both float.
  const bool quantized_table = loaded.embeddings.count("0");
  torch::nn::Sequential model;
  if (quantized_table) {
    model->push_back(loaded.embeddings.at("0"));
  } else {
    model->push_back(torch::nn::Embedding(50, 32));
  }
  model->push_back(loaded.layers.at("1"));
  model->push_back(torch::nn::ReLU());
  model->push_back(loaded.layers.at("3"));
  model->push_back(loaded.layers.at("4"));
  model->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({32})));
  if (quantized_table) {
    model->push_back(loaded.layers.at("6"));
  } else {
    model->push_back(torch::nn::Linear(torch::nn::LinearOptions(32, 50).bias(false)));
  }
  linquant::load_into(*model, loaded);
  model->eval();
  std::cout << *model << "\n";

  std::ifstream in(inputs, std::ios::binary);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (!in.is_open() || in.bad()) throw std::runtime_error(std::string("cannot read ") + inputs);
  const at::Tensor ids = torch::pickle_load(bytes).toTensor();
  torch::NoGradGuard no_grad;
  write(model->forward(ids), output);
}

void write_dequantized(const char* dir, const char* output) {
  const linquant::LoadedModel loaded = linquant::load_quantized(dir);
  c10::Dict<std::string, at::Tensor> weights;
  for (const auto& [name, layer] : loaded.layers) weights.insert(name, layer->dequantize());
  for (const auto& [name, table] : loaded.embeddings) weights.insert(name, table->dequantize());
  for (const auto& [name, experts] : loaded.experts) weights.insert(name, experts->dequantize());
  write(weights, output);
}

}  // namespace

int main(int argc, char** argv) {
  const bool dequantized = argc == 4 && std::string(argv[1]) == "--dequantized";
  if (argc != 4) {
    std::cerr << "usage: linquant_load_check DIR INPUTS.pt OUTPUT.pt | --dequantized DIR OUTPUT.pt\n";
    return 2;
  }
  try {
    if (dequantized) {
      write_dequantized(argv[2], argv[3]);
    } else {
      run_model(argv[1], argv[2], argv[3]);
    }
  } catch (const c10::Error& e) {
    std::cerr << "linquant_load_check: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "linquant_load_check: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
