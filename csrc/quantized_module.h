// What the C++ modules holding weights in the quantized-weight format share (linquant::QLinear,
// QEmbedding, QExpertsWeight; Python's nn.init_format, format_repr and check_conversion): the
// format's checks and buffers, the format's part of their printout, dtype conversion of the float
// buffers alone, and the format record their torch::save archives carry.
#pragma once

#include <torch/nn/module.h>
#include <torch/serialize/archive.h>

#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "linquant/qlinear.h"

namespace linquant::detail {

// (name, value) pairs: a module's sizes, or its format record.
using NamedSizes = std::vector<std::pair<const char*, int64_t>>;

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

// Converts `module`'s own floating-point buffers (scales, bias) to dtype, which must be float32,
// float16 or bfloat16; qweight and zeros keep theirs (torch::nn::Module::to would cast them too).
void float_buffers_to(torch::nn::Module& module, at::ScalarType dtype, bool non_blocking, const std::string& who);

// [bits, group_size (0: per-channel), symmetric, sizes...]: what an archive says of its layer.
NamedSizes format_record(const QLinearOptions& options, const NamedSizes& sizes);

// torch::save writes the record beside the buffers; torch::load checks an archive's record against
// the module's before loading (a ValueError naming the field that differs), so a layer never runs
// with another format's bits or without its zero points. Archives without one load as before.
void write_format_record(torch::serialize::OutputArchive& archive, const NamedSizes& record);
void check_format_record(torch::serialize::InputArchive& archive, const NamedSizes& record, const std::string& who);

}  // namespace linquant::detail
