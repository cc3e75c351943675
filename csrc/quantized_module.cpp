// The format's checks, buffers, printout, conversion and archive record (csrc/quantized_module.h).
#include "quantized_module.h"

#include <ATen/ATen.h>

#include <limits>

namespace linquant::detail {
namespace {

constexpr const char* kFormatKey = "linquant_format";

bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

}  // namespace

int64_t group_count(int64_t cols, const QLinearOptions& options) {
  if (!options.group_size.has_value()) return 1;
  return cols == 0 ? 0 : (cols - 1) / *options.group_size + 1;  // no overflow near int64's limit
}

void check_format(const std::string& who, const NamedSizes& sizes, int64_t cols, const QLinearOptions& options,
                  at::ScalarType dtype) {
  const int64_t bits = options.bits;
  TORCH_CHECK_VALUE(bits == 8 || bits == 4 || bits == 2, who, ": bits must be 8, 4 or 2, got ", bits);
  TORCH_CHECK_VALUE(!options.group_size.has_value() || (*options.group_size > 0 && *options.group_size % (8 / bits) == 0),
                    who, ": group_size must be a positive multiple of ", 8 / bits, " at ", bits, " bits");
  for (const auto& [name, value] : sizes) {
    TORCH_CHECK_VALUE(value >= 0, who, ": ", name, " must be >= 0, got ", value);
  }
  TORCH_CHECK_VALUE(cols <= (std::numeric_limits<int64_t>::max() - 7) / bits, who, ": a row of ", cols,
                    " values is too large for ", bits, " bits");
  TORCH_CHECK_VALUE(is_float_dtype(dtype), who, ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

FormatBuffers register_format(torch::nn::Module& module, std::vector<int64_t> stacked, int64_t rows, int64_t cols,
                              const QLinearOptions& options, at::ScalarType dtype) {
  const int64_t bits = options.bits;
  const auto qdtype = bits == 8 && options.symmetric ? at::kChar : at::kByte;
  const auto shape = [&](int64_t last) {
    std::vector<int64_t> s = stacked;
    s.insert(s.end(), {rows, last});
    return s;
  };
  const int64_t groups = group_count(cols, options);
  FormatBuffers b;
  b.qweight = module.register_buffer("qweight", at::zeros(shape((cols * bits + 7) / 8), at::TensorOptions(qdtype)));
  b.scales = module.register_buffer("scales", at::ones(shape(groups), at::TensorOptions(dtype)));
  if (!options.symmetric) b.zeros = module.register_buffer("zeros", at::zeros(shape(groups), at::TensorOptions(at::kInt)));
  return b;
}

void print_format(std::ostream& stream, const QLinearOptions& options, at::ScalarType dtype) {
  stream << "bits=" << options.bits << ", ";
  if (options.group_size.has_value()) {
    stream << "group_size=" << *options.group_size;
  } else {
    stream << "per-channel";
  }
  stream << ", " << (options.symmetric ? "symmetric" : "asymmetric") << ", dtype=" << dtype;
}

void float_buffers_to(torch::nn::Module& module, at::ScalarType dtype, bool non_blocking, const std::string& who) {
  TORCH_CHECK_VALUE(is_float_dtype(dtype), who, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  for (auto& buffer : module.named_buffers(/*recurse=*/false)) {
    if (buffer->is_floating_point()) buffer->set_data(buffer->to(dtype, non_blocking));
  }
}

NamedSizes format_record(const QLinearOptions& options, const NamedSizes& sizes) {
  NamedSizes record{{"bits", options.bits},
                    {"group_size (0: per-channel)", options.group_size.value_or(0)},
                    {"symmetric", int64_t{options.symmetric}}};
  record.insert(record.end(), sizes.begin(), sizes.end());
  return record;
}

void write_format_record(torch::serialize::OutputArchive& archive, const NamedSizes& record) {
  std::vector<int64_t> values;
  for (const auto& field : record) values.push_back(field.second);
  archive.write(kFormatKey, at::tensor(values, at::kLong), /*is_buffer=*/true);
}

void check_format_record(torch::serialize::InputArchive& archive, const NamedSizes& record, const std::string& who) {
  at::Tensor saved;
  if (!archive.try_read(kFormatKey, saved, /*is_buffer=*/true)) return;
  const auto n = static_cast<int64_t>(record.size());
  TORCH_CHECK_VALUE(saved.dim() == 1 && saved.numel() == n, who, ": the archive's format record has shape ",
                    saved.sizes(), ", expected [", n, "]");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t got = saved[i].item<int64_t>();
    TORCH_CHECK_VALUE(got == record[i].second, who, ": the archive holds a layer with ", record[i].first, " = ", got,
                      ", this layer has ", record[i].second);
  }
}

}  // namespace linquant::detail
