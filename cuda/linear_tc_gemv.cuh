// Tensor-core kernel of the weight-only linear op for small batches (M <= 16, fp16 / bf16
// activations), dequantizing in registers: no shared memory and no block barriers in the K loop.
//
// Each warp owns 16 weight rows and walks K in steps of 128 values: lane (g, t) = (lane / 4,
// lane % 4) loads the 32-value chunks [32 t, 32 t + 32) of the step in rows g and g + 8 (four lanes
// read 64 contiguous bytes of a row at 4 bits), dequantizes them to 16 pairs of the activation
// dtype and feeds them to mma.sync m16n8k16 as the A operand, the weight rows being A's rows. A dot
// product does not depend on the order of its terms, so each lane's A slots (2t, 2t + 1, 2t + 8,
// 2t + 9) of k tile j hold pairs 2j and 2j + 1 of its own chunk, in the order that dequantizes
// cheapest (tc_pair_order), and the B operand (activations, column m = g) holds the activations of
// the same positions, loaded from x[m, 32 t ..] and permuted to that order. The weights need no
// repacking. Where a step lies in one group the tensor cores multiply the integers q - z and the
// step's sums are scaled in fp32 (the INT variant); else they multiply s * (q - z) rounded to the
// activation dtype, dequantize's values. fp32 accumulators; K split over blocks with the GEMV's
// deterministic last-block reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "linear_gemv.cuh"
#include "linear_mma.cuh"  // WeightChunk, fetch_chunk, dequant_chunk_to, MmaType

namespace linquant::cuda {

constexpr int kTcWarps = 4;                      // warps per block, 16 weight rows each
constexpr int kTcStep = 4 * kMmaChunk;           // K values per warp step (four lanes per row)
constexpr int kTcMaxRows = 16;                   // activation rows: two n8 fragments
constexpr int kTcStagedMaxRows = 64;             // with staged activations (linear_tc_staged.cuh): eight

// Whether the register tensor-core kernels (this one, and the staged one past kTcMaxRows) take
// this problem: mma_kernel's weight layouts, K a multiple of the chunk (no padding: x is read a
// whole chunk at a time) and x aligned for 8-byte loads.
inline bool tc_gemv_supports(const LinearParams& p, int bits, const void* x) {
  return p.M <= kTcStagedMaxRows && mma_supports(p, bits) && p.K % kMmaChunk == 0 &&
         reinterpret_cast<uintptr_t>(x) % 8 == 0;
}

// D += A B for one m16n8k16 tile with fp32 accumulators, in mma.sync's fragment layout: lane
// (g, t) holds A[g][2t .. 2t+1] (a[0]), A[g+8][2t ..] (a[1]), A[g][2t+8 ..] (a[2]), A[g+8][2t+8 ..]
// (a[3]); B[2t .. 2t+1][g] (b[0]), B[2t+8 ..][g] (b[1]); D[g][2t], D[g][2t+1], D[g+8][2t],
// D[g+8][2t+1] (d[0..3]). Pairs are (low, high) halves of a word.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, core::half_t>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(LINQUANT_CUDA_EMULATION)
  // The same layout computed lane by lane from the warp's fragments (the host emulation's tests).
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const auto all = cuda_emulation::gather(mine);
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  const auto half = [](uint32_t word, int k) { return core::to_float(T{static_cast<uint16_t>(word >> (16 * (k % 2)))}); };
  for (int k = 0; k < 16; ++k) {
    const int hi = k >= 8, owner = (k % 8) / 2;  // the lane column t that holds k, and which half of K
    const float a_g = half(all[4 * g + owner][2 * hi], k);
    const float a_g8 = half(all[4 * g + owner][1 + 2 * hi], k);
    const float b_0 = half(all[4 * (2 * t) + owner][4 + hi], k);
    const float b_1 = half(all[4 * (2 * t + 1) + owner][4 + hi], k);
    d[0] += a_g * b_0;
    d[1] += a_g * b_1;
    d[2] += a_g8 * b_0;
    d[3] += a_g8 * b_1;
  }
#endif
}

