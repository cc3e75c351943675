// Tensor-core kernel of the weight-only linear op for small batches (M <= 16, fp16 / bf16
// activations), dequantizing in registers: no shared memory and no block barriers in the K loop.
//
// Each warp owns 16 weight rows and walks K in steps of 128 values: lane (g, t) = (lane / 4,
// lane % 4) loads the 32-value chunks [32 t, 32 t + 32) of the step in rows g and g + 8 (four lanes
// read 64 contiguous bytes of a row at 4 bits), dequantizes them to 16 pairs of the activation
// dtype (dequant_chunk_to, exactly dequantize's values) and feeds them to mma.sync m16n8k16 as the
// A operand, the weight rows being A's rows. A dot product does not depend on the order of its
// terms, so each lane's A slots (2t, 2t + 1, 2t + 8, 2t + 9) of k tile j hold values 4j .. 4j + 3
// of its own chunk, and the B operand (activations, column m = g) holds the activations of the
// same four positions: one 8-byte load of x[m, 32 t + 4 j ..]. The weights need no repacking.
// fp32 accumulators; K split over blocks with the GEMV's deterministic last-block reduction.
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

// Whether tc_gemv_kernel takes this problem: mma_kernel's weight layouts, K a multiple of the
// chunk (no padding: x is read a whole chunk at a time) and x aligned for 8-byte loads.
inline bool tc_gemv_supports(const LinearParams& p, int bits, const void* x) {
  return p.M <= kTcMaxRows && mma_supports(p, bits) && p.K % kMmaChunk == 0 &&
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
#else
  // The same layout computed lane by lane through warp shuffles (the host emulation's tests).
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  const auto half = [](uint32_t word, int k) { return core::to_float(T{static_cast<uint16_t>(word >> (16 * (k % 2)))}); };
  for (int k = 0; k < 16; ++k) {
    const int hi = k >= 8, owner = (k % 8) / 2;  // the lane column t that holds k, and which half of K
    const float a_g = half(__shfl_sync(0xFFFFFFFFu, a[2 * hi], 4 * g + owner), k);
    const float a_g8 = half(__shfl_sync(0xFFFFFFFFu, a[1 + 2 * hi], 4 * g + owner), k);
    const float b_0 = half(__shfl_sync(0xFFFFFFFFu, b[hi], 4 * (2 * t) + owner), k);
    const float b_1 = half(__shfl_sync(0xFFFFFFFFu, b[hi], 4 * (2 * t + 1) + owner), k);
    d[0] += a_g * b_0;
    d[1] += a_g * b_1;
    d[2] += a_g8 * b_0;
    d[3] += a_g8 * b_1;
  }
#endif
}

// Launch geometry: blocks of kTcWarps * 16 weight rows, K in warp steps.
LQ_HD int64_t tc_gemv_blocks(int64_t n) { return (n + kTcWarps * 16 - 1) / (kTcWarps * 16); }
LQ_HD int64_t tc_gemv_steps(int64_t k) { return (k + kTcStep - 1) / kTcStep; }
// Blocks a multiprocessor holds at once, which split K aims to fill: registers bound them (128 a
// thread with one activation fragment, 168 with two, of 64K). On an H100 (8192 x 8192 W4, M = 1,
// under the profiler) aiming at 2 left 8 warps per SM at 22% of DRAM bandwidth, 53 us; aiming at 4
// gives 30%, 39 us.
constexpr int tc_gemv_blocks_per_sm(int nf) { return nf == 1 ? 4 : 3; }

