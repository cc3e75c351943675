// Device kernels of choose_qparams / quantize / dequantize over the [rows, cols] layout of
// csrc/quant_layout.h, calling the CPU's torch-free formulas (csrc/core/quant_math.h). Kept apart
// from the ATen glue in quantize.cu so the GoogleTest suites can also run them on the host
// (tests/cpp/cuda_emulation).
#pragma once

#include <algorithm>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../csrc/core/quant_math.h"

namespace linquant::cuda {

namespace core = linquant::core;

// A group longer than this is reduced by several warps (pieces) whose results are then combined.
constexpr int64_t kPiece = 8192;
// Error flags: NaN / Inf input; a scale range past float32; a scale not finite and positive.
constexpr unsigned kNonFinite = 1, kOverflow = 2, kBadScale = 4;

// Pieces of the layout, as on the CPU: group u = (row, j) split into per_group pieces.
struct Pieces {
  int64_t cols, group, groups, per_group, piece_len;

  LQ_HD void at(int64_t p, int64_t* offset, int64_t* len) const {
    const int64_t u = p / per_group, sub = p - u * per_group;
    const int64_t row = u / groups, j = u - row * groups;
    const int64_t begin = j * group;
    const int64_t group_len = (group < cols - begin ? group : cols - begin);
    *offset = row * cols + begin + sub * piece_len;
    *len = group_len - sub * piece_len < piece_len ? group_len - sub * piece_len : piece_len;
  }
};

inline Pieces make_pieces(int64_t cols, int64_t group, int64_t groups) {
  Pieces p;
  p.cols = cols;
  p.group = group;
  p.groups = groups;
  p.per_group = std::max<int64_t>(1, (group + kPiece - 1) / kPiece);
  p.piece_len = (group + p.per_group - 1) / p.per_group;
  return p;
}

// One warp per piece: minimum and maximum of its elements, with the CPU's select semantics.
template <typename T>
__global__ void minmax_kernel(const T* __restrict__ x, Pieces pieces, int64_t n_pieces, float* __restrict__ lo,
                              float* __restrict__ hi, unsigned* flag) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; p < n_pieces; p += warps) {
    int64_t offset, len;
    pieces.at(p, &offset, &len);
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    bool bad = false;
    for (int64_t i = lane; i < len; i += 32) {
      const float v = core::to_float(x[offset + i]);
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
      bad |= core::is_nonfinite(v);
    }
    for (int d = 16; d > 0; d /= 2) {
      const float omn = __shfl_xor_sync(0xFFFFFFFFu, mn, d), omx = __shfl_xor_sync(0xFFFFFFFFu, mx, d);
      mn = omn < mn ? omn : mn;
      mx = omx > mx ? omx : mx;
    }
    if (__any_sync(0xFFFFFFFFu, bad) && lane == 0) atomicOr(flag, kNonFinite);
    if (lane == 0) {
      lo[p] = mn;
      hi[p] = mx;
    }
  }
}

// One thread per group: its pieces combined, then the shared qparams formula.
__global__ void qparams_kernel(const float* __restrict__ lo, const float* __restrict__ hi, int64_t per_group,
                               int64_t n_params, int bits, bool symmetric, float* __restrict__ scale,
                               int32_t* __restrict__ zero, unsigned* flag) {
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < n_params;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    for (int64_t k = 0; k < per_group; ++k) {
      mn = fminf(mn, lo[u * per_group + k]);
      mx = fmaxf(mx, hi[u * per_group + k]);
    }
    if (mn > mx) mn = mx = 0.0f;  // an empty group is treated as all zeros
    const core::QParams qp = core::qparams_from_minmax(mn, mx, bits, symmetric);
    if (core::is_nonfinite(qp.scale)) atomicOr(flag, kOverflow);  // +inf: the range overflows
    scale[u] = qp.scale;
    zero[u] = qp.zero_point;
  }
}

// One thread per element of the [rows, cols] matrix; group (row, col / group) owns s and z.
struct GroupIndex {
  int64_t cols, group, groups;
  LQ_HD int64_t of(int64_t i) const {
    const int64_t row = i / cols;
    return row * groups + (i - row * cols) / group;
  }
};

template <typename T, typename Q>
__global__ void quantize_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                                const int32_t* __restrict__ zero, Q* __restrict__ q, int64_t n, GroupIndex gi,
                                core::QRange r, unsigned* flag) {
  // The scales are checked here, as each element reads its group's, rather than by a reduction
  // read back beforehand: one synchronization per call instead of two.
  bool bad = false, bad_scale = false;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = gi.of(i);
    const float v = core::to_float(x[i]), s = scale[u];
    bad |= core::is_nonfinite(v);
    bad_scale |= !(s > 0.0f) || core::is_nonfinite(s);
    q[i] = static_cast<Q>(core::quantize_value(v, s, zero != nullptr ? zero[u] : 0, r.qmin, r.qmax));
  }
  if (bad || bad_scale) atomicOr(flag, (bad ? kNonFinite : 0u) | (bad_scale ? kBadScale : 0u));
}

template <typename Q, typename T>
__global__ void dequantize_kernel(const Q* __restrict__ q, const float* __restrict__ scale,
                                  const int32_t* __restrict__ zero, T* __restrict__ out, int64_t n, GroupIndex gi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = gi.of(i);
    const int32_t z = zero != nullptr ? zero[u] : 0;
    out[i] = core::from_float<T>(core::dequantize_value(static_cast<int32_t>(q[i]), scale[u], z));
  }
}

}  // namespace linquant::cuda
