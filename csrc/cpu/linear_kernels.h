// Table of the weight-only quantized linear CPU inner loops for one instruction set, filled by
// linear_kernels_isa.cpp (compiled once per ISA) and chosen at run time by linear_kernels().
//
// The weight is docs/architecture.md's format: row n of `w` holds K values of `bits` bits packed
// along K (lowest index in the lowest bits). The activations come pre-arranged so that the kernels
// read both sides contiguously: for bits < 8 a byte holds PER = 8 / bits values, and `xd` holds
// PER streams per activation row, stream r being x[j * PER + r] for byte j (zero past K). Kernels
// that read weights a 32-bit word at a time instead take VPW = 32 / bits streams, stream p being
// x[w * VPW + p] for word w (`word_streams`), cut into blocks of kWordBlock words: block b of every
// row, then the next, [ceil(words / kWordBlock)][M][VPW][kWordBlock], so that a tile of rows finds
// a block's activations at constant offsets from one address, and for some formats (Streams::
// words_and_sums) each activation row's sum over each group (`xsum`); Streams::scaled_words_and_sums
// multiplies stream p < VPW - 1 by 2^(bits (VPW - 2 - p)) and the last by 2^(bits (VPW - 2)), so
// that a kernel may take the value at position p in place, q 2^(bits p), without shifting it down
// (the last shifted down), each product then 2^(bits (VPW - 2)) x q. Scaled up, not down: activations
// above 2^104 (4 bits) overflow, and the call is computed again through the dequantized weights,
// where scaled down those below 2^-102 would lose bits as subnormals. The bf16 kernel (`gemv_bf16`)
// takes the byte streams in bf16 (`xb`), with the group sums too. Then
// y[m, n] = sum_k x[m, k] * s[n, g(k)] * (q[n, k] - z[n, g(k)]) + bias[n].
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace linquant::cpu {

// The scales' dtype as stored: the kernels convert each scale they read to fp32 (exact from fp16
// and bf16), where converting them all first cost a write and a read of every scale per call.
enum class ScaleType : uint8_t { f32, bf16, f16 };

// Words per block of the word streams (one 64-byte weight load).
constexpr int64_t kWordBlock = 16;

struct LinearArgs {
  int64_t M = 0, N = 0, K = 0;
  int bits = 8;
  bool signed_q = false;  // int8 symmetric weights hold signed values
  int64_t row_bytes = 0;  // bytes per weight row: ceil(K * bits / 8)
  int64_t group = 0;      // values per group (per-channel: K); a multiple of 8 / bits
  int64_t groups = 0;     // G = ceil(K / group)
  const uint8_t* w = nullptr;       // [N, row_bytes]
  const void* scales = nullptr;     // [N, G] in scale_type
  ScaleType scale_type = ScaleType::f32;
  const int32_t* zeros = nullptr;   // [N, G], or nullptr: every zero point is zero_const
  int32_t zero_const = 0;           // 2^(bits-1) for symmetric sub-byte weights (stored offset)
  bool word_streams = false;        // xd holds per-word streams (see above)
  const float* xd = nullptr;        // [M, PER, row_bytes] (or blocked word) streams
  const uint16_t* xb = nullptr;     // gemv_bf16: [M, PER, row_bytes] streams of bf16 bits
  const uint32_t* xt = nullptr;     // gemm_bf16 / gemm_f32: the rows' dwords transposed (transpose_dwords)
  const float* xsum = nullptr;      // gemv_bf16, Streams::*_and_sums: [M, G] sums of x over each group
  const float* bias = nullptr;      // [N] or nullptr
  float* y = nullptr;               // [M, N]
  uint16_t* yb = nullptr;           // gemm_bf16: [M, N] bf16 bits
};

// How gemv takes a format's fp32 activations: byte streams, word streams, word streams and each
// row's sums over each group, or word streams scaled by position (see above) and the group sums.
enum class Streams : uint8_t { bytes, words, words_and_sums, scaled_words_and_sums };

struct LinearKernels {
  // Columns [n_begin, n_end) of y for every activation row, reading each weight row from memory once.
  using GemvFn = void (*)(const LinearArgs& a, int64_t n_begin, int64_t n_end);

  // How gemv wants `rows` activation rows for this format (zero_points: the weight stores them).
  using StreamsFn = Streams (*)(int bits, int64_t group, bool per_channel, bool zero_points, int64_t rows);

  // The fewest activation rows from which the fp32 GEMM over dequantized weights (gemm_f32 where
  // this instruction set has it, else ATen's over weight tiles dequantized by dequant_rows) is
  // faster than gemv, for weights of `bits` in groups of `group` values (or one group per row).
  using GemmMinRowsFn = int64_t (*)(int bits, int64_t group, bool per_channel);

  // Rows [n_begin, n_end) of the weight dequantized, s * (q - z) exactly as linquant::dequantize,
  // into out[(n - n_begin) * K + k], fp32; nullptr where gemm_f32 is set (it dequantizes its own
  // panels, and ATen's GEMM over tiles never runs).
  using DequantFn = void (*)(const LinearArgs& a, int64_t n_begin, int64_t n_end, float* out);

  GemvFn gemv;
  StreamsFn streams;
  GemmMinRowsFn gemm_min_rows;
  DequantFn dequant_rows;
  // The panel GEMMs, or nullptr (this instruction set has none): columns [n_begin, n_end) (n_begin a
  // multiple of 64) of x @ W_hat.T + bias, W_hat the dequantized weight, x as transpose_dwords lays
  // it out (xt). gemm_f32: fp32 x and W_hat, into y. gemm_bf16 (run it only where
  // cpu_has_avx512_bf16()): bf16 x, W_hat rounded to bf16 (nearest even), sums in fp32, into yb.
  GemvFn gemm_f32;
  GemvFn gemm_bf16;
  // bf16 activations through AVX512-BF16 dot products (y from the byte streams and group sums), or
  // nullptr; run it only where cpu_has_avx512_bf16().
  GemvFn gemv_bf16;
  // The panel GEMMs' activations (xt) from rows x [M, K] of 16-bit values (contiguous; fp32 rows
  // as their 16-bit halves, K doubled): dwords [d_begin, d_end) of xt[d * ldx + m] = x[m, 2 d] |
  // x[m, 2 d + 1] << 16, zero past K and for m in [M, ldx), ldx being pair_rows(M); d_begin a
  // multiple of 16.
  using TransposeDwordsFn = void (*)(const uint16_t* x, int64_t M, int64_t K, int64_t d_begin, int64_t d_end,
                                     uint32_t* xt);
  TransposeDwordsFn transpose_dwords;
};

// The activation rows of transpose_dwords' layout: M rounded up to the 16 rows a vector holds.
inline int64_t pair_rows(int64_t M) { return (M + 15) / 16 * 16; }

const LinearKernels& linear_kernels_baseline();
const LinearKernels& linear_kernels_avx2();
const LinearKernels& linear_kernels_avx512();

inline const LinearKernels& linear_kernels() { return LINQUANT_PICK_ISA(linear_kernels); }

}  // namespace linquant::cpu
