// Argument checks and shapes of pack / unpack, shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace linquant {

// What one pack call works on: the values as a contiguous uint8 tensor of q's shape, viewed as
// `rows` rows of `n` values each, and the packed output (uint8, last dim ceil(n * bits / 8)).
struct PackJob {
  at::Tensor values;
  at::Tensor out;
  int64_t rows = 0;
  int64_t n = 0;
  int64_t packed_n = 0;
};

// Validates pack's arguments (device checked by the caller) and allocates the output. Integer
// types other than uint8 are range-checked before the cast to uint8 so nothing wraps silently.
PackJob prepare_pack(const at::Tensor& q, int64_t bits);

// The same for unpack: `values` is the contiguous packed input, `out` the unpacked output.
PackJob prepare_unpack(const at::Tensor& packed, int64_t bits, int64_t size);

// Raises ValueError naming the first value of q outside [0, 2^bits) (q of any integer type).
[[noreturn]] void report_out_of_range(const at::Tensor& q, int64_t bits);

}  // namespace linquant
