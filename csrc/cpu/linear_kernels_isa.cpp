// Weight-only quantized linear inner loops, compiled once per instruction set (see
// linear_kernels.h for the data layout). The AVX-512 and AVX2 copies dequantize in registers while
// streaming each weight row once, tiled over weight and activation rows; the baseline copy is
// plain C++.
#include <algorithm>
#include <bit>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../core/pack_span.h"
#include "../core/quant_math.h"
#include "../core/quantize_span.h"
#include "linear_kernels.h"

namespace linquant::cpu {
namespace {

namespace core = linquant::core::LINQUANT_CPU_ISA;

struct RowParams {
  float s;
  int32_t z;
};

// Scale i of a's [N, G] scales, stored as S (float, core::bf16_t or core::half_t), in fp32: exact,
// as c10 converts fp16 and bf16.
template <typename S>
inline float scale_at(const LinearArgs& a, int64_t i) {
  return core::to_float(static_cast<const S*>(a.scales)[i]);
}

template <typename S>
inline RowParams params(const LinearArgs& a, int64_t n, int64_t g) {
  const int32_t z = a.zeros != nullptr ? a.zeros[n * a.groups + g] : a.zero_const;
  return {scale_at<S>(a, n * a.groups + g), z};
}

// fn.template operator()<BITS, SIGNED, S>() for the weight format of `a`: int8 symmetric weights
// are signed, every other format unsigned; S is the scales' element type. The kernels are compiled
// per scale dtype and read fp16 / bf16 scales as they are: converting a thread's scales to fp32
// first cost a write and a read of each per call (bf16 activations and scales, 4-bit g16, M = 1,
// 4096x14336 and 14336x4096: 1.0-1.05 ms, now 0.77-0.80), and a switch on the dtype at each read
// made the fp32 lookup-table kernels 1.2-1.35x slower at groups of 16 or 32.
template <typename Fn>
void for_format(const LinearArgs& a, Fn&& fn) {
  const auto with_scales = [&]<typename S>() {
    switch (a.bits) {
      case 8:
        return a.signed_q ? fn.template operator()<8, true, S>() : fn.template operator()<8, false, S>();
      case 4:
        return fn.template operator()<4, false, S>();
      default:
        return fn.template operator()<2, false, S>();
    }
  };
  switch (a.scale_type) {
    case ScaleType::bf16:
      return with_scales.template operator()<core::bf16_t>();
    case ScaleType::f16:
      return with_scales.template operator()<core::half_t>();
    default:
      return with_scales.template operator()<float>();
  }
}

// Weight rows per block: a block's weights (at most 32 x K bytes) stay in L2 while every
// activation tile passes over them, so they are read from memory once.
constexpr int64_t kRowBlock = 32;

// fn.template operator()<MT>(nb, nb1, m0) for every block [nb, nb1) of weight rows within
// [n0, n1) and every tile of MT activation rows from m0: tiles of 4, then one of the 3, 2 or 1 left.
template <typename Fn>
void row_tiles(const LinearArgs& a, int64_t n0, int64_t n1, Fn&& fn) {
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t nb1 = std::min(nb + kRowBlock, n1);
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) fn.template operator()<4>(nb, nb1, m);
    if (a.M - m == 3) fn.template operator()<3>(nb, nb1, m);
    if (a.M - m == 2) fn.template operator()<2>(nb, nb1, m);
    if (a.M - m == 1) fn.template operator()<1>(nb, nb1, m);
  }
}

template <int PER>
inline const float* xstream(const LinearArgs& a, int64_t m, int r) {
  return a.xd + (m * PER + r) * a.row_bytes;
}

// ---- plain C++ (the baseline instruction set: other architectures, x86 without AVX2) -----------
// Written for the compiler's vectorizer (SSE2 or NEON lanes): each weight row is dequantized into
// the activation streams' layout (stream r of row m is x[j * PER + r] for byte j, contiguous over
// r: linear_kernels.h), then dotted with every activation row in one reduction.
template <int BITS, bool SIGNED>
inline int32_t weight_int(const uint8_t* wrow, int64_t j, int r) {
  if constexpr (BITS == 8) {
    return SIGNED ? static_cast<int32_t>(static_cast<int8_t>(wrow[j])) : static_cast<int32_t>(wrow[j]);
  } else {
    return (wrow[j] >> (r * BITS)) & ((1 << BITS) - 1);
  }
}

// Weight row `wrow` dequantized into out[r * row_bytes + j] (value r of byte j), s * (q - z) exactly
// as linquant::dequantize.
template <int BITS, bool SIGNED, typename S>
void dequant_streams(const LinearArgs& a, int64_t n, const uint8_t* wrow, float* out) {
  constexpr int PER = 8 / BITS;
  const int64_t gb = a.group / PER;
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
    const RowParams p = params<S>(a, n, g);
    for (int r = 0; r < PER; ++r) {
      core::dequantize_values(b1 - b0, p.s, p.z, out + r * a.row_bytes + b0,
                              [&](int64_t j) { return weight_int<BITS, SIGNED>(wrow, b0 + j, r); });
    }
  }
}

template <int BITS, bool SIGNED, typename S>
void gemv_scalar(const LinearArgs& a, int64_t n0, int64_t n1) {
  const int64_t len = 8 / BITS * a.row_bytes;  // one activation row's streams, and a weight row's
  std::vector<float> wd(static_cast<size_t>(len));
  for (int64_t n = n0; n < n1; ++n) {
    dequant_streams<BITS, SIGNED, S>(a, n, a.w + n * a.row_bytes, wd.data());
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.xd + m * len;
      const float* w = wd.data();
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) acc += x[i] * w[i];
      a.y[m * a.N + n] = acc + (a.bias != nullptr ? a.bias[n] : 0.0f);
    }
  }
}

// The sum of a vector's lanes, per instruction set, and y[m0 + t, n0 + u] = that sum of
// sums[t][u] + bias[n0 + u] for a register tile's sums.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
template <int MT, int NT, typename V>
inline void store_tile(const LinearArgs& a, int64_t n0, int64_t m0, const V (&sums)[MT][NT]) {
  for (int u = 0; u < NT; ++u) {
    const float b = a.bias != nullptr ? a.bias[n0 + u] : 0.0f;
    for (int t = 0; t < MT; ++t) a.y[(m0 + t) * a.N + n0 + u] = hsum(sums[t][u]) + b;
  }
}

// A prefetch of p's cache line into every level, in inline assembly: GCC's vectorizer deletes the
// __builtin_prefetch calls of code it vectorizes, and did so with NextTile's address arithmetic
// (the kernels lost every prefetch and ran 4-5x slower at M = 1). A prefetch never faults, so p may
// lie past the end of what it points into.
inline void prefetch_line(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }

// The next tile's rows (the NT weight rows after this tile's, stored right after them), asked for a
// tile ahead, so that they arrive from DRAM while this one computes: at(j) asks for the cache line
// at byte j of each weight row (the line this tile reads at j), and, below one group per row, the
// line of each row's scales (and zero points) holding the group of byte j. Hardware prefetchers,
// following 4-8 streams per thread, were found not to on a cloud VM (W4 g128 bf16 at M = 1 from
// DRAM: 843 -> 192 us per 4096 x 4096 call). The scales and zero points are a stream per row
// beside the weights', as large as half of them at 4-bit g16 in fp32: without asking for them,
// fp32 scales at M = 1 (bf16 activations) ran 2-4x slower at 4-bit g32 / g16 and 2-bit g32
// (4096 x 14336, K x N, 4-bit g16: 4.0 -> 0.9 ms). Past the weights' end it asks for lines no one
// reads.
template <int NT>
class NextTile {
 public:
  NextTile(const LinearArgs& a, int64_t n0)
      : w_(a.w + (n0 + NT) * a.row_bytes),
        row_bytes_(a.row_bytes),
        group_bytes_(a.group * a.bits / 8),
        groups_(a.groups),
        scale_bytes_(a.scale_type == ScaleType::f32 ? 4 : 2),
        scales_(a.groups > 1 ? static_cast<const char*>(a.scales) + (n0 + NT) * a.groups * scale_bytes_ : nullptr),
        zeros_(a.groups > 1 && a.zeros != nullptr ? a.zeros + (n0 + NT) * a.groups : nullptr) {}

  // at(j) where byte j starts a cache line: the kernels, loading 16 or 32 bytes at a time, ask at
  // every load.
  void at_line_start(int64_t j) const {
    if ((j & 63) == 0) at(j);
  }

  void at(int64_t j) const {
    for (int u = 0; u < NT; ++u) prefetch_line(w_ + u * row_bytes_ + j);
    if (scales_ == nullptr) return;
    const int64_t g = j / group_bytes_;
    for (int u = 0; u < NT; ++u) prefetch_line(scales_ + (u * groups_ + g) * scale_bytes_);
    if (zeros_ == nullptr) return;
    for (int u = 0; u < NT; ++u) prefetch_line(zeros_ + u * groups_ + g);
  }

 private:
  const uint8_t* w_;
  int64_t row_bytes_, group_bytes_, groups_, scale_bytes_;
  const char* scales_;
  const int32_t* zeros_;
};

// chunk.template operator()<TAIL>(j) for the BYTES-byte chunks of bytes [b0, b1): whole ones, then
// the rest (TAIL: its loads masked), prefetching the next tile's rows. Only the last chunk's loads
// are masked: AVX-512 loads masked in every chunk (all lanes but the last chunk's) cost the
// lookup-table kernels up to a quarter of their time at M = 1 (see tile_lut_words).
template <int BYTES, int NT, typename Chunk>
inline void chunks(const NextTile<NT>& next, int64_t b0, int64_t b1, Chunk&& chunk) {
  int64_t j = b0;
  for (; j + BYTES <= b1; j += BYTES) {
    next.at_line_start(j);
    chunk.template operator()<false>(j);
  }
  if (j < b1) chunk.template operator()<true>(j);
}

#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// ---- AVX-512 -------------------------------------------------------------------------------------
// Register tiles of NT weight rows x MT activation rows: each 16-byte weight chunk is loaded once
// per tile, each activation vector once per tile. Masked loads end groups and rows.
inline __mmask16 chunk_mask(int64_t rem) {
  return rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
}

// 8-bit: products of q - z accumulate per group and are scaled once per group. q - z is taken in
// fp32, exact while |z| <= 2^24 (choose_qparams keeps zero points within 2^23): in int32 lanes a
// zero point within 255 of the int32 limits would wrap. So are the tables below.
template <bool SIGNED, typename S, int MT, int NT>
void tile8(const LinearArgs& a, int64_t n0, int64_t m0) {
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  const float* xs[MT];
  for (int t = 0; t < MT; ++t) xs[t] = xstream<1>(a, m0 + t, 0);
  __m512 total[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < NT; ++u) total[t][u] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * a.group, b1 = std::min(b0 + a.group, a.row_bytes);
    __m512 zv[NT];
    for (int u = 0; u < NT; ++u) zv[u] = _mm512_set1_ps(static_cast<float>(params<S>(a, n0 + u, g).z));
    __m512 acc[MT][NT];
    for (int t = 0; t < MT; ++t)
      for (int u = 0; u < NT; ++u) acc[t][u] = _mm512_setzero_ps();
    chunks<16>(next, b0, b1, [&]<bool TAIL>(int64_t j) {
      const __mmask16 mask = TAIL ? chunk_mask(b1 - j) : chunk_mask(16);
      __m512 wv[NT];
      for (int u = 0; u < NT; ++u) {
        const __m128i wb = _mm_maskz_loadu_epi8(mask, wrow[u] + j);
        wv[u] = SIGNED ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(wb))
                       : _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(wb)), zv[u]);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, xs[t] + j);
        for (int u = 0; u < NT; ++u) acc[t][u] = _mm512_fmadd_ps(wv[u], xv, acc[t][u]);
      }
    });
    for (int u = 0; u < NT; ++u) {
      const __m512 sv = _mm512_set1_ps(params<S>(a, n0 + u, g).s);
      for (int t = 0; t < MT; ++t) total[t][u] = _mm512_fmadd_ps(acc[t][u], sv, total[t][u]);
    }
  }
  store_tile(a, n0, m0, total);
}

