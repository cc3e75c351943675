#include "pack_checks.h"

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <vector>

#include "core/pack_span.h"

namespace linquant {
namespace {

void check_pack_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, "linquant: bits must be between 1 and 8 for packing, got ", bits);
}

std::string index_str(int64_t flat, at::IntArrayRef sizes) {
  std::vector<int64_t> idx(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    idx[d] = flat % sizes[d];
    flat /= sizes[d];
  }
  std::ostringstream os;
  os << at::IntArrayRef(idx);
  return os.str();
}

int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// q's values in a type ATen compares: uint16 / uint32 / uint64 have no min, max or lt, so those as
// int64, which holds every uint16 and uint32 value (a uint64 one from 2^63 up reads as negative).
at::Tensor comparable(const at::Tensor& q) {
  const bool wide_unsigned = q.scalar_type() == at::kUInt16 || q.scalar_type() == at::kUInt32 ||
                             q.scalar_type() == at::kUInt64;
  return wide_unsigned ? q.to(at::kLong) : q;
}

}  // namespace

void report_out_of_range(const at::Tensor& q, int64_t bits) {
  const int64_t hi = (int64_t{1} << bits) - 1;
  const at::Tensor flat = comparable(q).reshape({-1});
  const at::Tensor bad = flat.lt(0).logical_or_(flat.gt(hi)).nonzero();
  const int64_t first = bad[0][0].item<int64_t>();
  const int64_t v = flat[first].item<int64_t>();
  const std::string value =
      q.scalar_type() == at::kUInt64 ? std::to_string(static_cast<uint64_t>(v)) : std::to_string(v);
  TORCH_CHECK_VALUE(false, "linquant: q[", index_str(first, q.sizes()), "] = ", value, " is out of range for ", bits,
                    "-bit packing (expected values in [0, ", hi, "])");
}

PackJob prepare_pack(const at::Tensor& q, int64_t bits) {
  check_pack_bits(bits);
  TORCH_CHECK_VALUE(at::isIntegralType(q.scalar_type(), /*includeBool=*/false),
                    "linquant: q must hold integers (uint8, or any integer dtype with values in range), got ",
                    q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() >= 1, "linquant: q must have at least one dim to pack along, got a 0-dim tensor");
  at::Tensor values = q;
  if (q.scalar_type() != at::kByte) {
    // Other integer types may hold negatives or values >= 256 that a cast would wrap: check first.
    const at::Tensor ints = comparable(q);
    const int64_t hi = (int64_t{1} << bits) - 1;
    if (q.numel() > 0 && (ints.min().item<int64_t>() < 0 || ints.max().item<int64_t>() > hi)) {
      report_out_of_range(q, bits);
    }
    values = ints.to(at::kByte);
  }
  PackJob job;
  job.values = values.contiguous();
  job.n = q.size(-1);
  job.rows = leading_rows(q);
  job.packed_n = core::packed_size(job.n, static_cast<int>(bits));
  auto out_shape = q.sizes().vec();
  out_shape.back() = job.packed_n;
  job.out = at::empty(out_shape, q.options().dtype(at::kByte));
  return job;
}

PackJob prepare_unpack(const at::Tensor& packed, int64_t bits, int64_t size) {
  check_pack_bits(bits);
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte, "linquant: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1, "linquant: packed must have at least one dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(size >= 0, "linquant: size must be >= 0, got ", size);
  PackJob job;
  job.n = size;
  job.packed_n = core::packed_size(size, static_cast<int>(bits));
  TORCH_CHECK_VALUE(packed.size(-1) == job.packed_n, "linquant: packed has ", packed.size(-1),
                    " bytes in its last dim, but ", size, " values of ", bits, " bits take ", job.packed_n);
  job.values = packed.contiguous();
  job.rows = leading_rows(packed);
  auto out_shape = packed.sizes().vec();
  out_shape.back() = size;
  job.out = at::empty(out_shape, packed.options());
  return job;
}

}  // namespace linquant
