// CPU kernels of pack / unpack: argument checks and a parallel loop over pieces of rows (each a
// whole number of 8-value units, so pieces never share a byte) calling the per-ISA inner loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <sstream>

#include "../core/pack_span.h"
#include "pack_kernels.h"

namespace linquant::cpu {
namespace {

constexpr int64_t kPieceValues = int64_t{1} << 16;  // a multiple of 8

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

[[noreturn]] void report_out_of_range(const at::Tensor& q, int64_t bits) {
  const int64_t hi = (int64_t{1} << bits) - 1;
  const at::Tensor flat = q.reshape({-1});
  const at::Tensor bad = flat.lt(0).logical_or_(flat.gt(hi)).nonzero();
  const int64_t first = bad[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "linquant: q[", index_str(first, q.sizes()), "] = ", flat[first].item<int64_t>(),
                    " is out of range for ", bits, "-bit packing (expected values in [0, ", hi, "])");
}

// Rows of n values cut into pieces of whole 8-value units.
struct RowPieces {
  int64_t rows, n, per_row;
  RowPieces(int64_t rows_, int64_t n_)
      : rows(rows_), n(n_), per_row(std::max<int64_t>(1, (n_ + kPieceValues - 1) / kPieceValues)) {}
  int64_t count() const { return rows * per_row; }
  int64_t grain() const { return std::max<int64_t>(1, kPieceValues / std::max<int64_t>(1, std::min(n, kPieceValues))); }
  // Row, first value and number of values of piece p.
  void at(int64_t p, int64_t* row, int64_t* begin, int64_t* len) const {
    *row = p / per_row;
    *begin = (p % per_row) * kPieceValues;
    *len = std::min(kPieceValues, n - *begin);
  }
};

int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

at::Tensor pack_cpu(const at::Tensor& q, int64_t bits) {
  check_pack_bits(bits);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "linquant: q must be on the CPU for this kernel, got ", q.device());
  TORCH_CHECK_VALUE(at::isIntegralType(q.scalar_type(), /*includeBool=*/false),
                    "linquant: q must hold integers (uint8, or int8/int16/int32/int64 in range), got ",
                    q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() >= 1, "linquant: q must have at least one dim to pack along, got a 0-dim tensor");
  at::Tensor values = q;
  if (q.scalar_type() != at::kByte) {
    // Other integer types may hold negatives or values >= 256 that a cast would wrap: check first.
    const int64_t hi = (int64_t{1} << bits) - 1;
    if (q.numel() > 0 && (q.min().item<int64_t>() < 0 || q.max().item<int64_t>() > hi)) report_out_of_range(q, bits);
    values = q.to(at::kByte);
  }
  values = values.contiguous();
  const int64_t n = q.size(-1);
  const int64_t rows = leading_rows(q);
  const int64_t packed_n = core::packed_size(n, static_cast<int>(bits));
  auto out_shape = q.sizes().vec();
  out_shape.back() = packed_n;
  at::Tensor out = at::empty(out_shape, q.options().dtype(at::kByte));

  const auto pack = pack_kernels().pack[bits];
  const uint8_t* in = values.const_data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const RowPieces pieces(rows, n);
  std::atomic<uint32_t> seen{0};
  at::parallel_for(0, pieces.count(), pieces.grain(), [&](int64_t b, int64_t e) {
    uint8_t local = 0;
    for (int64_t p = b; p < e; ++p) {
      int64_t row, begin, len;
      pieces.at(p, &row, &begin, &len);
      if (len > 0) local |= pack(in + row * n + begin, len, dst + row * packed_n + begin * bits / 8);
    }
    seen |= local;
  });
  if ((seen.load() >> bits) != 0) report_out_of_range(values.view(q.sizes()), bits);
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t bits, int64_t size) {
  check_pack_bits(bits);
  TORCH_CHECK_VALUE(packed.device().is_cpu(), "linquant: packed must be on the CPU for this kernel, got ",
                    packed.device());
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte, "linquant: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1, "linquant: packed must have at least one dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(size >= 0, "linquant: size must be >= 0, got ", size);
  const int64_t packed_n = core::packed_size(size, static_cast<int>(bits));
  TORCH_CHECK_VALUE(packed.size(-1) == packed_n, "linquant: packed has ", packed.size(-1),
                    " bytes in its last dim, but ", size, " values of ", bits, " bits take ", packed_n);
  const at::Tensor in_t = packed.contiguous();
  const int64_t rows = leading_rows(packed);
  auto out_shape = packed.sizes().vec();
  out_shape.back() = size;
  at::Tensor out = at::empty(out_shape, packed.options());

  const auto unpack = pack_kernels().unpack[bits];
  const uint8_t* in = in_t.const_data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const RowPieces pieces(rows, size);
  at::parallel_for(0, pieces.count(), pieces.grain(), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      int64_t row, begin, len;
      pieces.at(p, &row, &begin, &len);
      if (len > 0) unpack(in + row * packed_n + begin * bits / 8, len, dst + row * size + begin);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace linquant::cpu