// The fp32 sums of the lookup-table kernels' MT x NT register tile. With one activation row a
// tile has only NT = 4 chains of dependent FMAs, which the FMA's latency (4 cycles, 2 FMAs a cycle
// on Zen 5) held to 1 FMA a cycle: so then each sum is split over two chains, which the kernels
// alternate between by value position, and added once at the end (4096x2048 W4 g128 from L2, one
// thread: 1.70 -> 1.49 cycles per 16 weights; from DRAM, 14336x4096 at M = 1: 0.85 -> 0.75 ms).
template <int MT, int NT, int CHAINS = MT == 1 ? 2 : 1>
struct TileSums {
  static constexpr int kChains = CHAINS;
  __m512 v[kChains][MT][NT];

  TileSums() {
    for (auto& chain : v)
      for (auto& row : chain)
        for (auto& sum : row) sum = _mm512_setzero_ps();
  }
  // sums[t][u] += w * x in the chain of value position `position`.
  void fma(int position, int t, int u, __m512 w, __m512 x) {
    __m512& sum = v[position % kChains][t][u];
    sum = _mm512_fmadd_ps(w, x, sum);
  }
  // Inlined always: out of line (which GCC chose once a fourth kernel used these sums) the sums
  // lived in memory, and the kernels ran 1.4-1.6x slower.
  [[gnu::always_inline]] void store(const LinearArgs& a, int64_t n0, int64_t m0) {
    for (int c = 1; c < kChains; ++c)
      for (int t = 0; t < MT; ++t)
        for (int u = 0; u < NT; ++u) v[0][t][u] = _mm512_add_ps(v[0][t][u], v[c][t][u]);
    store_tile(a, n0, m0, v[0]);
  }
  // sums[t][u] += block[t][u] * scale[u], chain by chain.
  void add_scaled(const TileSums& block, const __m512 (&scale)[NT]) {
    for (int c = 0; c < kChains; ++c)
      for (int t = 0; t < MT; ++t)
        for (int u = 0; u < NT; ++u) v[c][t][u] = _mm512_fmadd_ps(block.v[c][t][u], scale[u], v[c][t][u]);
  }
};

// 4 and 2 bits: per group and row, a 16-entry table of the dequantized values s * (i - z) (entry
// i for the value i & (2^BITS - 1)), so one permute turns packed indices straight into weights
// (it reads only the low 4 bits of each index: no masking needed). Its loads stay masked in every
// chunk: split into whole chunks and a tail (chunks<16>), GCC kept the sums in memory across each
// group's loop, and 4-bit g32 took 2.0 -> 2.3 cycles per 16 weights at M = 1.
template <int BITS, typename S, int MT, int NT>
void tile_lut(const LinearArgs& a, int64_t n0, int64_t m0) {
  constexpr int PER = 8 / BITS;
  const int64_t gb = a.group / PER;
  const __m512i entry_values = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32((1 << BITS) - 1));
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  const float* xs[MT][PER];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < PER; ++r) xs[t][r] = xstream<PER>(a, m0 + t, r);
  TileSums<MT, NT> acc;
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
    __m512 table[NT];
    for (int u = 0; u < NT; ++u) {
      const RowParams p = params<S>(a, n0 + u, g);
      table[u] = _mm512_mul_ps(
          _mm512_sub_ps(_mm512_cvtepi32_ps(entry_values), _mm512_set1_ps(static_cast<float>(p.z))), _mm512_set1_ps(p.s));
    }
    for (int64_t j = b0; j < b1; j += 16) {
      next.at_line_start(j);
      const __mmask16 mask = chunk_mask(b1 - j);
      __m512i wi[NT];
      for (int u = 0; u < NT; ++u) {
        wi[u] = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, wrow[u] + j));
      }
#pragma GCC unroll 4
      for (int r = 0; r < PER; ++r) {
        __m512 wv[NT];
        for (int u = 0; u < NT; ++u) {
          wv[u] = _mm512_permutexvar_ps(r == 0 ? wi[u] : _mm512_srli_epi32(wi[u], r * BITS), table[u]);
        }
        for (int t = 0; t < MT; ++t) {
          const __m512 xv = _mm512_maskz_loadu_ps(mask, xs[t][r] + j);
          for (int u = 0; u < NT; ++u) acc.fma(r, t, u, wv[u], xv);
        }
      }
    }
  }
  acc.store(a, n0, m0);
}

// The scales of the lanes' groups from `first` on in fp32 (scale_at's conversion), zero past them.
template <typename S>
inline __m512 load_scales(const LinearArgs& a, __mmask16 lanes, int64_t first) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(a.scales) + first);
  } else {
    const __m256i bits = _mm256_maskz_loadu_epi16(lanes, static_cast<const S*>(a.scales) + first);
    if constexpr (std::is_same_v<S, core::bf16_t>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_cvtph_ps(bits);
    }
  }
}

// The zero points of the lanes' groups from `first` on (zero_const for a format without them).
inline __m512i group_zero_points(const LinearArgs& a, int64_t first, __mmask16 lanes) {
  return a.zeros != nullptr ? _mm512_maskz_loadu_epi32(lanes, a.zeros + first) : _mm512_set1_epi32(a.zero_const);
}

// The word-stream kernels' 64-byte load of each tile row at word d: masked only in the row's last
// block (with a mask in every block, all ones but the last, 4-bit per channel took 0.88 -> 1.12
// cycles per 16 weights at M = 1).
template <int NT>
[[gnu::always_inline]] inline void load_word_block(const uint8_t* const (&wrow)[NT], int64_t row_bytes, int64_t d,
                                                   __m512i (&wi)[NT]) {
  const int64_t bytes = row_bytes - 4 * d;
  if (bytes >= 64) {
    for (int u = 0; u < NT; ++u) wi[u] = _mm512_loadu_si512(wrow[u] + 4 * d);
  } else {
    const __mmask64 byte_mask = (__mmask64{1} << bytes) - 1;
    for (int u = 0; u < NT; ++u) wi[u] = _mm512_maskz_loadu_epi8(byte_mask, wrow[u] + 4 * d);
  }
}

// The entries of `table` that BITS-bit indices (each 32-bit lane's low bits) name: vpermps reads
// the low 4 bits of each index, vpermilps the low 2, within the index's 128-bit lane.
template <int BITS>
[[gnu::always_inline]] inline __m512 lookup(__m512i index, __m512 table) {
  return BITS == 4 ? _mm512_permutexvar_ps(index, table) : _mm512_permutevar_ps(table, index);
}

// The lookup tables of the word-stream kernel below for weight row n and the word block whose first
// group is g. 4 bits: the 16 entries s * (i - z) of the block's group, looked up by vpermps. 2 bits:
// each 128-bit lane (4 words, 64 values) holds the 4 entries of its own group, looked up by
// vpermilps (the low 2 bits of each index, within the lane), so that a block may span groups of 64
// or 128 values: the lanes' scales and zero points spread over them by one permute each.
template <int BITS, typename S>
inline __m512 word_table(const LinearArgs& a, int64_t n, int64_t g, int64_t group_words) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  if constexpr (BITS == 4) {
    const RowParams p = params<S>(a, n, g);
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(iota), _mm512_set1_ps(static_cast<float>(p.z))),
                         _mm512_set1_ps(p.s));
  } else {
    const __m512 entries = _mm512_cvtepi32_ps(_mm512_and_si512(iota, _mm512_set1_epi32(3)));
    // Lane l's group, g + l / (group_words / 4): group_words is 4, 8, or a multiple of 16 (one
    // group for the block).
    const __m512i lane_group = group_words == 4   ? _mm512_srli_epi32(iota, 2)
                               : group_words == 8 ? _mm512_srli_epi32(iota, 3)
                                                  : _mm512_setzero_si512();
    const int64_t spanned = group_words == 4 ? 4 : group_words == 8 ? 2 : 1;
    const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(spanned, a.groups - g)) - 1);
    const int64_t first = n * a.groups + g;
    const __m512 s = _mm512_permutexvar_ps(lane_group, load_scales<S>(a, lanes, first));
    const __m512 z = _mm512_permutexvar_ps(lane_group, _mm512_cvtepi32_ps(group_zero_points(a, first, lanes)));
    return _mm512_mul_ps(_mm512_sub_ps(entries, z), s);
  }
}

// The same lookup with activation streams per 32-bit word (linear_kernels.h): one 64-byte load
// holds 16 words, and word position p (bits [p*BITS, (p+1)*BITS) of each word) pairs with 16
// contiguous floats of stream p. No widening shuffle and no masked activation loads: a shift and a
// permute per 16 weights. At 2 bits, against the byte-stream kernels (M = 1, K = 2048, from L2, one
// thread; cycles per 16 weights): per channel 1.18 -> 0.84, g128 1.32 -> 1.08, g64 1.57 -> 1.11;
// M = 4 g128 0.74 -> 0.60.
template <int BITS, typename S, int MT, int NT>
void tile_lut_words(const LinearArgs& a, int64_t n0, int64_t m0) {
  constexpr int VPW = 32 / BITS;  // values per word
  const int64_t row_words = (a.row_bytes + 3) / 4;
  // Per channel, one group of whole blocks longer than the row.
  const int64_t group_words = a.groups == 1 ? (row_words / kWordBlock + 1) * kWordBlock : a.group * BITS / 32;
  // Tables last a group of whole blocks; 2-bit groups of 64 or 128 values build them per block.
  const bool table_per_block = group_words % kWordBlock != 0;
  const int64_t table_words = table_per_block ? kWordBlock : group_words;
  const int64_t table_groups = table_per_block ? kWordBlock / group_words : 1;
  int64_t table_end = 0, g = 0;  // where the tables end, the next tables' first group
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  TileSums<MT, NT> acc;
  __m512 table[NT];
  for (int64_t d = 0; d < row_words; d += kWordBlock) {  // one 64-byte load per row, one block of x
    next.at(4 * d);
    if (d == table_end) {
      for (int u = 0; u < NT; ++u) table[u] = word_table<BITS, S>(a, n0 + u, g, group_words);
      table_end += table_words;
      g += table_groups;
    }
    // This block of the activation rows' word streams: one base address, the loads at constant
    // offsets from it (with a stream per row and position, the 32 addresses of a 4-row tile were
    // spilled and reloaded, and the FMAs ran at half their rate).
    const float* xblock = a.xd + ((d / kWordBlock) * a.M + m0) * VPW * kWordBlock;
    __m512i wi[NT];
    load_word_block(wrow, a.row_bytes, d, wi);
#pragma GCC unroll 16
    for (int p = 0; p < VPW; ++p) {
      __m512 wv[NT];
      for (int u = 0; u < NT; ++u) {
        const __m512i index = p == 0 ? wi[u] : _mm512_srli_epi32(wi[u], p * BITS);
        wv[u] = lookup<BITS>(index, table[u]);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 xv = _mm512_loadu_ps(xblock + (t * VPW + p) * kWordBlock);
        for (int u = 0; u < NT; ++u) acc.fma(p, t, u, wv[u], xv);
      }
    }
  }
  acc.store(a, n0, m0);
}

