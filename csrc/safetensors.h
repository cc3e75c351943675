// What read_safetensors (safetensors.cpp) shares with load_quantized (serialization.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <string>

namespace linquant::detail {

// A device files can be read onto: not meta (meta tensors hold no data), and CUDA only when torch
// sees a GPU (said here, before a driver error from the first copy). `who` starts the message.
void check_load_device(c10::Device device, const std::string& who);

// A dtype as torch names it in Python ("uint8", "bfloat16"), as Python's messages do.
std::string dtype_name(at::ScalarType t);

}  // namespace linquant::detail
