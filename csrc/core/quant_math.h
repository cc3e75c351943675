// The affine quantization formulas of docs/architecture.md, shared by the CPU and CUDA kernels
// and by the GoogleTest suites. Torch-free, host and device.
//
//   q     = clamp(round(x / s) + z, qmin, qmax)     round = half to even
//   x_hat = s * (q - z)
//
// Every step is one correctly rounded fp32 operation (no reciprocal, no fused multiply-add), so
// a float32 PyTorch reference, the CPU kernels and the CUDA kernels agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "float_convert.h"

namespace linquant::core {
inline namespace LINQUANT_CPU_ISA {

struct QRange {
  int32_t qmin;
  int32_t qmax;
};

// Symmetric values are signed, asymmetric values unsigned (docs/architecture.md).
LQ_HD QRange q_range(int bits, bool symmetric) {
  return symmetric ? QRange{-(1 << (bits - 1)), (1 << (bits - 1)) - 1} : QRange{0, (1 << bits) - 1};
}

struct QParams {
  float scale;
  int32_t zero_point;
};

// Zero points stay within +-2^23 so that q - z is exact in fp32 (qparams_from_minmax).
constexpr float kZeroPointLimit = 8388608.0f;

LQ_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

// Two flat selects rather than a nested one: the vectorizer if-converts this form.
LQ_HD float clampf(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// round(x / s) + z, clamped. Integer-valued floats add exactly while the sum is within the q range,
// and rounding is monotone, so clamping after the addition is exact.
LQ_HD int32_t quantize_value(float x, float s, int32_t z, int32_t qmin, int32_t qmax) {
  const float v = round_half_even(x / s) + static_cast<float>(z);
  return static_cast<int32_t>(clampf(v, static_cast<float>(qmin), static_cast<float>(qmax)));
}

// q - z in 64 bits: a zero point the caller gave near INT32_MIN would wrap the int32 difference
// (and flip the sign of the result).
LQ_HD float dequantize_value(int32_t q, float s, int32_t z) {
  return s * static_cast<float>(static_cast<int64_t>(q) - z);
}

// s, or a scale a little smaller where the grid point that `end` (the group's min or max)
// quantizes to overflows fp32. That happens only within half a step of FLT_MAX, where the scale
// was rounded up: choose_qparams([FLT_MAX, 1]) at 8 bits gave 255 s = inf. The end's grid point
// is then k steps from the zero point (k = q - z, exact: |k| < 2^24), and |end| / k rounded down
// puts it on |end| or just inside, finite. The zero point stays and the scale shrinks by at most a
// factor 1 - 1/(2k) (|end| >= (k - 1/2) s), so every value still comes back within half a step.
LQ_HD float scale_keeping_end_finite(float end, float s, int32_t z, QRange r) {
  const int32_t q = quantize_value(end, s, z, r.qmin, r.qmax);
  if (!is_nonfinite(dequantize_value(q, s, z))) return s;
  const float k = fabsf(static_cast<float>(static_cast<int64_t>(q) - z));
  const float fit = fabsf(end) / k;
  return fit * k > fabsf(end) ? f32_from_bits(f32_bits(fit) - 1u) : fit;  // positive: one step down
}

// Scale and zero point of one group from its minimum and maximum (an empty group passes 0, 0).
// A constant group c gets s = |c| (1 for c = 0) so it dequantizes exactly to c. A non-constant
// group's scale is at least FLT_MIN so that x / s never divides by zero. An asymmetric group's
// scale is at least |min| / (2^23 - 2^bits), so that its zero point stays within kZeroPointLimit:
// a narrow range far from 0 (1e4 + [0, 3e-3]) would otherwise need a zero point beyond it, and a
// clamped one moved every value to the range's far end (1e4 came back as 1638.4); with the larger
// scale the error is at most |min| 2^-23, fp32's own resolution there. Ends within half a step of
// FLT_MAX keep finite grid points (scale_keeping_end_finite). A returned scale of +inf means the
// group's range overflows fp32; callers report it.
LQ_HD QParams qparams_from_minmax(float mn, float mx, int bits, bool symmetric) {
  const QRange r = q_range(bits, symmetric);
  float s;
  if (mx == mn) {
    s = mx == 0.0f ? 1.0f : fabsf(mx);
  } else if (symmetric) {
    const float amax = fabsf(mn) > fabsf(mx) ? fabsf(mn) : fabsf(mx);
    s = amax / static_cast<float>(r.qmax);
  } else {
    s = (mx - mn) / static_cast<float>(r.qmax - r.qmin);
  }
  if (!symmetric) {
    // |min / s| <= 2^23 - 2^bits (+1 for the division's rounding), so |z| < 2^23.
    const float far = fabsf(mn) / (kZeroPointLimit - static_cast<float>(r.qmax + 1));
    s = s < far ? far : s;
  }
  const float kFloatMin = 1.17549435e-38f;
  s = s < kFloatMin ? kFloatMin : s;
  if (is_nonfinite(s)) return QParams{s, 0};
  const int32_t z = symmetric ? 0 : static_cast<int32_t>(round_half_even(static_cast<float>(r.qmin) - mn / s));
  s = scale_keeping_end_finite(mx, s, z, r);
  return QParams{scale_keeping_end_finite(mn, s, z, r), z};
}

// Whether q - z cannot wrap in int32 for any stored value q (-128..255). Then dequantize_value_int32
// gives dequantize_value's bits (the same difference, the same single rounding to fp32), in SIMD
// lanes: SSE2, AVX2 and NEON have no vector conversion from 64-bit integers to floats.
LQ_HD bool zero_point_fits_int32(int32_t z) { return z >= -(1 << 30) && z <= (1 << 30); }

LQ_HD float dequantize_value_int32(int32_t q, float s, int32_t z) { return s * static_cast<float>(q - z); }

}  // namespace LINQUANT_CPU_ISA
}  // namespace linquant::core