// 4 and 2 bits in groups of 1, 2, 4 or 8 words (4-bit groups of 8 to 64 values, 2-bit of 16 to
// 128), 16 to 2 of them per 64-byte load: too many groups for the tables above. So every group's
// values are looked up in one table, i - c (c = 2^(BITS-1), the symmetric formats' zero point),
// and scaled by the scale of their word's group (a lane of 16 words):
//   sum_k x s (q - z) = s sum_k x (q - c) - s (z - c) sum_k x,
// the last term from each activation row's sum over each group (xsum), where zero points are
// stored, once the row's products are summed. With one or two activation rows each lane's
// products are summed over the block and scaled once per block (a second set of sums); with three
// or four (too few registers for two sets) the looked-up values are scaled, one product per 16
// weights that the rows share.
template <int BITS, typename S, int MT, int NT>
void tile_lut_lanes(const LinearArgs& a, int64_t n0, int64_t m0) {
  constexpr int VPW = 32 / BITS;  // values per word
  constexpr int kOffset = 1 << (BITS - 1);
  constexpr bool kBlockSums = MT <= 2;
  const int64_t row_words = (a.row_bytes + 3) / 4;
  const int group_shift = std::countr_zero(static_cast<uint64_t>(a.group * BITS / 32));  // log2 group words
  const int64_t block_groups = kWordBlock >> group_shift;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lane_group = _mm512_srl_epi32(iota, _mm_cvtsi32_si128(group_shift));
  // i - c for every index i (lookup reads the low BITS bits of each).
  const __m512 table = _mm512_sub_ps(_mm512_cvtepi32_ps(BITS == 4 ? iota : _mm512_and_si512(iota, _mm512_set1_epi32(3))),
                                     _mm512_set1_ps(kOffset));
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  // One chain per sum (TileSums' two at M = 1 pushed sums out to memory): the block sums start
  // afresh each block, so consecutive blocks' FMAs overlap without a second.
  using Sums = TileSums<MT, NT, 1>;
  Sums acc;
  for (int64_t d = 0, g0 = 0; d < row_words; d += kWordBlock, g0 += block_groups) {
    next.at(4 * d);
    const float* xblock = a.xd + ((d / kWordBlock) * a.M + m0) * VPW * kWordBlock;
    __m512i wi[NT];
    load_word_block(wrow, a.row_bytes, d, wi);
    // Row u's scales of the block's groups (zero past the row's last group), and spread over their
    // words. Loaded where they are used: kept in registers across the products, they pushed the
    // sums out to memory.
    const __mmask16 groups = static_cast<__mmask16>((1u << std::min(block_groups, a.groups - g0)) - 1);
    const auto group_scales = [&](int u) { return load_scales<S>(a, groups, (n0 + u) * a.groups + g0); };
    __m512 lane_scale[NT];
    const auto spread_scales = [&] {
      for (int u = 0; u < NT; ++u) lane_scale[u] = _mm512_permutexvar_ps(lane_group, group_scales(u));
    };
    // The block's products added to `sums`, each looked-up value scaled first where !kBlockSums.
    const auto add_products = [&](Sums& sums) {
#pragma GCC unroll 16
      for (int p = 0; p < VPW; ++p) {
        __m512 wv[NT];
        for (int u = 0; u < NT; ++u) {
          const __m512i index = p == 0 ? wi[u] : _mm512_srli_epi32(wi[u], p * BITS);
          wv[u] = lookup<BITS>(index, table);
          if constexpr (!kBlockSums) wv[u] = _mm512_mul_ps(wv[u], lane_scale[u]);
        }
        for (int t = 0; t < MT; ++t) {
          const __m512 xv = _mm512_loadu_ps(xblock + (t * VPW + p) * kWordBlock);
          for (int u = 0; u < NT; ++u) sums.fma(p, t, u, wv[u], xv);
        }
      }
    };
    if constexpr (kBlockSums) {
      Sums block_sums;
      add_products(block_sums);
      spread_scales();
      acc.add_scaled(block_sums, lane_scale);
    } else {
      spread_scales();
      add_products(acc);
    }
  }
  // The zero points' term, s (z - c) sum_k x, 16 groups at a time after the row's products: per
  // block, with 2-8 of a block's 16 lanes, it cost M = 4 4-bit g32 0.71 -> 1.08 cycles per 16
  // weights.
  if (a.zeros != nullptr) {
    for (int64_t g = 0; g < a.groups; g += 16) {
      const __mmask16 lanes = chunk_mask(a.groups - g);
      __m512 xsum[MT];
      for (int t = 0; t < MT; ++t) xsum[t] = _mm512_maskz_loadu_ps(lanes, a.xsum + (m0 + t) * a.groups + g);
      for (int u = 0; u < NT; ++u) {
        const int64_t first = (n0 + u) * a.groups + g;
        // z - c in fp32, as tile8 takes q - z: in int32 lanes a zero point near INT32_MIN wraps.
        const __m512 offset = _mm512_sub_ps(_mm512_cvtepi32_ps(group_zero_points(a, first, lanes)), _mm512_set1_ps(kOffset));
        const __m512 offset_scale = _mm512_mul_ps(load_scales<S>(a, lanes, first), offset);
        for (int t = 0; t < MT; ++t) acc.v[0][t][u] = _mm512_fnmadd_ps(offset_scale, xsum[t], acc.v[0][t][u]);
      }
    }
  }
  acc.store(a, n0, m0);
}

// The word-stream kernels' layouts. tile_lut_words: 4 bits in groups of whole 64-byte loads (128
// values) or per channel; 2 bits in groups of one or two 128-bit lanes (64 or 128 values), of
// whole loads (256), or per channel; per channel, K a whole number of words. tile_lut_lanes: 4
// bits in groups of 8 to 64 values, 2 bits of 16 and 32 (with each row's group sums where zero
// points are stored).
bool lane_groups(int bits, int64_t group) {
  return (bits == 4 && (group == 8 || group == 16 || group == 32 || group == 64)) ||
         (bits == 2 && (group == 16 || group == 32));
}

Streams streams(int bits, int64_t group, bool per_channel, bool zero_points, int64_t) {
  if (bits == 4 && (per_channel ? group % 8 == 0 : group % 128 == 0)) return Streams::words;
  if (bits == 2 && (per_channel ? group % 16 == 0 : group == 64 || group == 128 || group % 256 == 0)) {
    return Streams::words;
  }
  if (!per_channel && lane_groups(bits, group)) return zero_points ? Streams::words_and_sums : Streams::words;
  return Streams::bytes;
}

template <int BITS, bool SIGNED, typename S, int MT, int NT>
void tile_simd(const LinearArgs& a, int64_t n0, int64_t m0) {
  if constexpr (BITS == 8) {
    tile8<SIGNED, S, MT, NT>(a, n0, m0);
  } else if (a.word_streams && a.groups > 1 && lane_groups(BITS, a.group)) {
    tile_lut_lanes<BITS, S, MT, NT>(a, n0, m0);
  } else if (a.word_streams) {
    tile_lut_words<BITS, S, MT, NT>(a, n0, m0);
  } else {
    tile_lut<BITS, S, MT, NT>(a, n0, m0);
  }
}
#define LINQUANT_HAVE_SIMD_GEMV 1

// ---- AVX512-BF16: bf16 activations -------------------------------------------------------------
// vdpbf16ps multiplies 32 bf16 weights by 32 bf16 activations into 16 fp32 sums, with exact
// products, so the weights only have to become bf16 numbers:
// - 4 and 2 bits: a value q becomes 128 + q by masking it into the low mantissa bits of 128 (one
//   ternary-logic op per 32 values, after one shift per bit plane; exact for q < 128). Per group,
//     sum x (q - z) = sum x (128 + q) - (128 + z) sum x,
//   with sum x per activation row and group computed once per call (xsum): no arithmetic per
//   weight beyond the extraction, where the LUT kernels above need a permute and an fp32 FMA per
//   16 weights and activation row. The offset costs 5 to 7 of the fp32 sums' 24 bits (128 against
//   |q - z| of a few units: at most 15 at 4 bits, 3 at 2), still above the bf16 output's 8.
// - 8 bits: q itself, exact in bf16 (8 significant bits), converted through fp32 (no instruction
//   goes from integers to bf16), 5 instructions per 32 weights against tile8's 6 plus an FMA per
//   16 weights and activation row; the zero point comes out through the group sums as above (its
//   offset is z, not 128 + z, and int8 symmetric weights have none).
// vdpbf16ps flushes bf16 subnormals (below 1.2e-38) to zero.
template <int BITS>
constexpr float kBf16Offset = BITS == 8 ? 0.0f : 128.0f;

// The dots of one 32-byte load of NT weight rows (bytes [j, j + 32) of each, masked) with the
// matching bf16 activations of MT rows, added to acc; every other load also asks for the next
// tile's lines at j (NextTile). The kernels of 16- and 8-byte groups went without that at
// first and streamed 3-5x slower at M = 1 (4096x4096 4-bit g32 1.0 -> 0.33 ms, 2-bit g64
// 1.1 -> 0.22 ms; 14336x4096 (K x N) 2-bit g32 1.7 -> 0.73 ms).
template <int BITS, bool SIGNED, int MT, int NT>
__attribute__((target("avx512bf16"))) inline void block_dots(const uint8_t* const (&wrow)[NT], const NextTile<NT>& next,
                                                             const uint16_t* const (&xs)[MT][8 / BITS], int64_t j,
                                                             __mmask32 mask, __m512 (&acc)[MT][NT]) {
  next.at_line_start(j);
  if constexpr (BITS == 8) {
    const auto to_ps = [](__m128i bytes) {
      return _mm512_cvtepi32_ps(SIGNED ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
    };
    __m512bh wv[NT];
    for (int u = 0; u < NT; ++u) {
      const __m128i lo = _mm_maskz_loadu_epi8(static_cast<__mmask16>(mask), wrow[u] + j);
      const __m128i hi = _mm_maskz_loadu_epi8(static_cast<__mmask16>(mask >> 16), wrow[u] + j + 16);
      wv[u] = _mm512_cvtne2ps_pbh(to_ps(hi), to_ps(lo));  // weights j .. j + 31 in order
    }
    for (int t = 0; t < MT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xs[t][0] + j);
      for (int u = 0; u < NT; ++u) acc[t][u] = _mm512_dpbf16_ps(acc[t][u], wv[u], xv);
    }
    return;
  }
  const __m512i low = _mm512_set1_epi16((1 << BITS) - 1), magic = _mm512_set1_epi16(0x4300);
  __m512i wi[NT];
  for (int u = 0; u < NT; ++u) wi[u] = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, wrow[u] + j));
#pragma GCC unroll 4
  for (int r = 0; r < 8 / BITS; ++r) {
    __m512bh wv[NT];
    for (int u = 0; u < NT; ++u) {
      wv[u] = (__m512bh)_mm512_ternarylogic_epi32(r == 0 ? wi[u] : _mm512_srli_epi16(wi[u], r * BITS), low, magic,
                                                  0xEA);  // (w & low) | magic
    }
    for (int t = 0; t < MT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xs[t][r] + j);
      for (int u = 0; u < NT; ++u) acc[t][u] = _mm512_dpbf16_ps(acc[t][u], wv[u], xv);
    }
  }
}

// Masked past `end`: a weight byte of 0 there (128 at 4 and 2 bits) meets an activation of 0.
inline __mmask32 block_mask(int64_t end, int64_t j) {
  return end - j >= 32 ? ~__mmask32{0} : (__mmask32{1} << (end - j)) - 1;
}

template <int BITS, int MT>
struct Bf16Rows {
  const uint16_t* xs[MT][8 / BITS];
  Bf16Rows(const LinearArgs& a, int64_t m0) {
    for (int t = 0; t < MT; ++t)
      for (int r = 0; r < 8 / BITS; ++r) xs[t][r] = a.xb + ((m0 + t) * (8 / BITS) + r) * a.row_bytes;
  }
};

