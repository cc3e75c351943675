// The rest of what the C++ modules holding weights in the quantized-weight format share (linquant::
// QLinear, QEmbedding, QExpertsWeight; Python's nn.init_format and format_repr), beside their base
// class (linquant/quantized_module.h): the format's checks and buffers, the format's part of their
// printout, and their format record.
#pragma once

#include <torch/nn/module.h>

#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "linquant/qlinear.h"
#include "linquant/quantized_module.h"

namespace linquant::detail {

// An undefined tensor (a symmetric format's zeros, a layer without bias) as the ops' None.
inline std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Groups per row: ceil(cols / group_size) (none when cols = 0), or one per channel.
int64_t group_count(int64_t cols, const QLinearOptions& options);

// A module's constructor checks, errors starting `who`: its sizes >= 0, bits 8 / 4 / 2, groups on
// byte boundaries, a row of `cols` values within int64, the scales' dtype float32 / 16 / bf16.
void check_format(const std::string& who, const NamedSizes& sizes, int64_t cols, const QLinearOptions& options,
                  at::ScalarType dtype);

struct FormatBuffers {
  at::Tensor qweight, scales, zeros;  // zeros undefined when symmetric
};

// Registers `module`'s qweight (zeros), scales (ones, in dtype) and, when asymmetric, zeros for
// `stacked` weights of [rows, cols] (stacked = {} for one, {E} for a mixture's E experts).
FormatBuffers register_format(torch::nn::Module& module, std::vector<int64_t> stacked, int64_t rows, int64_t cols,
                              const QLinearOptions& options, at::ScalarType dtype);

// "bits=4, group_size=128, asymmetric, dtype=Float", as Python's format_repr.
void print_format(std::ostream& stream, const QLinearOptions& options, at::ScalarType dtype);

// [bits, group_size (0: per-channel), symmetric, sizes...]: what an archive says of its layer.
NamedSizes format_record(const QLinearOptions& options, const NamedSizes& sizes);

}  // namespace linquant::detail