// v, which the compiler must keep as computed (in a register) rather than recompute where it is used.
template <typename V>
__device__ __forceinline__ V pin_register(V v) {
#if defined(__CUDA_ARCH__)
  static_assert(sizeof(V) == 8, "64-bit values");
  asm volatile("" : "+l"(v));
#endif
  return v;
}

// (a & MASK) | OR in one instruction (ptxas splits the C++ form into two when both are constants).
template <uint32_t MASK, uint32_t OR>
LQ_HD uint32_t and_or(uint32_t a) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "n"(MASK), "n"(OR));
  return r;
#else
  return (a & MASK) | OR;
#endif
}

// The tensor-core kernel's pair order. A dot product does not depend on the order of its terms, so
// the kernel takes each 32-value chunk's pairs in whatever order dequantizes cheapest at 4 and 2
// bits, and puts the activations in the same order. At 4 bits pair 4 d + s of the chunk holds
// values (8 d + s, 8 d + s + 4): one shift and one lop3 of word d (below); at 2 bits pair 8 d + s
// holds (16 d + s, 16 d + s + 8); at 8 bits pairs stay consecutive. This reorders 16 words of
// consecutive pairs into that order (one byte permute a pair).
template <int BITS>
LQ_HD void tc_pair_order(uint32_t (&v)[kMmaChunk / 2]) {
  constexpr int SPAN = 16 / BITS;  // words of consecutive pairs one reordered block spans: 4 or 8
  if constexpr (BITS < 8) {
#pragma unroll
    for (int d = 0; d < kMmaChunk / 2; d += SPAN) {
      uint32_t c[SPAN];
#pragma unroll
      for (int i = 0; i < SPAN; ++i) c[i] = v[d + i];
#pragma unroll
      for (int i = 0; i < SPAN / 2; ++i) {
        v[d + 2 * i] = byte_perm(c[i], c[i + SPAN / 2], 0x5410);      // low values of words i, i + SPAN / 2
        v[d + 2 * i + 1] = byte_perm(c[i], c[i + SPAN / 2], 0x7632);  // their high values
      }
    }
  }
}

// A chunk's pairs in tc_pair_order, from the magic floats as dequant_chunk_pairs makes them, minus
// magic + z (times s if SCALED), with the same exactness; 4 and 2 bits only.
template <int BITS, typename T, bool SCALED>
LQ_HD void dequant_chunk_tc_pairs(const uint32_t (&chunk)[BITS], uint32_t s_bits, int32_t z,
                                  uint32_t (&pairs)[kMmaChunk / 2]) {
  static_assert(BITS == 4 || BITS == 2, "8-bit pairs are consecutive (dequant_chunk_pairs)");
  constexpr uint32_t magic2 = MmaType<T>::magic * 0x10001u, mask2 = ((1u << BITS) - 1) * 0x10001u;
  constexpr int PER_WORD = 16 / BITS;  // pairs a word holds
  const uint32_t fz2 = core::from_float<T>(MmaType<T>::magic_value + static_cast<float>(z)).bits * 0x10001u;
  const uint32_t s2 = s_bits * 0x10001u;
#pragma unroll
  for (int d = 0; d < BITS; ++d) {
#pragma unroll
    for (int s = 0; s < PER_WORD; ++s) {
      const uint32_t v = and_or<mask2, magic2>(chunk[d] >> (s * BITS));
      pairs[d * PER_WORD + s] = SCALED ? sub_mul2<T>(v, fz2, s2) : sub2<T>(v, fz2);
    }
  }
}