// sum over the groups of s (offset + z) times the group's activation sum, for weight row n and
// activation rows m0 .. m0 + MT - 1, 16 groups per vector: the offsets the dot kernel's raw weights
// carry, taken out once per row rather than with scalar arithmetic beside every group's sums.
template <int BITS, typename S, int MT>
__attribute__((target("avx512bf16"))) inline void group_offsets(const LinearArgs& a, int64_t n, int64_t m0,
                                                                float (&out)[MT]) {
  __m512 sum[MT];
  for (int t = 0; t < MT; ++t) sum[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; g += 16) {
    const __mmask16 in = chunk_mask(a.groups - g);
    const int64_t first = n * a.groups + g;
    const __m512 offset = _mm512_mul_ps(
        load_scales<S>(a, in, first),
        _mm512_add_ps(_mm512_cvtepi32_ps(group_zero_points(a, first, in)), _mm512_set1_ps(kBf16Offset<BITS>)));
    for (int t = 0; t < MT; ++t) {
      sum[t] = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(in, a.xsum + (m0 + t) * a.groups + g), sum[t]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = hsum(sum[t]);
}

// Groups of whole 32-byte loads (or one per row): each group's sums scaled once, the offsets taken
// out at the end through the groups' activation sums (group_offsets).
template <int BITS, bool SIGNED, typename S, int MT, int NT>
__attribute__((target("avx512bf16"))) void tile_bf16(const LinearArgs& a, int64_t n0, int64_t m0) {
  const int64_t gb = a.group / (8 / BITS);
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  const Bf16Rows<BITS, MT> x(a, m0);
  __m512 total[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < NT; ++u) total[t][u] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
    __m512 acc[MT][NT];
    for (int t = 0; t < MT; ++t)
      for (int u = 0; u < NT; ++u) acc[t][u] = _mm512_setzero_ps();
    // Masked only in the group's last load (2-bit g128 at M = 1 from L2: 0.95-1.02 -> 0.88-0.95
    // cycles per 16 weights).
    int64_t j = b0;
    for (; j + 32 <= b1; j += 32) block_dots<BITS, SIGNED, MT, NT>(wrow, next, x.xs, j, ~__mmask32{0}, acc);
    if (j < b1) block_dots<BITS, SIGNED, MT, NT>(wrow, next, x.xs, j, block_mask(b1, j), acc);
    for (int u = 0; u < NT; ++u) {
      const __m512 sv = _mm512_set1_ps(scale_at<S>(a, (n0 + u) * a.groups + g));
      for (int t = 0; t < MT; ++t) total[t][u] = _mm512_fmadd_ps(acc[t][u], sv, total[t][u]);
    }
  }
  for (int u = 0; u < NT; ++u) {
    float corr[MT];
    group_offsets<BITS, S, MT>(a, n0 + u, m0, corr);
    const float b = a.bias != nullptr ? a.bias[n0 + u] : 0.0f;
    for (int t = 0; t < MT; ++t) a.y[(m0 + t) * a.N + n0 + u] = (hsum(total[t][u]) - corr[t]) + b;
  }
}

// Groups of 16 or 8 bytes (4-bit g32 / g16, 2-bit g64 / g32): a 32-byte load spans GPB = 2 or 4
// of them, and output lane i of a dot (bytes 2i, 2i + 1) belongs to group i / (16 / GPB). So the
// scales, the offsets 128 + z and the activation sums (a 16 / GPB-th in each lane of a group, so
// that the lanes add up to it) are spread over the lanes by one permute each, and every load's
// sums are corrected and scaled lane by lane.
template <int BITS, typename S, int MT, int NT>
__attribute__((target("avx512bf16"))) void tile_bf16_split(const LinearArgs& a, int64_t n0, int64_t m0) {
  const int64_t gb = a.group / (8 / BITS), per_load = 32 / gb, lanes = 16 / per_load;
  const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               per_load == 2 ? 3 : 2);
  const __m512 share = _mm512_set1_ps(1.0f / static_cast<float>(lanes));
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  const Bf16Rows<BITS, MT> x(a, m0);
  __m512 total[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < NT; ++u) total[t][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < a.row_bytes; j += 32) {
    const int64_t g0 = j / gb;
    const __mmask16 groups = static_cast<__mmask16>((1u << std::min<int64_t>(per_load, a.groups - g0)) - 1);
    __m512 acc[MT][NT];
    for (int t = 0; t < MT; ++t)
      for (int u = 0; u < NT; ++u) acc[t][u] = _mm512_setzero_ps();
    block_dots<BITS, false, MT, NT>(wrow, next, x.xs, j, block_mask(a.row_bytes, j), acc);
    __m512 xshare[MT];
    for (int t = 0; t < MT; ++t) {
      const __m512 sums = _mm512_maskz_loadu_ps(groups, a.xsum + (m0 + t) * a.groups + g0);
      xshare[t] = _mm512_mul_ps(_mm512_permutexvar_ps(lane_group, sums), share);
    }
    for (int u = 0; u < NT; ++u) {
      const int64_t first = (n0 + u) * a.groups + g0;
      const __m512 sv = _mm512_permutexvar_ps(lane_group, load_scales<S>(a, groups, first));
      const __m512 offset =
          _mm512_add_ps(_mm512_permutexvar_ps(lane_group, _mm512_cvtepi32_ps(group_zero_points(a, first, groups))),
                        _mm512_set1_ps(kBf16Offset<BITS>));
      for (int t = 0; t < MT; ++t) {
        total[t][u] = _mm512_fmadd_ps(_mm512_fnmadd_ps(offset, xshare[t], acc[t][u]), sv, total[t][u]);
      }
    }
  }
  store_tile(a, n0, m0, total);
}

// Tiles of MT activation rows x NT weight rows over weight rows [n0, n1), then single rows. For one
// or two activation rows, 4 weight rows: twice the independent chains of dot products (each waits
// on the last's latency), 10-25% faster than 2 at M = 1 and 2. From 3 rows the registers run out.
template <int BITS, bool SIGNED, typename S, int MT>
void span_bf16(const LinearArgs& a, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int NT = MT <= 2 ? 4 : 2;
  int64_t n = n0;
  if constexpr (BITS < 8) {
    if (a.group / (8 / BITS) < 32 && a.groups > 1) {
      for (; n + NT <= n1; n += NT) tile_bf16_split<BITS, S, MT, NT>(a, n, m0);
      for (; n < n1; ++n) tile_bf16_split<BITS, S, MT, 1>(a, n, m0);
      return;
    }
  }
  for (; n + NT <= n1; n += NT) tile_bf16<BITS, SIGNED, S, MT, NT>(a, n, m0);
  for (; n < n1; ++n) tile_bf16<BITS, SIGNED, S, MT, 1>(a, n, m0);
}

void gemv_bf16(const LinearArgs& a, int64_t n0, int64_t n1) {
  for_format(a, [&]<int BITS, bool SIGNED, typename S>() {
    row_tiles(a, n0, n1,
              [&]<int MT>(int64_t nb, int64_t nb1, int64_t m) { span_bf16<BITS, SIGNED, S, MT>(a, nb, nb1, m); });
  });
}

// s * (q - z) rounded to bf16 for the 32 8-bit values from q on (the first `rem` are wanted, and
// no byte past them is read), in fp32 as dequant() computes it.
template <bool SIGNED>
__attribute__((target("avx512bf16"))) inline __m512i dequant32_8bit(const uint8_t* q, int64_t rem, __m512 s, __m512 z) {
  const __m256i b = _mm256_maskz_loadu_epi8(block_mask(rem, 0), q);
  const __m128i b0 = _mm256_castsi256_si128(b), b1 = _mm256_extracti128_si256(b, 1);
  const __m512i lo = SIGNED ? _mm512_cvtepi8_epi32(b0) : _mm512_cvtepu8_epi32(b0);
  const __m512i hi = SIGNED ? _mm512_cvtepi8_epi32(b1) : _mm512_cvtepu8_epi32(b1);
  const __m512 vlo = _mm512_mul_ps(s, _mm512_sub_ps(_mm512_cvtepi32_ps(lo), z));
  const __m512 vhi = _mm512_mul_ps(s, _mm512_sub_ps(_mm512_cvtepi32_ps(hi), z));
  return (__m512i)_mm512_cvtne2ps_pbh(vhi, vlo);
}

// The panel GEMMs' dequantization reads a thread's weight rows as one stream (rows are stored one
// after another), which the hardware prefetchers did not keep up with, as with the register
// kernels' tiles (NextTile): `upto(p)` asks for every line up to kStreamAhead bytes past p, once.
// Dequantizing a 14336 x 4096 (K x N) weight from DRAM to bf16: W8 5.34 -> 1.42 ms, W4 g128 3.95
// -> 1.92 ms (1024 bytes ahead did as well but at 8 bits, 1.58 ms). Dequantizing block by block
// (64 rows x 512 dwords, each row's next block asked for ahead) instead took the bf16 GEMM 1.2x as
// long at 2-bit g128 M = 16 (4096x4096), and the fp32 GEMM 0.85-0.95x as long at M = 16 (8-, 4-
// and 2-bit g128; as long from M = 64): one way for both.
constexpr int64_t kStreamAhead = 4096;

class StreamPrefetch {
 public:
  explicit StreamPrefetch(const uint8_t* start) : next_(start) {}
  void upto(const uint8_t* p) {
    for (; next_ < p + kStreamAhead; next_ += 64) prefetch_line(next_);
  }

 private:
  const uint8_t* next_;
};

// fn(r, p, src, count, k) for each group of weight rows [n0, n1), r = n - n0: p the group's scale
// and zero point, src its first byte, count its values, k its first value; fn asks `prefetch` for
// the stream up to each byte it reads. Always inlined, so that fn is inlined too where the caller
// is compiled for AVX512-BF16 and fn with it (dequant_bf16): GCC will not inline it into this
// function, compiled without, and called it once per group (the bf16 GEMM ran 5-10% slower at
// M = 16).
template <int BITS, typename S, typename Fn>
[[gnu::always_inline]] inline void for_row_groups(const LinearArgs& a, int64_t n0, int64_t n1, StreamPrefetch& prefetch,
                                                  Fn&& fn) {
  constexpr int PER = 8 / BITS;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = a.w + n * a.row_bytes;
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t k = g * a.group;
      const uint8_t* src = wrow + k / PER;  // a group starts on a byte (group % PER == 0)
      prefetch.upto(src);
      fn(n - n0, params<S>(a, n, g), src, std::min(a.group, a.K - k), k);
    }
  }
}

// BYTES (16, 8 or 4) bytes from src on, repeated in every 128-bit lane, so that in-lane shuffles
// (vpshufb) can take them apart: one broadcast load where all BYTES are wanted, else a masked load
// of the first `count` (no byte past them is read), broadcast.
template <int BYTES>
inline __m512i lane_bytes(const uint8_t* src, int64_t count) {
  if (count == BYTES) {
    if constexpr (BYTES == 16) return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    if constexpr (BYTES == 8) {
      int64_t bytes;
      std::memcpy(&bytes, src, sizeof(bytes));
      return _mm512_set1_epi64(bytes);
    }
    int32_t bytes;
    std::memcpy(&bytes, src, sizeof(bytes));
    return _mm512_set1_epi32(bytes);
  }
  const __m128i b = _mm_maskz_loadu_epi8(chunk_mask(count), src);
  if constexpr (BYTES == 16) return _mm512_broadcast_i32x4(b);
  if constexpr (BYTES == 8) return _mm512_broadcastq_epi64(b);
  return _mm512_broadcastd_epi32(b);
}

// Rows [n0, n1) dequantized for the bf16 GEMM into out[(n - n0) * ld + k], k < K: s * (q - z) in
// fp32 exactly as dequant() computes it, then rounded to bf16 to nearest even (a NaN scale gives a
// NaN whose payload may differ from core::from_float's). 8 bits: 32 values per convert, subtract,
// multiply and round (dequant32_8bit; taking the bytes apart in-lane, 16 at a time, took the bf16
// GEMM 1.01-1.05x as long, W8 per channel 4096x4096). 4 and 2 bits: per group, the 16 (or 4) values
// q can take are computed so and rounded into a table; each 32 values are one vpshufb (a byte per
// 16-bit lane), one vpsrlvw and one table lookup (vpermw, which reads an index's low 5 bits: the
// table holds its entries 32 / 2^BITS times). Against building the indices with the cross-lane
// vpmovzx, the bf16 GEMM took 0.94-0.98x as long at M = 16 (W4 g128, W4 g32, W2 g128; 4096x4096 and
// 4096x14336) and 0.97-1.0x from M = 64, each build in its own process, three rounds. The table
// against the arithmetic, at M = 64 (4096x4096, 14336x4096, 4096x14336): the whole call took
// 0.95-1.05x as long at W4 g128, 0.81-0.99x at W4 g32 and 0.77-0.83x at W2 g128 and g32, measured
// alternating (with ATen's bf16 GEMM, before session 30).
template <int BITS, bool SIGNED, typename S>
__attribute__((target("avx512bf16"))) void dequant_bf16(const LinearArgs& a, int64_t n0, int64_t n1,
                                                        uint16_t* out, int64_t ld) {
  constexpr int PER = 8 / BITS;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_and_si512(lane, _mm512_set1_epi32((1 << BITS) - 1)));  // lane i: code i mod 2^BITS
  // Below 8 bits dword d holds the 16-bit lanes of values 2d and 2d + 1: vpshufb puts byte
  // value / PER at the bottom of each (0x80: a zero byte), vpsrlvw shifts it down by
  // BITS * (value % PER).
  const __m512i first = _mm512_slli_epi32(lane, 1), second = _mm512_add_epi32(first, _mm512_set1_epi32(1));
  const auto words = [](__m512i low, __m512i high) { return _mm512_or_si512(low, _mm512_slli_epi32(high, 16)); };
  const auto byte_of = [](__m512i value) { return _mm512_srli_epi32(value, BITS == 4 ? 1 : 2); };
  const auto shift_of = [](__m512i value) {
    return _mm512_mullo_epi32(_mm512_and_si512(value, _mm512_set1_epi32(PER - 1)), _mm512_set1_epi32(BITS));
  };
  const __m512i picks =
      _mm512_or_si512(words(byte_of(first), byte_of(second)), _mm512_set1_epi32(static_cast<int32_t>(0x80008000u)));
  const __m512i shifts = words(shift_of(first), shift_of(second));
  StreamPrefetch prefetch(a.w + n0 * a.row_bytes);
  for_row_groups<BITS, S>(
      a, n0, n1, prefetch,
      [&](int64_t r, RowParams p, const uint8_t* src, int64_t left, int64_t k) __attribute__((target("avx512bf16"))) {
      const __m512 s = _mm512_set1_ps(p.s), z = _mm512_set1_ps(static_cast<float>(p.z));
      uint16_t* dst = out + r * ld + k;
      const __m512 entries = _mm512_mul_ps(s, _mm512_sub_ps(codes, z));         // below 8 bits
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(entries, entries);  // 16-bit lanes i, i + 16: code i
      const auto values = [&](int64_t rem) __attribute__((target("avx512bf16"))) {
        if constexpr (BITS == 8) {
          return dequant32_8bit<SIGNED>(src, rem, s, z);
        } else {
          const __m512i bytes = lane_bytes<32 / PER>(src, (rem + PER - 1) / PER);
          return _mm512_permutexvar_epi16(_mm512_srlv_epi16(_mm512_shuffle_epi8(bytes, picks), shifts), table);
        }
      };
      for (; left >= 32; left -= 32, src += 32 / PER, dst += 32) {
        prefetch.upto(src);
        _mm512_storeu_si512(dst, values(32));
      }
      if (left > 0) _mm512_mask_storeu_epi16(dst, block_mask(left, 0), values(left));
    });
}

