// CPU kernels of choose_qparams / quantize / dequantize: argument checks, the [rows, cols] layout
// (quant_layout.h), and a parallel loop over pieces of groups that calls the per-ISA inner loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "../core/quant_math.h"
#include "../quant_layout.h"
#include "quantize_kernels.h"

namespace linquant::cpu {
namespace {

// Groups longer than this are split so that per-tensor and per-channel work spreads over cores.
constexpr int64_t kPiece = int64_t{1} << 16;

// Pieces of the layout: group u = (row, j) is split into `per_group` pieces of at most kPiece.
struct Pieces {
  const QuantLayout& l;
  int64_t per_group;

  explicit Pieces(const QuantLayout& layout)
      : l(layout), per_group(std::max<int64_t>(1, (layout.group + kPiece - 1) / kPiece)) {}

  int64_t count() const { return l.num_params() * per_group; }
  int64_t grain() const { return std::max<int64_t>(1, kPiece / std::max<int64_t>(1, std::min(l.group, kPiece))); }

  // Group index, element offset into the [rows, cols] matrix and length of piece p (length may be
  // <= 0 for trailing pieces of a short last group).
  void at(int64_t p, int64_t* unit, int64_t* offset, int64_t* len) const {
    const int64_t u = p / per_group, sub = p % per_group;
    const int64_t row = u / l.groups, j = u % l.groups;
    const int64_t group_begin = j * l.group;
    const int64_t group_len = std::min(l.group, l.cols - group_begin);
    const int64_t piece_len = (l.group + per_group - 1) / per_group;
    *unit = u;
    *offset = row * l.cols + group_begin + sub * piece_len;
    *len = std::min(piece_len, group_len - sub * piece_len);
  }
};

FloatType float_type(at::ScalarType dt) {
  switch (dt) {
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      return kF32;
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.device().is_cpu(), "linquant: ", name, " must be on the CPU for this kernel, got ",
                    t.device());
}

std::tuple<at::Tensor, at::Tensor> choose_qparams_cpu(const at::Tensor& x, int64_t bits, bool symmetric,
                                                      std::optional<int64_t> axis,
                                                      std::optional<int64_t> group_size) {
  check_bits(bits);
  check_float_dtype(x, "x");
  const QuantLayout l = make_layout(x, axis, group_size);
  const at::Tensor rows = to_rows(x, l);
  const Pieces pieces(l);
  const int64_t n_pieces = pieces.count();
  const size_t elem = rows.element_size();
  const auto minmax = quantize_kernels().minmax[float_type(x.scalar_type())];
  const char* base = static_cast<const char*>(rows.const_data_ptr());

  std::vector<float> lo(n_pieces, std::numeric_limits<float>::infinity());
  std::vector<float> hi(n_pieces, -std::numeric_limits<float>::infinity());
  std::atomic<uint32_t> nonfinite{0};
  at::parallel_for(0, n_pieces, pieces.grain(), [&](int64_t begin, int64_t end) {
    uint32_t bad = 0;
    for (int64_t p = begin; p < end; ++p) {
      int64_t unit, offset, len;
      pieces.at(p, &unit, &offset, &len);
      if (len > 0) minmax(base + offset * elem, len, &lo[p], &hi[p], &bad);
    }
    nonfinite |= bad;
  });
  TORCH_CHECK_VALUE(nonfinite.load() == 0, "linquant: x contains NaN or Inf; cannot choose qparams");

  const int64_t n_params = l.num_params();
  at::Tensor scale = at::empty({n_params}, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({n_params}, x.options().dtype(at::kInt));
  float* s = scale.data_ptr<float>();
  int32_t* z = zero.data_ptr<int32_t>();
  bool overflow = false;
  for (int64_t u = 0; u < n_params; ++u) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    for (int64_t k = 0; k < pieces.per_group; ++k) {
      mn = std::min(mn, lo[u * pieces.per_group + k]);
      mx = std::max(mx, hi[u * pieces.per_group + k]);
    }
    if (mn > mx) mn = mx = 0.0f;  // an empty group is treated as all zeros
    const core::QParams qp = core::qparams_from_minmax(mn, mx, static_cast<int>(bits), symmetric);
    overflow |= std::isinf(qp.scale);
    s[u] = qp.scale;
    z[u] = qp.zero_point;
  }
  TORCH_CHECK_VALUE(!overflow, "linquant: the value range of x overflows a float32 scale");
  const auto shape = param_shape(x, l);
  return {scale.view(shape), zero.view(shape)};
}

at::Tensor quantize_cpu(const at::Tensor& x, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero_point, int64_t bits,
                        std::optional<int64_t> axis, std::optional<int64_t> group_size) {
  check_cpu(x, "x");
  const QuantJob job = prepare_quantize(x, scale, zero_point, bits, axis, group_size);
  const QuantLayout& l = job.layout;
  const bool symmetric = job.symmetric();
  const core::QRange r = core::q_range(static_cast<int>(bits), symmetric);
  const auto quantize =
      quantize_kernels().quantize[float_type(x.scalar_type())][symmetric ? kInt8 : kUInt8];
  const char* in = static_cast<const char*>(job.rows.const_data_ptr());
  char* out = static_cast<char*>(job.out.data_ptr());
  const size_t elem = job.rows.element_size();
  const float* sp = job.scale.const_data_ptr<float>();
  const int32_t* zp = symmetric ? nullptr : job.zero_point.const_data_ptr<int32_t>();

  const Pieces pieces(l);
  std::atomic<uint32_t> nonfinite{0};
  at::parallel_for(0, pieces.count(), pieces.grain(), [&](int64_t begin, int64_t end) {
    uint32_t bad = 0;
    for (int64_t p = begin; p < end; ++p) {
      int64_t unit, offset, len;
      pieces.at(p, &unit, &offset, &len);
      if (len > 0) quantize(in + offset * elem, len, sp[unit], zp ? zp[unit] : 0, r.qmin, r.qmax, out + offset, &bad);
    }
    nonfinite |= bad;
  });
  TORCH_CHECK_VALUE(nonfinite.load() == 0, "linquant: x contains NaN or Inf; cannot quantize");
  return from_rows(job.out, x, l);
}

at::Tensor dequantize_cpu(const at::Tensor& q, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, std::optional<int64_t> axis,
                          std::optional<int64_t> group_size, std::optional<at::ScalarType> dtype) {
  check_cpu(q, "q");
  const QuantJob job = prepare_dequantize(q, scale, zero_point, axis, group_size, dtype);
  const auto dequantize =
      quantize_kernels().dequantize[q.scalar_type() == at::kChar ? kInt8 : kUInt8][float_type(job.out.scalar_type())];
  const char* in = static_cast<const char*>(job.rows.const_data_ptr());
  char* dst = static_cast<char*>(job.out.data_ptr());
  const size_t elem = job.out.element_size();
  const float* sp = job.scale.const_data_ptr<float>();
  const int32_t* zp = job.zero_point.defined() ? job.zero_point.const_data_ptr<int32_t>() : nullptr;

  const Pieces pieces(job.layout);
  at::parallel_for(0, pieces.count(), pieces.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t unit, offset, len;
      pieces.at(p, &unit, &offset, &len);
      if (len > 0) dequantize(in + offset, len, sp[unit], zp ? zp[unit] : 0, dst + offset * elem);
    }
  });
  return from_rows(job.out, q, job.layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CPU, m) {
  m.impl("choose_qparams", &choose_qparams_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace linquant::cpu
