// Torch-free CPU inner loops of choose_qparams / quantize / dequantize over one contiguous span
// that shares a single scale and zero point. The loops are written for the compiler's vectorizer
// (`omp simd`, no branches); csrc/cpu/kernels_isa.cpp compiles them once per instruction set.
#pragma once

#include <cstdint>
#include <limits>

#include "quant_math.h"

namespace linquant::core {
inline namespace LINQUANT_CPU_ISA {

// Minimum and maximum of x[0:n] folded into *mn / *mx; *nonfinite becomes non-zero if any
// element is NaN or Inf (NaNs are otherwise invisible to min/max).
template <typename T>
void minmax_span(const T* x, int64_t n, float* mn, float* mx, uint32_t* nonfinite) {
  float lo = *mn, hi = *mx;
  uint32_t bad = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    bad |= is_nonfinite(v) ? 1u : 0u;
  }
  *mn = lo;
  *mx = hi;
  *nonfinite |= bad;
}

// Q is int8_t (symmetric) or uint8_t (asymmetric).
template <typename T, typename Q>
void quantize_span(const T* x, int64_t n, float s, int32_t z, QRange r, Q* q, uint32_t* nonfinite) {
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    bad |= is_nonfinite(v) ? 1u : 0u;
    q[i] = static_cast<Q>(quantize_value(v, s, z, r.qmin, r.qmax));
  }
  *nonfinite |= bad;
}

// out[i] = s * (value(i) - z) for i in [0, n), with dequantize_value's bits: in int32 lanes where
// the zero point allows (zero_point_fits_int32), else element by element in 64 bits.
template <typename T, typename Value>
void dequantize_values(int64_t n, float s, int32_t z, T* out, Value value) {
  if (zero_point_fits_int32(z)) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(dequantize_value_int32(value(i), s, z));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(dequantize_value(value(i), s, z));
  }
}

template <typename Q, typename T>
void dequantize_span(const Q* q, int64_t n, float s, int32_t z, T* out) {
  dequantize_values(n, s, z, out, [q](int64_t i) { return static_cast<int32_t>(q[i]); });
}

}  // namespace LINQUANT_CPU_ISA
}  // namespace linquant::core