// Rows [n0, n1) dequantized for the fp32 GEMM into out[(n - n0) * ld + k], k < K, with
// linquant::dequantize's bits: s * (q - z), q - z taken in int32 lanes where the zero point allows
// (zero_point_fits_int32), else element by element in 64 bits. Only in-lane shuffles take the
// bytes apart (lane_bytes' broadcast, vpshufb, variable shifts): with the cross-lane vpmovzx /
// vpermd in their place the dequantization took 1.7-1.75x as long at 4 bits (4096x4096 g128 and
// per channel, measured alternating in one process). 8 bits: 16 values per shuffle, conversion,
// subtraction and multiplication. 4 and 2 bits: per group a table of the 16 (or 4) values q can
// take, looked up by vpermps (low 4 bits of each index) or, at 2 bits, by vpermilps within each
// 128-bit lane (low 2 bits).
template <int BITS, bool SIGNED, typename S>
void dequant_f32(const LinearArgs& a, int64_t n0, int64_t n1, float* out, int64_t ld) {
  constexpr int PER = 8 / BITS;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i codes = _mm512_and_si512(lane, _mm512_set1_epi32((1 << BITS) - 1));  // table lane i: code i mod 2^BITS
  // vpshufb's byte for dword i (0x80: a zero byte): byte i at the bottom (8 bits unsigned) or the
  // top (signed, then shifted down arithmetically); at 4 bits byte i / 2, shifted by 4 (i % 2).
  const __m512i zero_bytes = _mm512_set1_epi32(static_cast<int32_t>(0x80808000u));
  const __m512i pick = BITS == 8 ? (SIGNED ? _mm512_or_si512(_mm512_slli_epi32(lane, 24), _mm512_set1_epi32(0x808080))
                                           : _mm512_or_si512(lane, zero_bytes))
                                 : _mm512_or_si512(_mm512_srli_epi32(lane, 1), zero_bytes);
  const __m512i shifts = BITS == 4 ? _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(1)), 2)
                                   : _mm512_and_si512(_mm512_slli_epi32(lane, 1), _mm512_set1_epi32(31));
  StreamPrefetch prefetch(a.w + n0 * a.row_bytes);
  for_row_groups<BITS, S>(a, n0, n1, prefetch, [&](int64_t r, RowParams p, const uint8_t* src, int64_t left, int64_t k) {
      float* dst = out + r * ld + k;
      if (!core::zero_point_fits_int32(p.z)) {
        core::dequantize_values(left, p.s, p.z, dst, [&](int64_t i) {
          return weight_int<BITS, SIGNED>(src, i / PER, static_cast<int>(i % PER));
        });
        return;
      }
      const __m512 s = _mm512_set1_ps(p.s);
      const __m512i z = _mm512_set1_epi32(p.z);
      const __m512 table = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, z)));
      const auto values = [&](int64_t rem) {
        const __m512i bytes = lane_bytes<16 / PER>(src, (rem + PER - 1) / PER);
        if constexpr (BITS == 8) {
          const __m512i b = _mm512_shuffle_epi8(bytes, pick);
          const __m512i q = SIGNED ? _mm512_srai_epi32(b, 24) : b;
          return _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(q, z)));
        } else if constexpr (BITS == 4) {
          return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, pick), shifts), table);
        } else {
          return _mm512_permutevar_ps(table, _mm512_srlv_epi32(bytes, shifts));
        }
      };
      for (; left >= 16; left -= 16, src += 16 / PER, dst += 16) {
        prefetch.upto(src);
        _mm512_storeu_ps(dst, values(16));
      }
      if (left > 0) _mm512_mask_storeu_ps(dst, chunk_mask(left), values(left));
    });
}

// ---- The panel GEMMs (Path::gemm_bf16 and Path::gemm in linear.cpp) -----------------------------
// Once the activation rows are many enough for the arithmetic to rule, each panel of 64 weight rows
// is dequantized once per call, row-major (dequant_bf16, dequant_f32). The activations come
// transposed by dwords (a.xt: for each dword of k, a pair of bf16 values or one fp32 value, the
// dwords of 16-row blocks of activation rows side by side), so one instruction multiplies a weight
// dword, broadcast, by 16 activation rows at once (vdpbf16ps for bf16 pairs, an FMA for fp32): the
// weights are read as dequantized, with no transposition (transposing each bf16 panel into
// rows-in-lanes pairs had cost 11% of the call at M = 64); the activations are transposed once per
// call and the sums once per panel. Register tiles of NT weight rows x MV vectors of 16 activation
// rows hold 16-24 fp32 sums, walking the dwords kPanelDwords at a time: 128 KiB of the panel and
// 128 KiB of 64 activation rows stay in L2 (bf16: 2048 pairs, 512 KiB each, were about 25% slower
// at M = 256: 4096x4096 W4 g128, 11.5 against 9.2 ms).
constexpr int64_t kPanelRows = 64;
constexpr int64_t kPanelDwords = 512;

// The 16 x 16 dwords of r transposed: r[i] holds row i's 16 dwords on entry, dword i of each row on
// return. Per 128-bit lane, two rounds of unpacks gather 4 rows' dword d; two rounds of 128-bit
// shuffles gather the 4 lanes.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);      // rows i, i+1: dwords 0, 1 of each lane
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);  // dwords 2, 3
  }
  for (int q = 0; q < 4; ++q) {  // rows 4q .. 4q+3: u[4q + d] holds their dword d of each lane
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int d = 0; d < 4; ++d) {
    const __m512i a_lo = _mm512_shuffle_i32x4(u[d], u[4 + d], 0x44), a_hi = _mm512_shuffle_i32x4(u[d], u[4 + d], 0xEE);
    const __m512i b_lo = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], 0x44);
    const __m512i b_hi = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], 0xEE);
    r[d] = _mm512_shuffle_i32x4(a_lo, b_lo, 0x88);  // lane 0 of each group of 4 rows
    r[4 + d] = _mm512_shuffle_i32x4(a_lo, b_lo, 0xDD);
    r[8 + d] = _mm512_shuffle_i32x4(a_hi, b_hi, 0x88);
    r[12 + d] = _mm512_shuffle_i32x4(a_hi, b_hi, 0xDD);
  }
}

// A register tile's sums: zero for the first dwords, else as c holds them (n * ldc + 16 v), and back.
template <int NT, int MV>
inline void load_sums(__m512 (&acc)[NT][MV], const float* c, int64_t ldc, bool first) {
  for (int n = 0; n < NT; ++n)
    for (int v = 0; v < MV; ++v) acc[n][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + n * ldc + 16 * v);
}

template <int NT, int MV>
inline void store_sums(const __m512 (&acc)[NT][MV], float* c, int64_t ldc) {
  for (int n = 0; n < NT; ++n)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(c + n * ldc + 16 * v, acc[n][v]);
}

// The two panels' element types. tile<NT, MV>: c[n * ldc + 16 v + i] (+)= the sum over dwords
// [0, dn) of weight row n (w, row stride ldw elements) times activation row 16 v + i (xt: dword d
// of row m at d * ldx + m), for NT weight rows and MV vectors of 16 activation rows; each weight
// dword is read as one 32-bit broadcast.
struct Bf16Pairs {  // a dword: two bf16 values, multiplied and added in pairs by vdpbf16ps
  using Weight = uint16_t;
  static constexpr int64_t kPerDword = 2;

  template <int NT, int MV>
  __attribute__((target("avx512bf16"))) static void tile(const uint16_t* w, int64_t ldw, const uint32_t* xt,
                                                         int64_t ldx, int64_t dn, float* c, int64_t ldc, bool first) {
    __m512 acc[NT][MV];
    load_sums(acc, c, ldc, first);
    for (int64_t d = 0; d < dn; ++d) {
      __m512bh xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xt + d * ldx + 16 * v);
      for (int n = 0; n < NT; ++n) {
        int32_t pair;
        std::memcpy(&pair, w + n * ldw + 2 * d, sizeof(pair));
        const __m512bh wv = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_dpbf16_ps(acc[n][v], wv, xv[v]);
      }
    }
    store_sums(acc, c, ldc);
  }
};

struct F32Values {  // a dword: one fp32 value, multiplied and added by an FMA
  using Weight = float;
  static constexpr int64_t kPerDword = 1;

  template <int NT, int MV>
  static void tile(const float* w, int64_t ldw, const uint32_t* xt, int64_t ldx, int64_t dn, float* c, int64_t ldc,
                   bool first) {
    __m512 acc[NT][MV];
    load_sums(acc, c, ldc, first);
    const auto x = reinterpret_cast<const float*>(xt);
    for (int64_t d = 0; d < dn; ++d) {
      __m512 xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_ps(x + d * ldx + 16 * v);
      for (int n = 0; n < NT; ++n) {
        const __m512 wv = _mm512_set1_ps(w[n * ldw + d]);
        for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_fmadd_ps(wv, xv[v], acc[n][v]);
      }
    }
    store_sums(acc, c, ldc);
  }
};

// Weight rows [0, rows) of the panel through tiles of NT rows (the last one fewer). Tiles stay at 16
// or more sums while the broadcasts (one per weight row and dword) stay under the loads the core
// issues alongside the products: 12 rows for one vector, 8 for two or three, 6 for four.
template <typename Values, int MV, int NT = MV == 1 ? 12 : MV == 4 ? 6 : 8>
void panel_rows(int64_t rows, const typename Values::Weight* w, int64_t ldw, const uint32_t* xt, int64_t ldx,
                int64_t dn, float* c, int64_t ldc, bool first) {
  int64_t n = 0;
  for (; n + NT <= rows; n += NT) Values::template tile<NT, MV>(w + n * ldw, ldw, xt, ldx, dn, c + n * ldc, ldc, first);
  if constexpr (NT > 1) {
    if (n < rows) panel_rows<Values, MV, NT - 1>(rows - n, w + n * ldw, ldw, xt, ldx, dn, c + n * ldc, ldc, first);
  }
}

// c[n * ldx + m] (+)= the product of a block of the panel's weight rows n < rows (w, row stride ldw
// elements, dn dwords) with activation row m < ldx (xt: the block's dwords), 64 rows at a time.
template <typename Values>
void multiply_block(int64_t rows, const typename Values::Weight* w, int64_t ldw, const uint32_t* xt, int64_t ldx,
                    int64_t dn, float* c, bool first) {
  for (int64_t m = 0; m < ldx; m += 64) {
    const auto run = [&]<int MV>() { panel_rows<Values, MV>(rows, w, ldw, xt + m, ldx, dn, c + m, ldx, first); };
    switch (std::min<int64_t>(4, (ldx - m) / 16)) {
      case 1: run.template operator()<1>(); break;
      case 2: run.template operator()<2>(); break;
      case 3: run.template operator()<3>(); break;
      default: run.template operator()<4>(); break;
    }
  }
}

// y[m, n] = c[(n - n0) * ldc + m] + bias[n] for columns [n0, n1) of every row: 16 x 16 blocks of
// sums transposed back to rows, each row's 16 columns handed to store(m, col, lanes, sums). Columns
// past the panel's are sums of rows it does not have: loaded, never stored. Always inlined, as
// for_row_groups, so that a store compiled for AVX512-BF16 is inlined into store_panel_bf16.
template <typename Store>
[[gnu::always_inline]] inline void store_panel(const LinearArgs& a, int64_t n0, int64_t n1, const float* c,
                                               int64_t ldc, Store&& store) {
  for (int64_t col = n0; col < n1; col += 16) {
    const __mmask16 lanes = chunk_mask(n1 - col);
    const __m512 bias = a.bias != nullptr ? _mm512_maskz_loadu_ps(lanes, a.bias + col) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < a.M; m0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + (col - n0 + i) * ldc + m0);
      transpose16(r);
      for (int64_t m = m0; m < std::min(a.M, m0 + 16); ++m) {
        store(m, col, lanes, _mm512_add_ps(_mm512_castsi512_ps(r[m - m0]), bias));
      }
    }
  }
}

