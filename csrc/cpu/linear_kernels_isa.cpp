// Weight-only quantized linear inner loops, compiled once per instruction set (see
// linear_kernels.h for the data layout). The AVX-512 and AVX2 copies dequantize in registers while
// streaming each weight row once and keep up to kTile activation rows' accumulators in registers;
// the baseline copy is plain C++.
#include <algorithm>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "linear_kernels.h"

namespace linquant::cpu {
namespace {

// Activation rows processed together: their accumulators stay in registers while a weight chunk
// is converted once.
constexpr int kTile = 4;

struct RowParams {
  float s;
  int32_t z;
  float sz;  // s * z, for the xsum correction
};

inline RowParams params(const LinearArgs& a, int64_t n, int64_t g) {
  const float s = a.scales[n * a.groups + g];
  const int32_t z = a.zeros != nullptr ? a.zeros[n * a.groups + g] : a.zero_const;
  return {s, z, s * static_cast<float>(z)};
}

inline const float* xstream(const LinearArgs& a, int64_t m, int r) {
  return a.xd + (m * (8 / a.bits) + r) * a.row_bytes;
}

// ---- plain C++ (baseline ISA, and every ISA's fallback for tails) -------------------------------
template <int BITS, bool SIGNED>
inline int32_t weight_int(const uint8_t* wrow, int64_t j, int r) {
  if constexpr (BITS == 8) {
    return SIGNED ? static_cast<int32_t>(static_cast<int8_t>(wrow[j])) : static_cast<int32_t>(wrow[j]);
  } else {
    return (wrow[j] >> (r * BITS)) & ((1 << BITS) - 1);
  }
}

template <int BITS, bool SIGNED>
inline float weight_value(const uint8_t* wrow, int64_t j, int r) {
  return static_cast<float>(weight_int<BITS, SIGNED>(wrow, j, r));
}

template <int BITS, bool SIGNED>
void gemv_scalar(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int PER = 8 / BITS;
  const int64_t gb = a.group / PER;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = a.w + n * a.row_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      float total = 0.0f;
      for (int64_t g = 0; g < a.groups; ++g) {
        const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
        float acc = 0.0f;
        for (int r = 0; r < PER; ++r) {
          const float* x = xstream(a, m, r);
          for (int64_t j = b0; j < b1; ++j) acc += x[j] * weight_value<BITS, SIGNED>(wrow, j, r);
        }
        const RowParams p = params(a, n, g);
        total += p.s * acc - p.sz * a.xsum[m * a.groups + g];
      }
      a.y[m * a.N + n] = total + (a.bias != nullptr ? a.bias[n] : 0.0f);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// ---- AVX-512: 16 weight bytes per step, masked tails -------------------------------------------
template <int BITS, bool SIGNED, int MT>
void gemv_tile_avx512(const LinearArgs& a, int64_t n, int64_t m0) {
  constexpr int PER = 8 / BITS;
  const int64_t gb = a.group / PER;
  const uint8_t* wrow = a.w + n * a.row_bytes;
  const __m512i low_bits = _mm512_set1_epi32((1 << BITS) - 1);
  __m512 total[MT];
  float corr[MT];
  for (int t = 0; t < MT; ++t) {
    total[t] = _mm512_setzero_ps();
    corr[t] = 0.0f;
  }
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
    __m512 acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t j = b0; j < b1; j += 16) {
      const int64_t rem = b1 - j;
      const __mmask16 mask = rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
      const __m128i wb = _mm_maskz_loadu_epi8(mask, wrow + j);
      const __m512i wi = SIGNED ? _mm512_cvtepi8_epi32(wb) : _mm512_cvtepu8_epi32(wb);
#pragma GCC unroll 4
      for (int r = 0; r < PER; ++r) {
        const __m512i q = BITS == 8 ? wi : _mm512_and_si512(_mm512_srli_epi32(wi, r * BITS), low_bits);
        const __m512 wv = _mm512_cvtepi32_ps(q);
        for (int t = 0; t < MT; ++t) {
          const __m512 xv = _mm512_maskz_loadu_ps(mask, xstream(a, m0 + t, r) + j);
          acc[t] = _mm512_fmadd_ps(wv, xv, acc[t]);
        }
      }
    }
    const RowParams p = params(a, n, g);
    const __m512 s = _mm512_set1_ps(p.s);
    for (int t = 0; t < MT; ++t) {
      total[t] = _mm512_fmadd_ps(acc[t], s, total[t]);
      corr[t] += p.sz * a.xsum[(m0 + t) * a.groups + g];
    }
  }
  const float b = a.bias != nullptr ? a.bias[n] : 0.0f;
  for (int t = 0; t < MT; ++t) a.y[(m0 + t) * a.N + n] = _mm512_reduce_add_ps(total[t]) - corr[t] + b;
}

template <int BITS, bool SIGNED, int MT>
void gemv_tile(const LinearArgs& a, int64_t n, int64_t m0) {
  gemv_tile_avx512<BITS, SIGNED, MT>(a, n, m0);
}
#define LINQUANT_HAVE_SIMD_GEMV 1

#elif defined(__AVX2__) && defined(__FMA__)
// ---- AVX2: 8 weight bytes per step, scalar tails ------------------------------------------------
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS, bool SIGNED, int MT>
void gemv_tile(const LinearArgs& a, int64_t n, int64_t m0) {
  constexpr int PER = 8 / BITS;
  const int64_t gb = a.group / PER;
  const uint8_t* wrow = a.w + n * a.row_bytes;
  const __m256i low_bits = _mm256_set1_epi32((1 << BITS) - 1);
  __m256 total[MT];
  float corr[MT];
  for (int t = 0; t < MT; ++t) {
    total[t] = _mm256_setzero_ps();
    corr[t] = 0.0f;
  }
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
    __m256 acc[MT];
    float tail[MT];
    for (int t = 0; t < MT; ++t) {
      acc[t] = _mm256_setzero_ps();
      tail[t] = 0.0f;
    }
    int64_t j = b0;
    for (; j + 8 <= b1; j += 8) {
      const __m128i wb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrow + j));
      const __m256i wi = SIGNED ? _mm256_cvtepi8_epi32(wb) : _mm256_cvtepu8_epi32(wb);
#pragma GCC unroll 4
      for (int r = 0; r < PER; ++r) {
        const __m256i q = BITS == 8 ? wi : _mm256_and_si256(_mm256_srli_epi32(wi, r * BITS), low_bits);
        const __m256 wv = _mm256_cvtepi32_ps(q);
        for (int t = 0; t < MT; ++t) {
          acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xstream(a, m0 + t, r) + j), acc[t]);
        }
      }
    }
    for (; j < b1; ++j) {
      for (int r = 0; r < PER; ++r) {
        const float wv = weight_value<BITS, SIGNED>(wrow, j, r);
        for (int t = 0; t < MT; ++t) tail[t] += wv * xstream(a, m0 + t, r)[j];
      }
    }
    const RowParams p = params(a, n, g);
    const __m256 s = _mm256_set1_ps(p.s);
    for (int t = 0; t < MT; ++t) {
      total[t] = _mm256_fmadd_ps(acc[t], s, total[t]);
      corr[t] += p.sz * a.xsum[(m0 + t) * a.groups + g] - p.s * tail[t];
    }
  }
  const float b = a.bias != nullptr ? a.bias[n] : 0.0f;
  for (int t = 0; t < MT; ++t) a.y[(m0 + t) * a.N + n] = hsum256(total[t]) - corr[t] + b;
}
#define LINQUANT_HAVE_SIMD_GEMV 1
#endif