template <int BITS, int NF, typename T>
__global__ void __launch_bounds__(kTcWarps * 32)
    tc_gemv_kernel(LinearParams p, const T* __restrict__ x, T* __restrict__ y, float* __restrict__ partial,
                   int* __restrict__ tickets, int64_t steps_per_split) {
  constexpr int DEPTH = mma_depth<BITS>();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kTcWarps + warp) * 16;
  const int64_t steps = tc_gemv_steps(p.K);
  const int64_t step0 = blockIdx.y * steps_per_split;
  const int64_t step1 = step0 + steps_per_split < steps ? step0 + steps_per_split : steps;
  const bool pairs_exact = pairs_exact_for<BITS, T>(p);

  float acc[NF][4] = {};
  // The activations of a step at this lane's chunk: row m = 8 f + g; zeros past M and past K (a
  // step's last chunks may start beyond K, which is a multiple of the chunk).
  uint2 xv[NF][kMmaChunk / 4];
  auto load_x = [&](int64_t step) {
    const int64_t k0 = step * kTcStep + t * kMmaChunk;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int64_t m = f * 8 + g;
      const bool in = m < p.M && k0 < p.K;
      const uint2* xs = reinterpret_cast<const uint2*>(x + (in ? m * p.K + k0 : 0));
#pragma unroll
      for (int j = 0; j < kMmaChunk / 4; ++j) xv[f][j] = in ? xs[j] : make_uint2(0u, 0u);
    }
  };
  // One step: this lane's chunks of rows g and g + 8 dequantized, then 8 k tiles x NF fragments,
  // then the next step's activations loaded, so that their latency (L1 or L2) passes during that
  // step's dequantization. (On an H100 this gained nothing measurable over loading them at the
  // start of their own step: the kernel is bound by its instructions, see linear.cu.)
  auto run_step = [&](int64_t step, WeightChunk<BITS> (&c)[2]) {
    const int64_t k0 = step * kTcStep + t * kMmaChunk;
    uint32_t lo[kMmaChunk / 2], hi[kMmaChunk / 2];
    dequant_chunk_to<BITS, T>(p, c[0], pairs_exact, lo);
    dequant_chunk_to<BITS, T>(p, c[1], pairs_exact, hi);
    if (step + DEPTH < step1) {  // the registers just consumed take the chunks DEPTH steps on
      fetch_chunk<BITS, true>(p, n0 + g, k0 + DEPTH * kTcStep, c[0]);
      fetch_chunk<BITS, true>(p, n0 + g + 8, k0 + DEPTH * kTcStep, c[1]);
    }
#pragma unroll
    for (int f = 0; f < NF; ++f) {
#pragma unroll
      for (int j = 0; j < kMmaChunk / 4; ++j) {
        const uint32_t a[4] = {lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1]};
        const uint32_t b[2] = {xv[f][j].x, xv[f][j].y};
        mma_16816<T>(acc[f], a, b);
      }
    }
    if (step + 1 < step1) load_x(step + 1);
  };

  WeightChunk<BITS> chunks[DEPTH][2];
#pragma unroll
  for (int j = 0; j < DEPTH; ++j) {
    if (step0 + j < step1) {
      fetch_chunk<BITS, true>(p, n0 + g, (step0 + j) * kTcStep + t * kMmaChunk, chunks[j][0]);
      fetch_chunk<BITS, true>(p, n0 + g + 8, (step0 + j) * kTcStep + t * kMmaChunk, chunks[j][1]);
    }
  }
  if (step0 < step1) load_x(step0);
  for (int64_t base = step0; base < step1; base += DEPTH) {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j) {
      if (base + j < step1) run_step(base + j, chunks[j]);
    }
  }

  // acc[f][i]: weight row n0 + g + 8 (i / 2), activation row 8 f + 2 t + i % 2.
  const bool split = gridDim.y > 1;
#pragma unroll
  for (int f = 0; f < NF; ++f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t n = n0 + g + 8 * (i / 2), m = f * 8 + 2 * t + i % 2;
      if (n >= p.N || m >= p.M) continue;
      if (split) {
        partial[(blockIdx.y * p.M + m) * p.N + n] = acc[f][i];
      } else {
        y[m * p.N + n] = core::from_float<T>(acc[f][i] + p.bias.get_or_zero(n));
      }
    }
  }
  if (split) {
    finish_split_k(p, y, partial, &tickets[blockIdx.x], gridDim.y, static_cast<int64_t>(blockIdx.x) * kTcWarps * 16,
                   kTcWarps * 16, 0, kTcMaxRows);
  }
}

}  // namespace linquant::cuda