// store_panel into yb, each sum rounded to bf16 once.
__attribute__((target("avx512bf16"))) void store_panel_bf16(const LinearArgs& a, int64_t n0, int64_t n1,
                                                            const float* c, int64_t ldc) {
  store_panel(a, n0, n1, c, ldc,
              [&](int64_t m, int64_t col, __mmask16 lanes, __m512 y) __attribute__((target("avx512bf16"))) {
                _mm256_mask_storeu_epi16(a.yb + m * a.N + col, lanes, (__m256i)_mm512_cvtneps_pbh(y));
              });
}

// Each thread's buffers, kept between calls (fresh megabytes per call cost first-touch page faults)
// and shared by every weight format's instantiation.
struct PanelBuffers {
  std::vector<uint16_t> bf16;
  std::vector<float> f32;
  std::vector<float> c;
};

PanelBuffers& panel_buffers() {
  thread_local PanelBuffers buffers;
  return buffers;
}

// Columns [n0, n1) (n0 a multiple of 64) of the product with a.xt (`dwords` per activation row):
// for each panel of weight rows [p, p1), dequant(p, p1, panel) writes its weights (row stride ldw
// elements), multiply_block multiplies them kPanelDwords dwords at a time into c (row stride ldx)
// and store(p, p1, c, ldx) writes the panel's output columns.
template <typename Values, typename Dequant, typename Store>
void gemm_panels(const LinearArgs& a, int64_t n0, int64_t n1, int64_t dwords, int64_t ldw,
                 std::vector<typename Values::Weight>& panel, Dequant&& dequant, Store&& store) {
  const int64_t ldx = pair_rows(a.M);
  std::vector<float>& c = panel_buffers().c;
  panel.resize(static_cast<size_t>(kPanelRows * ldw));
  c.resize(static_cast<size_t>(kPanelRows * ldx));
  for (int64_t p = n0; p < n1; p += kPanelRows) {
    const int64_t p1 = std::min(p + kPanelRows, a.N);
    dequant(p, p1, panel.data());
    for (int64_t d0 = 0; d0 < dwords; d0 += kPanelDwords) {
      const int64_t d1 = std::min(dwords, d0 + kPanelDwords);
      multiply_block<Values>(p1 - p, panel.data() + d0 * Values::kPerDword, ldw, a.xt + d0 * ldx, ldx, d1 - d0,
                             c.data(), d0 == 0);
    }
    store(p, p1, c.data(), ldx);
  }
}

void gemm_bf16_dispatch(const LinearArgs& a, int64_t n0, int64_t n1) {
  const int64_t pairs = (a.K + 1) / 2, ldw = 2 * pairs;
  for_format(a, [&]<int BITS, bool SIGNED, typename S>() {
    gemm_panels<Bf16Pairs>(
        a, n0, n1, pairs, ldw, panel_buffers().bf16,
        [&](int64_t p, int64_t p1, uint16_t* panel) {
          dequant_bf16<BITS, SIGNED, S>(a, p, p1, panel, ldw);
          if (ldw > a.K) {  // odd K: the activations' padding half is zero, and so must its weight be
            for (int64_t r = 0; r < p1 - p; ++r) panel[r * ldw + a.K] = 0;
          }
        },
        [&](int64_t p, int64_t p1, const float* c, int64_t ldc) { store_panel_bf16(a, p, p1, c, ldc); });
  });
}

void gemm_f32_dispatch(const LinearArgs& a, int64_t n0, int64_t n1) {
  for_format(a, [&]<int BITS, bool SIGNED, typename S>() {
    gemm_panels<F32Values>(
        a, n0, n1, a.K, a.K, panel_buffers().f32,
        [&](int64_t p, int64_t p1, float* panel) { dequant_f32<BITS, SIGNED, S>(a, p, p1, panel, a.K); },
        [&](int64_t p, int64_t p1, const float* c, int64_t ldc) {
          store_panel(a, p, p1, c, ldc, [&](int64_t m, int64_t col, __mmask16 lanes, __m512 y) {
            _mm512_mask_storeu_ps(a.y + m * a.N + col, lanes, y);
          });
        });
  });
}

// xt[d * ldx + m] = dword d of row m of x (M rows of K 16-bit values, contiguous: a pair of bf16
// values, or one fp32 value with K counting its halves) for dwords [d0, d1) (d0 a multiple of 16),
// zero past K and for rows M .. ldx - 1 (ldx = pair_rows(M)), in 16 x 16 blocks of dwords (ATen's
// copy of the transposed view took 0.36 ms of a 2.6 ms bf16 call at M = 64, K = 4096).
void transpose_dwords(const uint16_t* x, int64_t M, int64_t K, int64_t d0, int64_t d1, uint32_t* xt) {
  const int64_t ldx = pair_rows(M);
  for (int64_t d = d0; d < d1; d += 16) {
    const int64_t k = 2 * d;
    const __mmask32 mask = block_mask(K, k);
    for (int64_t m0 = 0; m0 < ldx; m0 += 16) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = m0 + i < M ? _mm512_maskz_loadu_epi16(mask, x + (m0 + i) * K + k) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int64_t i = 0; i < std::min<int64_t>(16, d1 - d); ++i) _mm512_storeu_si512(xt + (d + i) * ldx + m0, r[i]);
    }
  }
}
#define LINQUANT_HAVE_PANEL_GEMMS 1

#elif defined(__AVX2__) && defined(__FMA__)
// ---- AVX2: the same tiling with 8-byte chunks ---------------------------------------------------
// Whole chunks load straight from the rows; a group's or row's last few bytes go through a
// zero-padded copy, with their activations masked.
inline __m256i lane_mask(int64_t rem) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(rem, 8))), lanes);
}

// The 8 weight bytes from p as 32-bit lanes; with TAIL, only the first rem (< 8) are read, the
// rest are zero.
template <bool SIGNED, bool TAIL>
inline __m256i load_bytes(const uint8_t* p, int64_t rem) {
  __m128i b;
  if constexpr (TAIL) {
    uint64_t bytes = 0;
    std::memcpy(&bytes, p, static_cast<size_t>(rem));
    b = _mm_cvtsi64_si128(static_cast<long long>(bytes));
  } else {
    b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  }
  return SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
}

template <bool TAIL>
inline __m256 load_x(const float* p, __m256i mask) {
  return TAIL ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
}

// 8 and 4 bits: (q - z) x summed per group, in fp32 as tile8 does (no int32 wrap), and scaled
// once per group: a shift, a mask, a conversion and a subtraction per 8 weights before the FMAs.
template <int BITS, bool SIGNED, typename S, int MT, int NT>
void tile_convert(const LinearArgs& a, int64_t n0, int64_t m0) {
  constexpr int PER = 8 / BITS;
  const int64_t gb = a.group / PER;
  const __m256i low_bits = _mm256_set1_epi32((1 << BITS) - 1);
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  const float* xs[MT][PER];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < PER; ++r) xs[t][r] = xstream<PER>(a, m0 + t, r);
  __m256 total[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < NT; ++u) total[t][u] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
    __m256 zv[NT];
    for (int u = 0; u < NT; ++u) zv[u] = _mm256_set1_ps(static_cast<float>(params<S>(a, n0 + u, g).z));
    __m256 acc[MT][NT];
    for (int t = 0; t < MT; ++t)
      for (int u = 0; u < NT; ++u) acc[t][u] = _mm256_setzero_ps();
    chunks<8>(next, b0, b1, [&]<bool TAIL>(int64_t j) {
      const __m256i mask = TAIL ? lane_mask(b1 - j) : __m256i{};
      __m256i wi[NT];
      for (int u = 0; u < NT; ++u) wi[u] = load_bytes<SIGNED, TAIL>(wrow[u] + j, b1 - j);
#pragma GCC unroll 2
      for (int r = 0; r < PER; ++r) {
        __m256 wv[NT];
        for (int u = 0; u < NT; ++u) {
          const __m256i q = BITS == 8 ? wi[u] : _mm256_and_si256(_mm256_srli_epi32(wi[u], r * BITS), low_bits);
          wv[u] = SIGNED ? _mm256_cvtepi32_ps(q) : _mm256_sub_ps(_mm256_cvtepi32_ps(q), zv[u]);
        }
        for (int t = 0; t < MT; ++t) {
          const __m256 xv = load_x<TAIL>(xs[t][r] + j, mask);
          for (int u = 0; u < NT; ++u) acc[t][u] = _mm256_fmadd_ps(wv[u], xv, acc[t][u]);
        }
      }
    });
    for (int u = 0; u < NT; ++u) {
      const __m256 sv = _mm256_set1_ps(params<S>(a, n0 + u, g).s);
      for (int t = 0; t < MT; ++t) total[t][u] = _mm256_fmadd_ps(acc[t][u], sv, total[t][u]);
    }
  }
  store_tile(a, n0, m0, total);
}

// 2 bits: per group and row, the 4 dequantized values s * (i - z) in each 128-bit half of a table
// that vpermilps indexes by the low 2 bits of each lane (no masking), one shift and one permute
// per 8 weights. Groups of 4 bytes (16 values) are taken two per chunk, the low half's table
// holding the first's values, the high half's the second's.
template <typename S, int MT, int NT>
void tile_lut2(const LinearArgs& a, int64_t n0, int64_t m0) {
  const int64_t gb = a.group / 4;
  const bool pairs = gb == 4 && a.groups > 1;
  const __m256 entries = _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3);
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  const float* xs[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < 4; ++r) xs[t][r] = xstream<4>(a, m0 + t, r);
  __m256 acc[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < NT; ++u) acc[t][u] = _mm256_setzero_ps();
  const auto table = [&](int u, int64_t g_lo, int64_t g_hi) {
    const RowParams lo = params<S>(a, n0 + u, g_lo), hi = params<S>(a, n0 + u, g_hi);
    const __m256 z = _mm256_setr_m128(_mm_set1_ps(static_cast<float>(lo.z)), _mm_set1_ps(static_cast<float>(hi.z)));
    const __m256 s = _mm256_setr_m128(_mm_set1_ps(lo.s), _mm_set1_ps(hi.s));
    return _mm256_mul_ps(_mm256_sub_ps(entries, z), s);
  };
  const auto chunk = [&]<bool TAIL>(int64_t j, int64_t end, const __m256 (&tab)[NT]) {
    const __m256i mask = TAIL ? lane_mask(end - j) : __m256i{};
    __m256i wi[NT];
    for (int u = 0; u < NT; ++u) wi[u] = load_bytes<false, TAIL>(wrow[u] + j, end - j);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m256 wv[NT];
      for (int u = 0; u < NT; ++u) wv[u] = _mm256_permutevar_ps(tab[u], r == 0 ? wi[u] : _mm256_srli_epi32(wi[u], 2 * r));
      for (int t = 0; t < MT; ++t) {
        const __m256 xv = load_x<TAIL>(xs[t][r] + j, mask);
        for (int u = 0; u < NT; ++u) acc[t][u] = _mm256_fmadd_ps(wv[u], xv, acc[t][u]);
      }
    }
  };
  if (pairs) {  // the second group past the row's end (odd group count) meets zero activations
    for (int64_t j = 0; j < a.row_bytes; j += 8) {
      next.at_line_start(j);
      const int64_t g = j / 4;
      __m256 tab[NT];
      for (int u = 0; u < NT; ++u) tab[u] = table(u, g, std::min(g + 1, a.groups - 1));
      if (j + 8 <= a.row_bytes) {
        chunk.template operator()<false>(j, a.row_bytes, tab);
      } else {
        chunk.template operator()<true>(j, a.row_bytes, tab);
      }
    }
  } else {
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t b0 = g * gb, b1 = std::min(b0 + gb, a.row_bytes);
      __m256 tab[NT];
      for (int u = 0; u < NT; ++u) tab[u] = table(u, g, g);
      chunks<8>(next, b0, b1, [&]<bool TAIL>(int64_t j) { chunk.template operator()<TAIL>(j, b1, tab); });
    }
  }
  store_tile(a, n0, m0, acc);
}

