// The torch-free cores: float conversions against c10 (exhaustively), the qparams formula against
// the seeds' worked numbers, and every ISA variant of the span kernels against the scalar formula.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/quant_math.h"
#include "cpu/cpu_features.h"
#include "cpu/quantize_kernels.h"

namespace core = linquant::core;
using linquant::cpu::QuantizeKernels;

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

TEST(FloatConvert, HalfToFloatMatchesC10ForEveryBitPattern) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float ours = core::to_float(core::half_t{static_cast<uint16_t>(b)});
    const float ref = static_cast<float>(c10::Half(static_cast<uint16_t>(b), c10::Half::from_bits()));
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(ours)) << b;
    } else {
      EXPECT_EQ(bits_of(ours), bits_of(ref)) << b;
    }
  }
}

TEST(FloatConvert, FloatToHalfAndBFloat16MatchC10) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = any(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    EXPECT_EQ(core::from_float<core::half_t>(f).bits, c10::Half(f).x) << f;
    EXPECT_EQ(core::from_float<core::bf16_t>(f).bits, c10::BFloat16(f).x) << f;
  }
}

TEST(QuantMath, SeedAsymmetricOneToNine) {
  // Seed linear_q_with_eval: 1..9 at int8 -> scale 8/255; our unsigned range gives z = -32
  // (the seed's signed range gives -160: the same grid shifted by 128) and MSE 7.6893e-05.
  const core::QParams qp = core::qparams_from_minmax(1.0f, 9.0f, 8, /*symmetric=*/false);
  EXPECT_FLOAT_EQ(qp.scale, 8.0f / 255.0f);
  EXPECT_EQ(qp.zero_point, -32);
  double mse = 0;
  for (int v = 1; v <= 9; ++v) {
    const int32_t q = core::quantize_value(static_cast<float>(v), qp.scale, qp.zero_point, 0, 255);
    const double e = core::dequantize_value(q, qp.scale, qp.zero_point) - v;
    mse += e * e / 9;
  }
  EXPECT_NEAR(mse, 7.6893e-05, 5e-9);
}

TEST(QuantMath, ConstantGroupsRoundTripExactly) {
  for (float c : {0.0f, 1.0f, -3.25f, 1e-30f, 7e30f, 0.1f}) {
    for (bool sym : {true, false}) {
      for (int bits : {2, 4, 8}) {
        const core::QRange r = core::q_range(bits, sym);
        const core::QParams qp = core::qparams_from_minmax(c, c, bits, sym);
        ASSERT_GT(qp.scale, 0.0f);
        const int32_t q = core::quantize_value(c, qp.scale, qp.zero_point, r.qmin, r.qmax);
        EXPECT_EQ(core::dequantize_value(q, qp.scale, qp.zero_point), c) << c << " bits " << bits;
      }
    }
  }
}

TEST(QuantMath, RangesReachingFloatMaxKeepFiniteGridPoints) {
  // FLT_MAX / 127 rounds up, so 127 s was inf: the symmetric scale is one step down. Asymmetric
  // ends within half a step of FLT_MAX get |end| / k rounded down. Every value of each range (its
  // ends and values between) comes back finite and within half a step (plus fp32's rounding).
  const float top = std::numeric_limits<float>::max();
  EXPECT_TRUE(std::isinf(top / 127.0f * 127.0f));
  EXPECT_EQ(core::qparams_from_minmax(1.0f, top, 8, true).scale, std::nextafter(top / 127.0f, 0.0f));
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (int i = 0; i < 2000; ++i) {
    const float end = top * (1.0f - unit(rng) * std::ldexp(1.0f, -(i % 24))), sign = i % 2 ? 1.0f : -1.0f;
    const float other = sign * end * (i % 3 ? unit(rng) : 1.0f - unit(rng) * 1e-3f);
    const float mn = std::min(sign * end, other), mx = std::max(sign * end, other);
    for (bool sym : {true, false}) {
      for (int bits : {2, 3, 4, 8}) {
        const core::QRange r = core::q_range(bits, sym);
        const core::QParams qp = core::qparams_from_minmax(mn, mx, bits, sym);
        ASSERT_TRUE(std::isfinite(qp.scale));
        for (float v : {mn, mx, 0.5f * mn + 0.5f * mx}) {
          const float back = core::dequantize_value(core::quantize_value(v, qp.scale, qp.zero_point, r.qmin, r.qmax),
                                                    qp.scale, qp.zero_point);
          ASSERT_TRUE(std::isfinite(back)) << mn << " " << mx << " bits " << bits << " sym " << sym;
          const double err = std::fabs(static_cast<double>(back) - v);
          ASSERT_LE(err, qp.scale / 2.0 + (std::fabs(v) + std::fabs(back)) * std::ldexp(1.0, -23)) << mn << " " << mx;
        }
      }
    }
  }
}

