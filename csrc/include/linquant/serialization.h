// Reading Python's `lq.save_quantized` directories from C++ (docs/architecture.md, "C++ API and
// programs"): the safetensors reader.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <map>
#include <string>

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

}  // namespace linquant