// ---- AVX2 word streams ----
// The `count` <= 8 scales of a's [N, G] scales from `first` on in fp32 (scale_at's conversion), zero
// past them; counts of 1, 2, 4 and 8 in one load of their size (written to a vector in memory and
// read back whole, 2 or 4 scales waited for the store to retire: 4-bit g16 and g32 ran 2.5x slower).
template <typename S>
inline __m256 load_scales8(const LinearArgs& a, int64_t first, int64_t count) {
  const S* p = static_cast<const S*>(a.scales) + first;
  const auto scalar = [&]<typename T>() {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
  };
  __m256i bits;
  switch (count * static_cast<int64_t>(sizeof(S))) {
    case 32: bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); break;
    case 16: bits = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); break;
    case 8: bits = _mm256_zextsi128_si256(_mm_cvtsi64_si128(scalar.template operator()<int64_t>())); break;
    case 4: bits = _mm256_zextsi128_si256(_mm_cvtsi32_si128(scalar.template operator()<int32_t>())); break;
    case 2: bits = _mm256_zextsi128_si256(_mm_cvtsi32_si128(scalar.template operator()<uint16_t>())); break;
    default: {  // a row's last few groups
      bits = _mm256_setzero_si256();
      std::memcpy(&bits, p, static_cast<size_t>(count) * sizeof(S));
    }
  }
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_castsi256_ps(bits);
  } else if constexpr (std::is_same_v<S, core::bf16_t>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)), 16));
  } else {
    return _mm256_cvtph_ps(_mm256_castsi256_si128(bits));
  }
}

// How tile_words scales its sums: per row (one group per row: the sums, scaled once at the end),
// per period (a second set of sums, over each group or over 8 words of shorter groups, scaled as
// the period ends) or per value (each value scaled before its products, where two sets of sums do
// not fit in AVX2's 16 registers).
enum class Scaling { per_row, per_period, per_value };

// 4 and 2 bits on the word streams (linear_kernels.h), 8 words (one 32-byte load per weight row) at
// a time: value position p of the words pairs with 8 contiguous floats of stream p; no widening
// shuffle and no masked activation loads. 4 bits take the streams scaled by position: the value at
// position p masked in place and converted, q 2^(4 p) (the last position shifted down), two
// instructions per 8 weights where shifting each down and subtracting its offset took three
// (M = 1, from L2: 4-bit g128 3.0 -> 2.1-2.2 cycles per 16 weights), with the offset c = 0; the
// products, 2^24 x q, are scaled back once the row's are summed. 2 bits
// look their values up in a constant table of q - c, c = 2 (vpermilps reads each index's low 2
// bits). Then
//   sum_k x s (q - z) = s sum_k x (q - c) - s (z - c) sum_k x,
// the last term from each activation row's sum over each group (xsum) after the row's products,
// where z differs from c. Groups shorter than 8 words scale each word's lane by its group's scale.
// Per period, sums start afresh each period (8 words per channel), so consecutive periods' FMAs
// overlap where a single activation row gives few chains of sums.
template <int BITS, typename S, int MT, int NT, Scaling SCALING>
void tile_words(const LinearArgs& a, int64_t n0, int64_t m0) {
  constexpr int VPW = 32 / BITS;  // values per word
  constexpr int kOffset = BITS == 4 ? 0 : 2;
  const int64_t row_words = (a.row_bytes + 3) / 4;
  const bool per_channel = a.groups == 1;
  const int64_t group_words = per_channel ? row_words : a.group * BITS / 32;
  const int64_t period = per_channel ? 8 : std::max<int64_t>(group_words, 8);  // per_period and per_value
  const int64_t period_groups = per_channel ? 0 : std::max<int64_t>(8 / group_words, 1);
  // Each word's lane's group within its load, for groups of 1, 2 or 4 words.
  const __m256i lane_group = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32(std::countr_zero(static_cast<uint64_t>(group_words))));
  const uint8_t* wrow[NT];
  for (int u = 0; u < NT; ++u) wrow[u] = a.w + (n0 + u) * a.row_bytes;
  const NextTile<NT> next(a, n0);
  // Row u's scales for the period from group g: its group's, or each word's group's.
  const auto period_scale = [&](int u, int64_t g) {
    const int64_t first = (n0 + u) * a.groups + g;
    if (group_words >= 8) return _mm256_set1_ps(scale_at<S>(a, first));
    return _mm256_permutevar8x32_ps(load_scales8<S>(a, first, std::min(period_groups, a.groups - g)), lane_group);
  };
  __m256 total[MT][NT];
  for (auto& row : total)
    for (auto& sum : row) sum = _mm256_setzero_ps();
  // The products of the 8 words from word d into sums, each value scaled first per value.
  const auto add_products = [&]<bool TAIL>(int64_t d, __m256 (&sums)[MT][NT], const __m256 (&scale)[NT]) {
    __m256i wi[NT];
    for (int u = 0; u < NT; ++u) {
      if constexpr (TAIL) {  // the row's last bytes, zero past them (the activations there are zero)
        wi[u] = _mm256_setzero_si256();
        std::memcpy(&wi[u], wrow[u] + 4 * d, static_cast<size_t>(a.row_bytes - 4 * d));
      } else {
        wi[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[u] + 4 * d));
      }
    }
    // These 8 words' activations: half of block d / 16 of each row's streams.
    const float* xs = a.xd + ((d / kWordBlock) * a.M + m0) * VPW * kWordBlock + (d & (kWordBlock - 1));
    const auto value = [&](int u, int p) {
      __m256 wv;
      if constexpr (BITS == 4) {
        const __m256i in_place = _mm256_and_si256(wi[u], _mm256_set1_epi32(15 << (4 * p)));
        wv = _mm256_cvtepi32_ps(p == VPW - 1 ? _mm256_srli_epi32(wi[u], 28) : in_place);
      } else {
        wv = _mm256_permutevar_ps(_mm256_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1), p == 0 ? wi[u] : _mm256_srli_epi32(wi[u], 2 * p));
      }
      return SCALING == Scaling::per_value ? _mm256_mul_ps(wv, scale[u]) : wv;
    };
#pragma GCC unroll 16
    for (int p = 0; p < VPW; ++p) {
      if constexpr (NT > 2) {
        __m256 xv[MT];
        for (int t = 0; t < MT; ++t) xv[t] = _mm256_loadu_ps(xs + (t * VPW + p) * kWordBlock);
        for (int u = 0; u < NT; ++u) {
          const __m256 wv = value(u, p);
          for (int t = 0; t < MT; ++t) sums[t][u] = _mm256_fmadd_ps(wv, xv[t], sums[t][u]);
        }
      } else {
        __m256 wv[NT];
        for (int u = 0; u < NT; ++u) wv[u] = value(u, p);
        for (int t = 0; t < MT; ++t) {
          const __m256 xv = _mm256_loadu_ps(xs + (t * VPW + p) * kWordBlock);
          for (int u = 0; u < NT; ++u) sums[t][u] = _mm256_fmadd_ps(wv[u], xv, sums[t][u]);
        }
      }
    }
  };
  // The products of words [d0, d1) into sums: 32-byte chunks, the row's last one copied.
  const auto add_span = [&](int64_t d0, int64_t d1, __m256 (&sums)[MT][NT], const __m256 (&scale)[NT]) {
    chunks<32>(next, 4 * d0, std::min(4 * d1, a.row_bytes),
               [&]<bool TAIL>(int64_t j) { add_products.template operator()<TAIL>(j / 4, sums, scale); });
  };
  const __m256 no_scale[NT] = {};
  if constexpr (SCALING == Scaling::per_row) {
    add_span(0, row_words, total, no_scale);
  } else {
    for (int64_t d0 = 0, g = 0; d0 < row_words; d0 += period, g += period_groups) {
      const int64_t d1 = std::min(d0 + period, row_words);
      if constexpr (SCALING == Scaling::per_value) {
        __m256 scale[NT];
        for (int u = 0; u < NT; ++u) scale[u] = period_scale(u, g);
        add_span(d0, d1, total, scale);
      } else {
        __m256 period_sums[MT][NT];
        for (auto& row : period_sums)
          for (auto& sum : row) sum = _mm256_setzero_ps();
        add_span(d0, d1, period_sums, no_scale);
        for (int u = 0; u < NT; ++u) {
          if (per_channel) {
            for (int t = 0; t < MT; ++t) total[t][u] = _mm256_add_ps(total[t][u], period_sums[t][u]);
          } else {
            const __m256 s = period_scale(u, g);
            for (int t = 0; t < MT; ++t) total[t][u] = _mm256_fmadd_ps(period_sums[t][u], s, total[t][u]);
          }
        }
      }
    }
  }
  if (per_channel) {  // the row's one scale
    for (int u = 0; u < NT; ++u) {
      const __m256 s = _mm256_set1_ps(scale_at<S>(a, n0 + u));
      for (int t = 0; t < MT; ++t) total[t][u] = _mm256_mul_ps(total[t][u], s);
    }
  }
  if constexpr (BITS == 4) {  // the streams' 2^24 (linear_kernels.h)
    for (auto& row : total)
      for (auto& sum : row) sum = _mm256_mul_ps(sum, _mm256_set1_ps(0x1p-24f));
  }
  // The zero points' term, s (z - c) sum_k x, 8 groups at a time.
  if (a.zeros != nullptr || a.zero_const != kOffset) {
    for (int64_t g = 0; g < a.groups; g += 8) {
      const int64_t count = std::min<int64_t>(a.groups - g, 8);
      const __m256i lanes = lane_mask(count);
      __m256 xsum[MT];
      for (int t = 0; t < MT; ++t) xsum[t] = _mm256_maskload_ps(a.xsum + (m0 + t) * a.groups + g, lanes);
      for (int u = 0; u < NT; ++u) {
        const int64_t first = (n0 + u) * a.groups + g;
        const __m256i z = a.zeros != nullptr ? _mm256_maskload_epi32(a.zeros + first, lanes) : _mm256_set1_epi32(a.zero_const);
        // z - c in fp32: in int32 lanes a zero point near INT32_MIN wraps.
        const __m256 offset = _mm256_sub_ps(_mm256_cvtepi32_ps(z), _mm256_set1_ps(kOffset));
        const __m256 offset_scale = _mm256_mul_ps(load_scales8<S>(a, first, count), offset);
        for (int t = 0; t < MT; ++t) total[t][u] = _mm256_fnmadd_ps(offset_scale, xsum[t], total[t][u]);
      }
    }
  }
  store_tile(a, n0, m0, total);
}

// The word-stream layouts of tile_words: groups of 1, 2 or 4 words (4 bits: 8, 16 or 32 values; 2
// bits: 16, 32 or 64), and below 3 activation rows groups of a multiple of 8 words (4 bits: 64
// values; 2 bits: 128) and one group per row. From 3 rows the byte-stream kernels took those in
// less time (4096x2048 from L2, one thread, cycles per 16 weights and activation row, bytes /
// words: M = 3 4-bit g128 1.53 / 1.82, per channel 1.56 / 1.74, M = 4 1.46 / 1.62 and 1.23 / 1.47,
// 2-bit per channel 1.21 / 1.30), tile_convert's 4 x 2 tiles near two FMAs per cycle where
// tile_words's, with as many FMAs, were not.
Streams streams(int bits, int64_t group, bool per_channel, bool zero_points, int64_t rows) {
  if (bits == 8) return Streams::bytes;
  const int64_t group_words = group * bits / 32;
  const bool lanes = !per_channel && group * bits % 32 == 0 && group_words <= 4 &&
                     std::has_single_bit(static_cast<uint64_t>(group_words));
  const bool whole = per_channel || (group * bits % 256 == 0);
  if (!(lanes || (whole && rows <= 2))) return Streams::bytes;
  if (bits == 4) return Streams::scaled_words_and_sums;
  return zero_points ? Streams::words_and_sums : Streams::words;
}

template <int BITS, bool SIGNED, typename S, int MT, int NT>
void tile_simd(const LinearArgs& a, int64_t n0, int64_t m0) {
  if constexpr (BITS == 8) {
    tile_convert<BITS, SIGNED, S, MT, NT>(a, n0, m0);
  } else if (a.word_streams && a.groups == 1 && MT >= 2) {
    tile_words<BITS, S, MT, NT, Scaling::per_row>(a, n0, m0);
  } else if (a.word_streams && MT <= 2) {
    tile_words<BITS, S, MT, NT, Scaling::per_period>(a, n0, m0);
  } else if (a.word_streams) {
    tile_words<BITS, S, MT, NT, Scaling::per_value>(a, n0, m0);
  } else if constexpr (BITS == 2) {
    tile_lut2<S, MT, NT>(a, n0, m0);
  } else {
    tile_convert<BITS, SIGNED, S, MT, NT>(a, n0, m0);
  }
}
#define LINQUANT_HAVE_SIMD_GEMV 1
#endif

