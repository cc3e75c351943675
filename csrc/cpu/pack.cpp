// CPU kernels of pack / unpack: argument checks and a parallel loop over pieces of rows (each a
// whole number of 8-value units, so pieces never share a byte) calling the per-ISA inner loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../pack_checks.h"
#include "pack_kernels.h"

namespace linquant::cpu {
namespace {

constexpr int64_t kPieceValues = int64_t{1} << 16;  // a multiple of 8

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

at::Tensor pack_cpu(const at::Tensor& q, int64_t bits) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "linquant: q must be on the CPU for this kernel, got ", q.device());
  const PackJob job = prepare_pack(q, bits);
  const auto pack = pack_kernels().pack[bits];
  const uint8_t* in = job.values.const_data_ptr<uint8_t>();
  uint8_t* dst = job.out.data_ptr<uint8_t>();
  const int64_t n = job.n, packed_n = job.packed_n;
  const RowPieces pieces(job.rows, n);
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
  if ((seen.load() >> bits) != 0) report_out_of_range(job.values.view(q.sizes()), bits);
  return job.out;
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t bits, int64_t size) {
  TORCH_CHECK_VALUE(packed.device().is_cpu(), "linquant: packed must be on the CPU for this kernel, got ",
                    packed.device());
  const PackJob job = prepare_unpack(packed, bits, size);
  const auto unpack = pack_kernels().unpack[bits];
  const uint8_t* in = job.values.const_data_ptr<uint8_t>();
  uint8_t* dst = job.out.data_ptr<uint8_t>();
  const int64_t packed_n = job.packed_n;
  const RowPieces pieces(job.rows, size);
  at::parallel_for(0, pieces.count(), pieces.grain(), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      int64_t row, begin, len;
      pieces.at(p, &row, &begin, &len);
      if (len > 0) unpack(in + row * packed_n + begin * bits / 8, len, dst + row * size + begin);
    }
  });
  return job.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace linquant::cpu