TEST(QuantMath, RoundsHalfToEven) {
  EXPECT_EQ(core::quantize_value(2.5f, 1.0f, 0, -128, 127), 2);
  EXPECT_EQ(core::quantize_value(3.5f, 1.0f, 0, -128, 127), 4);
  EXPECT_EQ(core::quantize_value(-2.5f, 1.0f, 0, -128, 127), -2);
  EXPECT_EQ(core::quantize_value(1000.0f, 1.0f, 0, -8, 7), 7);
  EXPECT_EQ(core::quantize_value(-1000.0f, 1.0f, 3, 0, 15), 0);
}

std::vector<const QuantizeKernels*> supported_tables() {
  std::vector<const QuantizeKernels*> t = {&linquant::cpu::quantize_kernels_baseline()};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    t.push_back(&linquant::cpu::quantize_kernels_avx2());
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    t.push_back(&linquant::cpu::quantize_kernels_avx512());
#endif
  return t;
}

TEST(SpanKernels, EveryIsaMatchesTheScalarFormula) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t n : {0, 1, 7, 16, 63, 64, 65, 1000, 4099}) {
    std::vector<float> x(n);
    for (auto& v : x) v = normal(rng);
    for (const QuantizeKernels* k : supported_tables()) {
      float mn = INFINITY, mx = -INFINITY;
      uint32_t bad = 0;
      k->minmax[linquant::cpu::kF32](x.data(), n, &mn, &mx, &bad);
      EXPECT_EQ(bad, 0u);
      if (n > 0) {
        EXPECT_EQ(mn, *std::min_element(x.begin(), x.end()));
        EXPECT_EQ(mx, *std::max_element(x.begin(), x.end()));
      }
      for (bool sym : {true, false}) {
        const int bits = 4;
        const core::QRange r = core::q_range(bits, sym);
        const core::QParams qp = core::qparams_from_minmax(n ? mn : 0.f, n ? mx : 0.f, bits, sym);
        std::vector<uint8_t> q(n);
        std::vector<float> back(n);
        const int it = sym ? linquant::cpu::kInt8 : linquant::cpu::kUInt8;
        k->quantize[linquant::cpu::kF32][it](x.data(), n, qp.scale, qp.zero_point, r.qmin, r.qmax, q.data(), &bad);
        k->dequantize[it][linquant::cpu::kF32](q.data(), n, qp.scale, qp.zero_point, back.data());
        for (int64_t i = 0; i < n; ++i) {
          const int32_t ref = core::quantize_value(x[i], qp.scale, qp.zero_point, r.qmin, r.qmax);
          const int32_t got = sym ? static_cast<int8_t>(q[i]) : q[i];
          ASSERT_EQ(got, ref) << "i=" << i << " n=" << n;
          ASSERT_EQ(back[i], core::dequantize_value(ref, qp.scale, qp.zero_point));
        }
      }
    }
  }
}

// Zero points on both sides of +-2^30, where the span kernels stop taking q - z in int32 lanes, and
// at the int32 limits: every stored value (int8 and uint8) gives the 64-bit formula's bits.
TEST(SpanKernels, DequantizeZeroPointsAtTheInt32Limits) {
  const int32_t lim = std::numeric_limits<int32_t>::max();
  std::vector<uint8_t> q(256);
  for (int i = 0; i < 256; ++i) q[i] = static_cast<uint8_t>(i);
  std::vector<float> back(256);
  for (const int32_t z : {-lim - 1, -lim + 300, -(1 << 30) - 1, -(1 << 30), -5, 0, 200, 1 << 30, (1 << 30) + 1, lim - 200, lim}) {
    for (const QuantizeKernels* k : supported_tables()) {
      for (const int it : {linquant::cpu::kInt8, linquant::cpu::kUInt8}) {
        k->dequantize[it][linquant::cpu::kF32](q.data(), 256, 0.3f, z, back.data());
        for (int i = 0; i < 256; ++i) {
          const int32_t v = it == linquant::cpu::kInt8 ? static_cast<int8_t>(q[i]) : q[i];
          ASSERT_EQ(bits_of(back[i]), bits_of(0.3f * static_cast<float>(static_cast<double>(v) - z))) << "z=" << z << " q=" << v;
        }
      }
    }
  }
}

TEST(SpanKernels, NonFiniteInputsAreFlagged) {
  for (const QuantizeKernels* k : supported_tables()) {
    for (float badv : {NAN, INFINITY, -INFINITY}) {
      std::vector<float> x(37, 1.0f);
      x[29] = badv;
      float mn = INFINITY, mx = -INFINITY;
      uint32_t bad = 0;
      k->minmax[linquant::cpu::kF32](x.data(), 37, &mn, &mx, &bad);
      EXPECT_NE(bad, 0u);
      bad = 0;
      std::vector<int8_t> q(37);
      k->quantize[linquant::cpu::kF32][linquant::cpu::kInt8](x.data(), 37, 1.0f, 0, -128, 127, q.data(), &bad);
      EXPECT_NE(bad, 0u);
    }
  }
}

}  // namespace