#if defined(LINQUANT_HAVE_SIMD_GEMV)
// Weight rows per register tile with MT activation rows. AVX2's 16 registers hold 4 x 4 sums only
// by spilling the weights and activations around them: 2 weight rows from 3 activation rows were
// 20-25% faster than 4 at M = 4 and 8 (4096x4096).
#if defined(__AVX512F__)
template <int MT>
constexpr int tile_rows = 4;
#else
template <int MT>
constexpr int tile_rows = MT <= 2 ? 4 : 2;
#endif

// Register tiles of MT activation rows x NT weight rows over weight rows [n0, n1).
template <int BITS, bool SIGNED, typename S, int MT, int NT>
void tile_span(const LinearArgs& a, int64_t n0, int64_t n1, int64_t m0) {
  int64_t n = n0;
  for (; n + NT <= n1; n += NT) tile_simd<BITS, SIGNED, S, MT, NT>(a, n, m0);
  for (; n < n1; ++n) tile_simd<BITS, SIGNED, S, MT, 1>(a, n, m0);
}

template <int BITS, bool SIGNED, typename S>
void gemv_simd(const LinearArgs& a, int64_t n0, int64_t n1) {
  row_tiles(a, n0, n1,
            [&]<int MT>(int64_t nb, int64_t nb1, int64_t m) { tile_span<BITS, SIGNED, S, MT, tile_rows<MT>>(a, nb, nb1, m); });
}
#endif

template <int BITS, bool SIGNED, typename S>
void gemv(const LinearArgs& a, int64_t n0, int64_t n1) {
#if defined(LINQUANT_HAVE_SIMD_GEMV)
  gemv_simd<BITS, SIGNED, S>(a, n0, n1);
#else
  gemv_scalar<BITS, SIGNED, S>(a, n0, n1);
#endif
}

void gemv_dispatch(const LinearArgs& a, int64_t n0, int64_t n1) {
  for_format(a, [&]<int BITS, bool SIGNED, typename S>() { gemv<BITS, SIGNED, S>(a, n0, n1); });
}

#if !defined(LINQUANT_HAVE_SIMD_GEMV)
Streams streams(int, int64_t, bool, bool, int64_t) { return Streams::bytes; }
#endif

// The fewest activation rows from which the fp32 GEMM path (Path::gemm in linear.cpp) beats gemv,
// by weight layout: on AVX-512 linquant's gemm_f32, elsewhere ATen's fp32 GEMM over weight tiles
// dequantized by dequant_rows. Measured on the development machine (AMD EPYC Zen 5, 2 cores) with
// both paths alternating in one process, fp32 activations and scales, weights streamed from
// DRAM (rotated copies over 100 MB; median of 9 calls, best of 2): gemv's time over the GEMM
// path's. The SIMD kernels load 16 (AVX-512) or 8 (AVX2) weight bytes at a time, so groups of few
// bytes leave lanes empty and pay a group's setup (scales, lookup tables) every few weights.
int64_t gemm_min_rows(int bits, int64_t group, bool per_channel) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  // 4096x4096 and 4096x14336 (K x N). gemm_f32 multiplies activation rows 16 at a time, so 17-31
  // rows cost it as much as 32, and M = 24 measured no better than M = 16. From 64 rows it ran at
  // 440-465 GFLOP/s, where the lookup-table kernels make 220-270 and tile8 about 360. Measured
  // while gemm_f32 dequantized block by block (0.85-0.95x its time at M = 16, see StreamPrefetch);
  // the layouts near 1 at their threshold measured again as it is (marked "now").
  // Per channel (the register kernels' fastest layouts): 8-bit (session 35) M = 24 0.74-0.80, M = 32
  // 0.95-1.06; 2-bit (word streams, session 35) M = 24 0.77-0.78, M = 32 1.04; 4-bit with K a
  // multiple of 8 (tile_lut_words, its streams blocked since session 34) M = 24 0.85-0.94, M = 28
  // 1.02-1.03, M = 32 1.16-1.26.
  if (per_channel) return 32;
  // 4-bit groups of a multiple of 128 values (tile_lut_words, session 34): g128 M = 24 0.94-1.04,
  // M = 28 1.05-1.11, M = 32 1.29-1.38; g256 M = 24 0.93-1.00, M = 32 1.23-1.33. Before the blocked
  // streams the GEMM took g128 from M = 16. Groups of 8-64 values (tile_lut_lanes, session 36;
  // 4096x4096 and 14336x4096): g64 M = 24 0.87-0.97, M = 28 1.07-1.12; g32 M = 24 0.85-0.87, M = 28
  // 0.99-1.03, M = 32 1.15-1.18; g16 M = 28 0.88-0.91, M = 32 0.98-1.04, M = 40 0.97-1.02, M = 48
  // 1.18-1.21; g8 M = 48 0.94-0.96, M = 64 1.07 (before, the GEMM took g64 from 16 rows, g32 and
  // g16 from 12, g8 from 8).
  if (bits == 4 && (group % 128 == 0 || group == 64 || group == 32)) return 28;
  if (bits == 4 && (group == 16 || group == 8)) return group == 16 ? 32 : 64;
  // Groups of fewer than 8 values, and 8-bit and 2-bit groups of 8: 2-bit M = 4 0.81-1.09, M = 6
  // 1.39-1.69; 4-bit M = 6 0.92, M = 8 1.18-1.20 (g8, before tile_lut_lanes); 8-bit M = 8
  // 1.00-1.01, M = 12 1.46-1.51.
  if (group <= 8) return bits == 2 ? 6 : bits == 4 ? 8 : 12;
  // 2-bit g16 and g32 (tile_lut_lanes, session 36): g16 M = 32 0.94-0.96, M = 40 0.90-0.95, M = 48
  // 1.09-1.13; g32 M = 24 0.75-0.79, M = 32 1.06-1.07 (before, with tile_lut2_split, g16 M = 48
  // 1.00-1.20, M = 64 1.08-1.33).
  if (bits == 2 && group <= 32) return group == 16 ? 48 : 32;
  // 2-bit groups of 64 values or more (word streams from session 35, as per channel): g64 M = 24
  // 0.75-0.77, M = 32 1.01-1.03; g128 M = 24 0.77-0.80, M = 32 1.04-1.05; g256 M = 24 0.79-0.80,
  // M = 32 1.06-1.09 (and 0.89-0.94 at M = 40, which the GEMM multiplies as 48). 8-bit g256 M = 24
  // 0.79-0.80, M = 32 1.04-1.07.
  if ((bits == 2 && group >= 64) || group >= 256) return 32;
  // 8-bit (tile8's loads unmasked but in a group's last chunk since session 35): g64 M = 24
  // 0.95-0.97, M = 28 1.10-1.14; g128 M = 24 0.86-0.87, M = 28 1.01; g32 M = 12 0.81, M = 16
  // 1.07-1.09; g16 M = 10 0.92-0.95, M = 12 1.08-1.11.
  if (bits == 8 && group >= 64) return 28;
  if (bits == 8 && group == 32) return 16;
  if (bits == 8 && group == 16) return 12;
  // The others (4-bit groups such as 48 or 96 values, on the byte streams), as 4-bit g64 measured
  // there (before tile_lut_lanes): M = 12 0.91-0.95, M = 16 1.17-1.27.
  return 16;
#elif defined(__AVX2__) && defined(__FMA__)
  // Measured as above against ATen's GEMM (MKL, about 180 GFLOP/s here), each copy picked by
  // LINQUANT_CPU_ISA, 4096x4096 (on 4096x14336 the GEMM path was slower, and gemv's share 0.5-0.8
  // of these).
  const int64_t group_bytes = group * bits / 8;
  // Per channel: 8-bit 0.95 at 256, 0.99 at 512; 4-bit 0.92 at 128, 1.02 at 256.
  if (per_channel) return 512;
  // The word-stream kernel's groups of 1, 2 or 4 words (tile_words, session 37; 4096x4096 and
  // 14336x4096): 4-bit g8 0.95-0.98 at 36, 1.08 at 40; g16 0.96-0.97 at 28, 1.08 at 32; 2-bit g16
  // 0.96-0.99 at 48, 1.03-1.06 at 56; g32 0.91-0.94 at 40, 1.01-1.05 at 48; g64 0.86-0.87 at 32,
  // 0.99-1.01 at 48 (before, on the byte streams: 4-bit g8 1.60 at 8, 2-bit g32 1.21 at 32). For
  // a while later the GEMM path ran 1.5x slower (the kernel as fast), putting these near 0.6.
  if (bits == 4 && (group == 8 || group == 16)) return group == 8 ? 40 : 32;
  if (bits == 2 && (group == 16 || group == 32 || group == 64)) return group == 16 ? 56 : 48;
  // Other groups of 8 values or fewer pay a group's setup every 1-4 bytes: 2-bit g4 1.30 at M = 1,
  // 2-bit g8 0.76 at 4 and 1.38 at 8, 8-bit g8 0.95 at 16.
  if (group <= 8) return bits == 8 ? 16 : group_bytes <= 1 ? 1 : 8;
  // Other 2-bit groups: g128 and g256 0.81-0.84 at 32, 1.01-1.09 at 64.
  if (bits == 2) return 64;
  // 8 and 4 bits, about the group size: 4-bit g32 1.03 at 32 (tile_words: 0.97 at 28, 1.07-1.09
  // at 32), g64 1.04 at 64, g128 1.04 at 128, g256 0.98 at 128 and 1.08 at 256; 8-bit g16 0.84 at
  // 16 and 1.19 at 32, g32 0.98 at 32, g64 1.03 at 64, g128 1.06 at 128.
  return std::clamp<int64_t>(group, bits == 8 ? 32 : 16, 512);
#else
  // Plain C++ (measured as the SSE2 copy, against MKL's AVX-512 GEMM: where the GEMM has lanes no
  // wider than the kernels', as with NEON, it would pay to switch later still). 2- and 4-bit g128,
  // 4-bit g32 and 8-bit per channel: 0.83-0.97 at M = 1, 0.86-1.23 at M = 2, 0.85-1.06 at M = 3,
  // 0.90-1.08 at M = 4, 1.61-1.83 at M = 8, and the GEMM path's times varied 2-3x between runs
  // where the kernel's did not. 2-bit g16 (4-byte groups: the kernel's loops run 4 bytes long): 1.88
  // at M = 1.
  (void)per_channel;
  return group * bits / 8 <= 4 ? 1 : 4;
#endif
}

#if defined(LINQUANT_HAVE_PANEL_GEMMS)
const LinearKernels kTable = {gemv_dispatch,     streams,            gemm_min_rows, nullptr,
                              gemm_f32_dispatch, gemm_bf16_dispatch, gemv_bf16,     transpose_dwords};
#else
// ATen's fp32 GEMM path's weight tiles (gemm_f32 dequantizes its own panels).
template <int BITS, bool SIGNED, typename S>
void dequant(const LinearArgs& a, int64_t n0, int64_t n1, float* out) {
  using Q = std::conditional_t<SIGNED, int8_t, uint8_t>;
  std::vector<uint8_t> values(static_cast<size_t>(a.K) + 8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.w + n * a.row_bytes;
    if constexpr (BITS < 8) {
      core::unpack_row<BITS>(q, a.K, values.data());
      q = values.data();
    }
    for (int64_t g = 0; g < a.groups; ++g) {
      const RowParams p = params<S>(a, n, g);
      const int64_t k0 = g * a.group, k1 = std::min(k0 + a.group, a.K);
      // Exactly as linquant::dequantize.
      core::dequantize_span(reinterpret_cast<const Q*>(q) + k0, k1 - k0, p.s, p.z, out + (n - n0) * a.K + k0);
    }
  }
}

void dequant_dispatch(const LinearArgs& a, int64_t n0, int64_t n1, float* out) {
  for_format(a, [&]<int BITS, bool SIGNED, typename S>() { dequant<BITS, SIGNED, S>(a, n0, n1, out); });
}

const LinearKernels kTable = {gemv_dispatch, streams,      gemm_min_rows, dequant_dispatch,
                              nullptr,       nullptr,      nullptr,       nullptr};
#endif

}  // namespace

const LinearKernels& LINQUANT_ISA_NAME(linear_kernels)() { return kTable; }

}  // namespace linquant::cpu
