// Reading Python's `lq.save_quantized` directories from C++ (docs/architecture.md, "C++ API and
// programs"): the safetensors reader, load_quantized and load_into.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/nn/module.h>

#include <map>
#include <string>

#include "linquant/qembedding.h"
#include "linquant/qexperts.h"
#include "linquant/qlinear.h"

namespace linquant {

// A safetensors file: its tensors by name and its header's "__metadata__" (string to string).
struct SafetensorsFile {
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

// Reads every tensor of a safetensors file (one open; each tensor read into its own CPU memory,
// then moved to `device`). Dtypes: F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 U16 U8
// BOOL. A damaged file (header length beyond the file, invalid JSON, unknown dtype, offsets out of
// range, overlapping, leaving gaps or not matching dtype x shape, truncated data) is a
// c10::ValueError naming the file and the tensor.
SafetensorsFile read_safetensors(const std::string& path, c10::Device device = c10::kCPU);

// A save_quantized directory: its quantized modules by module name ("" when the model itself is
// one): QLinear layers, QEmbedding tables and QExpertsWeight projections (a mixture's experts), and
// every other tensor of the model's state_dict by name (float embeddings, norms, unquantized Linear
// weights), tied entries sharing the tensor they are tied to (a head tied to a quantized table is
// a QLinear over the table's very tensors).
struct LoadedModel {
  std::map<std::string, QLinear> layers;
  std::map<std::string, QEmbedding> embeddings;
  std::map<std::string, QExpertsWeight> experts;
  std::map<std::string, at::Tensor> tensors;
};

// Reads DIR/linquant.json and DIR/model.safetensors onto `device` with the checks of Python's
// load_quantized: format and format_version, every modules / embeddings / experts entry, the save
// id both files carry (files from before save ids have none), each quantized module's tensors
// against its format (shape and dtype; a symmetric one has no zeros, a bias-less layer no bias)
// and scales finite and positive.
// Errors are c10::ValueErrors "linquant::load_quantized: ...".
LoadedModel load_quantized(const std::string& dir, c10::Device device = c10::kCPU);

// Gives `model` the loaded weights, as Python's load_state_dict(assign=True): the model's
// parameters and buffers take the loaded tensors themselves (no copy; the file's float dtype and
// the load device), tied ones included. At each quantized name the model must hold a module of
// that kind (QLinear, QEmbedding, QExpertsWeight): the loaded one itself (build the model with
// `loaded.layers.at(name)` there, or `loaded.embeddings` / `loaded.experts`), or one of the same
// format, which takes its tensors. A torch::nn::Linear or Embedding there is refused:
// replace_module would change the registry only, while a parent's member or a Sequential would
// still call the float module. Everything is checked before anything changes; a name missing on
// either side, another shape, or an integer tensor of another dtype is a c10::ValueError
// "linquant::load_into: ...".
void load_into(torch::nn::Module& model, const LoadedModel& loaded);

}  // namespace linquant