template <int BITS, bool SIGNED>
void gemv(const LinearArgs& a, int64_t n0, int64_t n1) {
#if defined(LINQUANT_HAVE_SIMD_GEMV)
  for (int64_t n = n0; n < n1; ++n) {
    // The weight row is read from memory by the first tile and from L1/L2 by the others.
    int64_t m = 0;
    for (; m + kTile <= a.M; m += kTile) gemv_tile<BITS, SIGNED, kTile>(a, n, m);
    switch (a.M - m) {
      case 3:
        gemv_tile<BITS, SIGNED, 3>(a, n, m);
        break;
      case 2:
        gemv_tile<BITS, SIGNED, 2>(a, n, m);
        break;
      case 1:
        gemv_tile<BITS, SIGNED, 1>(a, n, m);
        break;
      default:
        break;
    }
  }
#else
  gemv_scalar<BITS, SIGNED>(a, n0, n1);
#endif
}

void gemv_dispatch(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.bits) {
    case 8:
      return a.signed_q ? gemv<8, true>(a, n0, n1) : gemv<8, false>(a, n0, n1);
    case 4:
      return gemv<4, false>(a, n0, n1);
    default:
      return gemv<2, false>(a, n0, n1);
  }
}

template <int BITS, bool SIGNED>
void dequant(const LinearArgs& a, int64_t n0, int64_t n1, float* out) {
  constexpr int PER = 8 / BITS;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = a.w + n * a.row_bytes;
    float* o = out + (n - n0) * a.K;
    for (int64_t g = 0; g < a.groups; ++g) {
      const RowParams p = params(a, n, g);
      const int64_t k1 = std::min((g + 1) * a.group, a.K);
#pragma omp simd
      for (int64_t k = g * a.group; k < k1; ++k) {
        // s * (q - z), exactly as linquant::dequantize computes it.
        o[k] = p.s * static_cast<float>(weight_int<BITS, SIGNED>(wrow, k / PER, static_cast<int>(k % PER)) - p.z);
      }
    }
  }
}

void dequant_dispatch(const LinearArgs& a, int64_t n0, int64_t n1, float* out) {
  switch (a.bits) {
    case 8:
      return a.signed_q ? dequant<8, true>(a, n0, n1, out) : dequant<8, false>(a, n0, n1, out);
    case 4:
      return dequant<4, false>(a, n0, n1, out);
    default:
      return dequant<2, false>(a, n0, n1, out);
  }
}

const LinearKernels kTable = {gemv_dispatch, dequant_dispatch};

}  // namespace

const LinearKernels& LINQUANT_ISA_NAME(linear_kernels)() { return kTable; }

}  // namespace linquant::cpu