// A chunk dequantized for the tensor-core kernel: dequant_chunk_to's values, in tc_pair_order.
template <int BITS, typename T, bool SCALED>
__device__ __forceinline__ void dequant_chunk_tc(const LinearParams& p, const WeightChunk<BITS>& c, bool pairs_exact,
                                                 uint32_t (&pairs)[kMmaChunk / 2]) {
  if constexpr (BITS < 8) {
    const float limit = MmaType<T>::magic_value;
    if (pairs_exact && static_cast<float>(c.z) >= -limit && static_cast<float>(c.z) <= limit) {
      dequant_chunk_tc_pairs<BITS, T, SCALED>(c.w, c.scale, c.z, pairs);
      return;
    }
  }
  dequant_chunk_to<BITS, T, SCALED>(p, c, pairs_exact, pairs);
  tc_pair_order<BITS>(pairs);
}

// Launch geometry: blocks of kTcWarps * 16 weight rows, K in warp steps (counted in 32 bits in
// the kernel: K < 2^38).
LQ_HD int64_t tc_gemv_blocks(int64_t n) { return (n + kTcWarps * 16 - 1) / (kTcWarps * 16); }
LQ_HD int64_t tc_gemv_steps(int64_t k) { return (k + kTcStep - 1) / kTcStep; }
// Blocks a multiprocessor holds at once, which split K aims to fill: registers bound them (128 a
// thread with one activation fragment, 168 with two, of 64K). On an H100 (8192 x 8192 W4, M = 1,
// under the profiler) aiming at 2 left 8 warps per SM at 22% of DRAM bandwidth, 53 us; aiming at 4
// gives 30%, 39 us.
constexpr int tc_gemv_blocks_per_sm(int nf) { return nf == 1 ? 4 : 3; }

// Whether tc_gemv_kernel can multiply integers (its INT variant): every 128-value step of a row
// lies in one group (per-channel, or groups of 2^j steps, so a step's group is a shift of its
// index) and magic + q is exact in T (all but 8-bit weights with bf16 activations). The tensor cores then take q - z, exact, and each row's
// scale multiplies the step's fp32 sums: no multiply per weight, whatever dtype the scales have,
// and no rounding of the weights to T.
template <int BITS, typename T>
bool tc_gemv_integer_steps(const LinearParams& p) {
  static_assert(kTcStep == 1 << 7, "a step's group is its index >> (group_shift - 7)");
  return (1u << BITS) <= MmaType<T>::max_q && p.group_shift >= 7;  // per-channel: 62
}

// What a lane (g, t) of a warp owning weight rows [n0, n0 + 16) streams: chunk t of rows n0 + g
// and n0 + g + 8 in each step of [step0, step1). Its bases are computed once, so that a step costs
// no 64-bit index arithmetic, rows past N reading the last row (their results are never stored),
// and pinned (pin_register): otherwise nvcc, short of registers, rebuilds them from threadIdx and
// 64-bit products in every step.
template <int BITS, bool INT>
struct TcWeightLane {
  static constexpr int kChunkBytes = kMmaChunk * BITS / 8, kStepBytes = kTcStep * BITS / 8;
  const uint8_t* wrow[2];
  int64_t urow[2];
  // The steps whose chunk at this lane starts within K: all, or all but the last (K is a multiple
  // of the chunk, not of the step); lane_end: those within the block's split too.
  int lane_steps, lane_end;
  int t, step_group_shift;  // INT: a step's group is step >> step_group_shift

