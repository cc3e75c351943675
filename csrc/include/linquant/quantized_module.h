// linquant::QuantizedModule: the base of the C++ modules holding weights in the quantized-weight
// format (QLinear, QEmbedding, QExpertsWeight; Python's QuantizedMatrix / check_conversion): their
// dtype conversion of the float buffers alone, and the format record their archives carry.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/serialize/archive.h>

#include <string>
#include <utility>
#include <vector>

namespace linquant {
namespace detail {

// (name, value) pairs: a module's sizes, or its format record.
using NamedSizes = std::vector<std::pair<const char*, int64_t>>;

// Converts `module`'s own floating-point buffers (scales, bias) to dtype, which must be float32,
// float16 or bfloat16; qweight and zeros keep theirs.
void float_buffers_to(torch::nn::Module& module, at::ScalarType dtype, bool non_blocking, const std::string& who);
void write_format_record(torch::serialize::OutputArchive& archive, const NamedSizes& record);
void check_format_record(torch::serialize::InputArchive& archive, const NamedSizes& record, const std::string& who);

}  // namespace detail

// Derived (a torch::nn::Cloneable through this) gives kName ("linquant::QLinear") and
// format_record(): [bits, group_size (0: per-channel), symmetric, its sizes...].
template <typename Derived>
class QuantizedModule : public torch::nn::Cloneable<Derived> {
 public:
  // A dtype converts the float buffers (scales, bias) only, to float32, float16 or bfloat16, as
  // the Python modules' .to does; torch::nn::Module::to would cast qweight and zeros too.
  using torch::nn::Module::to;  // to(device)
  void to(torch::Dtype dtype, bool non_blocking = false) override {
    detail::float_buffers_to(*this, dtype, non_blocking, Derived::kName);
  }
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override {
    to(device, non_blocking);
    to(dtype, non_blocking);
  }

  // torch::save also writes the format record; torch::load checks an archive's record against the
  // module's before loading (a ValueError naming the field that differs), so a module never runs
  // with another format's bits or without its zero points. Archives without one load as before.
  void save(torch::serialize::OutputArchive& archive) const override {
    torch::nn::Module::save(archive);
    detail::write_format_record(archive, self().format_record());
  }
  void load(torch::serialize::InputArchive& archive) override {
    detail::check_format_record(archive, self().format_record(), Derived::kName);
    torch::nn::Module::load(archive);
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

}  // namespace linquant
