// The CUDA linear kernels' per-chunk arithmetic, run on the host: the GEMV's chunk_products and
// shared-memory SliceLayout (cuda/linear_gemv.cuh) and the tensor-core kernel's dequant_chunk
// (cuda/linear_mma.cuh) are __host__ __device__, so this checks the parts most prone to index
// mistakes (which x meets which packed value, the bit planes, the int8 flip, the zero points) on
// machines without a GPU. The GEMV test emulates the kernel's walk over warp iterations and lanes
// for one slice and compares with a float64 dot product.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "../../cuda/linear_gemv.cuh"
#include "../../cuda/linear_mma.cuh"

namespace {

using linquant::cuda::chunk_products;
using linquant::cuda::dequant_chunk;
using linquant::cuda::kMmaChunk;
using linquant::cuda::kMagic;
using linquant::cuda::SliceLayout;

template <int BITS, int VEC, int MT, int R>
void check_slice(bool signed8, unsigned seed) {
  using L = SliceLayout<BITS, VEC>;
  constexpr int P = L::P, ITERS = 2;
  constexpr int SV = ITERS * L::WARP_VALUES, SB = ITERS * L::WARP_BYTES;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> xdist(-1.0f, 1.0f);
  std::uniform_int_distribution<int> bytes(0, 255), zdist(-(1 << BITS), 2 << BITS);

  std::vector<float> x(MT * SV);
  for (float& v : x) v = xdist(rng);
  std::vector<uint8_t> w(R * SB);
  for (uint8_t& b : w) b = static_cast<uint8_t>(bytes(rng));
  // A zero point per row and chunk (the kernel's chunks never cross a group).
  std::vector<int> z(R * ITERS * 32);
  for (int& v : z) v = signed8 ? 0 : zdist(rng);

  std::vector<float4> xs4(MT * SV / 4);
  float* xs = reinterpret_cast<float*>(xs4.data());
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < SV; ++v) xs[m * SV + L::position(v)] = x[m * SV + v];

  const uint32_t flip = signed8 ? 0x80808080u : 0u;
  float got[R][MT] = {};
  for (int it = 0; it < ITERS; ++it) {
    for (int lane = 0; lane < 32; ++lane) {
      const int byte = (it * 32 + lane) * VEC;
      uint32_t words[R][VEC / 4];
      float fz[R];
      for (int r = 0; r < R; ++r) {
        std::memcpy(words[r], &w[r * SB + byte], VEC);
        fz[r] = kMagic + static_cast<float>(signed8 ? 128 : z[r * ITERS * 32 + it * 32 + lane]);
      }
      float t[R][MT] = {};
      chunk_products<BITS, VEC, MT, R>(xs4.data(), SV / 4, it, lane, words, flip, fz, t);
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MT; ++m) got[r][m] += t[r][m];
    }
  }

  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MT; ++m) {
      double want = 0.0, mag = 0.0;
      for (int k = 0; k < SV; ++k) {
        const uint8_t b = w[r * SB + k / P];
        const int q = signed8 ? static_cast<int8_t>(b) : (b >> ((k % P) * BITS)) & ((1 << BITS) - 1);
        const int chunk = k / L::V;  // = it * 32 + lane
        const int zero = signed8 ? 0 : z[r * ITERS * 32 + chunk];
        want += static_cast<double>(x[m * SV + k]) * (q - zero);
        mag += std::fabs(static_cast<double>(x[m * SV + k]) * (q - zero));
      }
      EXPECT_NEAR(got[r][m], want, mag * 1e-5 + 1e-6)
          << "bits " << BITS << " vec " << VEC << " row " << r << " m " << m << " signed8 " << signed8;
    }
  }
}

TEST(GemvChunk, EightBit) {
  for (unsigned seed : {1u, 2u}) {
    check_slice<8, 16, 1, 4>(false, seed);
    check_slice<8, 16, 2, 4>(true, seed);
    check_slice<8, 8, 4, 2>(false, seed);
    check_slice<8, 4, 8, 2>(true, seed);
  }
}

TEST(GemvChunk, FourBit) {
  for (unsigned seed : {3u, 4u}) {
    check_slice<4, 16, 1, 4>(false, seed);
    check_slice<4, 16, 4, 2>(false, seed);
    check_slice<4, 8, 2, 4>(false, seed);
    check_slice<4, 4, 8, 2>(false, seed);
  }
}

TEST(GemvChunk, TwoBit) {
  for (unsigned seed : {5u, 6u}) {
    check_slice<2, 8, 1, 4>(false, seed);
    check_slice<2, 8, 8, 2>(false, seed);
    check_slice<2, 4, 2, 4>(false, seed);
  }
}