  __device__ TcWeightLane(const LinearParams& p, int64_t n0, int g, int t_, int step1) : t(t_) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t n = n0 + g + 8 * r < p.N ? n0 + g + 8 * r : p.N - 1;
      wrow[r] = pin_register(p.w + n * p.row_bytes + t * kChunkBytes);
      urow[r] = pin_register(n * p.groups);
    }
    lane_steps = static_cast<int>((p.K - t * kMmaChunk + kTcStep - 1) / kTcStep);
    lane_end = lane_steps < step1 ? lane_steps : step1;
    step_group_shift = p.group_shift - 7 < 31 ? p.group_shift - 7 : 31;
  }

  // Step `step`'s chunk of row r: its words (zeros past K), and the scale and zero point of the
  // chunk (INT: of the step, the same for the four lanes of a row, whose finite stale integers
  // times zero activations add nothing past K; else 0 and 0 past K).
  __device__ __forceinline__ void fetch(const LinearParams& p, int step, int r, WeightChunk<BITS>& c) const {
    const bool in = step < lane_end;
    if (in) {
      load_mma_chunk<BITS, true>(wrow[r] + static_cast<int64_t>(step) * kStepBytes, c.w);
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) c.w[i] = 0;
    }
    if (INT || in) {
      const int64_t u = urow[r] + (INT ? step >> step_group_shift : p.group_of(static_cast<int64_t>(step) * kTcStep +
                                                                                t * kMmaChunk));
      c.scale = p.scales.raw(u);
      c.z = p.zeros != nullptr ? p.zeros[u] : p.zero_const;
    } else {
      c.scale = 0;  // +0.0 in every scale dtype
      c.z = 0;
    }
  }

  // The ring of chunks in flight filled with the first DEPTH steps of [step0, step1).
  template <int DEPTH>
  __device__ __forceinline__ void fill(const LinearParams& p, int step0, int step1,
                                       WeightChunk<BITS> (&ring)[DEPTH][2]) const {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j) {
      if (step0 + j < step1) {
        fetch(p, step0 + j, 0, ring[j][0]);
        fetch(p, step0 + j, 1, ring[j][1]);
      }
    }
  }
};

// The K range [step0, step1) of this block's split.
struct TcSteps {
  int step0, step1;
  __device__ TcSteps(const LinearParams& p, int steps_per_split) {
    const int steps = static_cast<int>(tc_gemv_steps(p.K));
    step0 = static_cast<int>(blockIdx.y) * steps_per_split;
    step1 = step0 + steps_per_split < steps ? step0 + steps_per_split : steps;
  }
};

// The tc kernels' epilogue: acc[f][i] is weight row n0 + g + 8 (i / 2) and activation row
// 8 f + 2 t + i % 2; stored with the bias (then recompute_if_non_finite where a sum was inf or
// NaN), or with split K published and added up by the block that finishes its row block last (of
// kTcWarps * 16 rows and `max_rows` activation rows).
template <int BITS, int NF, typename T>
__device__ __forceinline__ void tc_store(const LinearParams& p, const T* x, T* y, float* partial, int* tickets,
                                         int64_t n0, int g, int t, const float (&acc)[NF][4], int max_rows) {
  const bool split = gridDim.y > 1;
  const auto n_of = [&](int i) { return n0 + g + 8 * (i % 4 / 2); };
  const auto m_of = [&](int i) { return static_cast<int64_t>(i / 4 * 8 + 2 * t + i % 2); };  // i = 4 f + i
  bool non_finite = false;
#pragma unroll
  for (int f = 0; f < NF; ++f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t n = n_of(4 * f + i), m = m_of(4 * f + i);
      if (n >= p.N || m >= p.M) continue;
      if (split) {
        partial[(blockIdx.y * p.M + m) * p.N + n] = acc[f][i];
      } else {
        y[m * p.N + n] = core::from_float<T>(acc[f][i] + p.bias.get_or_zero(n));
        non_finite |= core::is_nonfinite(acc[f][i]);
      }
    }
  }
  if (non_finite) {
#pragma unroll 1
    for (int i = 0; i < NF * 4; ++i) {
      if (n_of(i) < p.N && m_of(i) < p.M) recompute_if_non_finite(p, BITS, x, y, m_of(i), n_of(i));
    }
  }
  if (split) {
    finish_split_k(p, BITS, x, y, partial, &tickets[blockIdx.x], gridDim.y,
                   static_cast<int64_t>(blockIdx.x) * kTcWarps * 16, kTcWarps * 16, 0, max_rows);
  }
}