// Every slice position is used exactly once (the layout is a permutation).
TEST(GemvChunk, LayoutIsAPermutation) {
  auto check = [](auto layout, int sv) {
    using L = decltype(layout);
    std::vector<int> seen(sv, 0);
    for (int v = 0; v < sv; ++v) {
      const int pos = L::position(v);
      ASSERT_GE(pos, 0);
      ASSERT_LT(pos, sv);
      ++seen[pos];
    }
    for (int c : seen) ASSERT_EQ(c, 1);
  };
  check(SliceLayout<8, 16>(), 3 * SliceLayout<8, 16>::WARP_VALUES);
  check(SliceLayout<4, 16>(), 2 * SliceLayout<4, 16>::WARP_VALUES);
  check(SliceLayout<2, 8>(), 2 * SliceLayout<2, 8>::WARP_VALUES);
  check(SliceLayout<2, 4>(), 1 * SliceLayout<2, 4>::WARP_VALUES);
}

// dequant_chunk gives s * (q_i - z) for the 32 values of a chunk in stream order, exactly the
// float dequantize computes.
// zero_range: zero points drawn from [-zero_range, zero_range] (past 2^23 they take the integer
// path; z = 2^23 + 1 once rounded 2^23 + z and came out one step off).
template <int BITS>
void check_dequant_chunk(bool signed8, unsigned seed, int zero_range = 2 << BITS) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> bytes(0, 255), zdist(-zero_range, zero_range);
  uint8_t raw[BITS * 4];
  for (uint8_t& b : raw) b = static_cast<uint8_t>(bytes(rng));
  uint32_t chunk[BITS];
  std::memcpy(chunk, raw, sizeof(raw));
  const int z = signed8 ? 0 : zdist(rng);
  const float s = 0.0123f;
  float got[kMmaChunk];
  dequant_chunk<BITS>(chunk, signed8 ? 0x80808080u : 0u, s, signed8 ? 128 : z, got);
  constexpr int P = 8 / BITS;
  for (int i = 0; i < kMmaChunk; ++i) {
    const uint8_t b = raw[i / P];
    const int64_t q = signed8 ? static_cast<int8_t>(b) : (b >> ((i % P) * BITS)) & ((1 << BITS) - 1);
    EXPECT_EQ(got[i], s * static_cast<float>(q - z)) << "bits " << BITS << " value " << i << " z " << z;
  }
}

// dequant_chunk_pairs (paired 16-bit arithmetic) gives the same bits as dequant_chunk's fp32
// values rounded to T, for scales stored in T and zero points within the magic's range.
template <int BITS, typename T>
void check_pairs(bool signed8, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> bytes(0, 255);
  const int limit = std::is_same_v<T, linquant::core::half_t> ? 1024 : 128;
  std::uniform_int_distribution<int> zdist(-limit, limit);
  std::uniform_real_distribution<float> sdist(-20.0f, 4.0f);
  for (int trial = 0; trial < 200; ++trial) {
    uint8_t raw[BITS * 4];
    for (uint8_t& b : raw) b = static_cast<uint8_t>(bytes(rng));
    uint32_t chunk[BITS];
    std::memcpy(chunk, raw, sizeof(raw));
    const int z = signed8 ? 128 : zdist(rng);
    const T s = linquant::core::from_float<T>(std::exp2(sdist(rng)));
    const uint32_t flip = signed8 ? 0x80808080u : 0u;
    float want[kMmaChunk];
    dequant_chunk<BITS>(chunk, flip, linquant::core::to_float(s), z, want);
    uint32_t got[kMmaChunk / 2];
    linquant::cuda::dequant_chunk_pairs<BITS, T>(chunk, flip, s.bits, z, got);
    for (int i = 0; i < kMmaChunk; ++i) {
      const uint16_t bits = static_cast<uint16_t>(got[i / 2] >> (16 * (i % 2)));
      ASSERT_EQ(bits, linquant::core::from_float<T>(want[i]).bits)
          << "bits " << BITS << " value " << i << " z " << z << " s " << linquant::core::to_float(s);
    }
  }
}

TEST(MmaChunk, PairedHalfArithmeticIsExact) {
  using linquant::core::bf16_t;
  using linquant::core::half_t;
  check_pairs<8, half_t>(false, 1);
  check_pairs<8, half_t>(true, 2);
  check_pairs<4, half_t>(false, 3);
  check_pairs<2, half_t>(false, 4);
  check_pairs<4, bf16_t>(false, 5);
  check_pairs<2, bf16_t>(false, 6);
}

TEST(MmaChunk, DequantizesInStreamOrder) {
  for (unsigned seed : {7u, 8u, 9u}) {
    check_dequant_chunk<8>(false, seed);
    check_dequant_chunk<8>(true, seed);
    check_dequant_chunk<4>(false, seed);
    check_dequant_chunk<2>(false, seed);
  }
  // Zero points anywhere in int32, most past 2^23.
  for (unsigned seed = 10; seed < 40; ++seed) {
    check_dequant_chunk<8>(false, seed, INT32_MAX);
    check_dequant_chunk<4>(false, seed, INT32_MAX);
    check_dequant_chunk<2>(false, seed, (1 << 23) + 64);
  }
}

}  // namespace