template <int BITS, int NF, typename T, bool INT>
__global__ void __launch_bounds__(kTcWarps * 32, tc_gemv_blocks_per_sm(NF))
    tc_gemv_kernel(LinearParams p, const T* __restrict__ x, T* __restrict__ y, float* __restrict__ partial,
                   int* __restrict__ tickets, int steps_per_split) {
  constexpr int DEPTH = mma_depth<BITS>();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kTcWarps + warp) * 16;
  const TcSteps range(p, steps_per_split);
  const int step0 = range.step0, step1 = range.step1;
  const TcWeightLane<BITS, INT> wl(p, n0, g, t, step1);
  const bool pairs_exact = INT || pairs_exact_for<BITS, T>(p);
  // Activation rows 8 f + g at this lane's chunk, pinned as the weight bases are.
  const T* xrow[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    xrow[f] = pin_register(x + (8 * f + g < p.M ? 8 * f + g : p.M - 1) * p.K + t * kMmaChunk);
  }

  float acc[NF][4] = {};
  // The activations of a step at this lane's chunk, row m = 8 f + g, zeros past K: 16 words of
  // pairs in tc_pair_order.
  uint32_t xv[NF][kMmaChunk / 2];
  auto load_x = [&](int step) {
    const bool in = step < wl.lane_steps;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const uint2* xs = reinterpret_cast<const uint2*>(xrow[f] + (in ? static_cast<int64_t>(step) * kTcStep : 0));
#pragma unroll
      for (int j = 0; j < kMmaChunk / 4; ++j) {
        const uint2 v = in ? __ldg(xs + j) : make_uint2(0u, 0u);
        xv[f][2 * j] = v.x, xv[f][2 * j + 1] = v.y;
      }
      tc_pair_order<BITS>(xv[f]);
    }
  };
  // One step: this lane's chunks of rows g and g + 8 dequantized (INT: to q - z), the loads DEPTH
  // steps on issued into their registers, 8 k tiles x NF fragments (INT: into the step's sums,
  // then scaled per row into acc), then the next step's activations loaded, so that their latency
  // (L1 or L2) passes during that step's dequantization.
  auto run_step = [&](int step, WeightChunk<BITS> (&c)[2]) {
    uint32_t lo[kMmaChunk / 2], hi[kMmaChunk / 2];
    dequant_chunk_tc<BITS, T, !INT>(p, c[0], pairs_exact, lo);
    dequant_chunk_tc<BITS, T, !INT>(p, c[1], pairs_exact, hi);
    const float s_lo = INT ? p.scales.value_of(c[0].scale) : 1.0f, s_hi = INT ? p.scales.value_of(c[1].scale) : 1.0f;
    if (step + DEPTH < step1) {  // the registers just consumed take the chunks DEPTH steps on
      wl.fetch(p, step + DEPTH, 0, c[0]);
      wl.fetch(p, step + DEPTH, 1, c[1]);
    }
    float sums[NF][4] = {};
    float (&d)[NF][4] = INT ? sums : acc;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
#pragma unroll
      for (int j = 0; j < kMmaChunk / 4; ++j) {
        const uint32_t a[4] = {lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1]};
        const uint32_t b[2] = {xv[f][2 * j], xv[f][2 * j + 1]};
        mma_16816<T>(d[f], a, b);
      }
    }
    if constexpr (INT) {
#pragma unroll
      for (int f = 0; f < NF; ++f) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[f][i] = fma_rn(i < 2 ? s_lo : s_hi, sums[f][i], acc[f][i]);
      }
    }
    if (step + 1 < step1) load_x(step + 1);
  };

  WeightChunk<BITS> chunks[DEPTH][2];
  wl.fill(p, step0, step1, chunks);
  if (step0 < step1) load_x(step0);
  for (int base = step0; base < step1; base += DEPTH) {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j) {
      if (base + j < step1) run_step(base + j, chunks[j]);
    }
  }
  tc_store<BITS, NF, T>(p, x, y, partial, tickets, n0, g, t, acc, kTcMaxRows);
}

}  // namespace linquant::cuda
