// Tensor-core kernel of the weight-only linear op for 16 < M <= 64 (fp16 / bf16 activations): the
// register tensor-core kernel's weight streaming and dequantization (linear_tc_gemv.cuh: each warp
// owns 16 weight rows, lane (g, t) dequantizes chunk t of rows g and g + 8 of each 128-value step
// in registers), with the activations of a step staged in shared memory, because 4 or 8 fragments
// of them no longer fit in registers. The block's four warps walk the same steps, so each step's
// activations are staged once for the block, already permuted to tc_pair_order and laid out as
// mma.sync's B fragments ([f][k tile j][lane], 8 bytes each, so a warp's 32 loads of a fragment
// are one conflict-free 256-byte row). Staging is double-buffered: a step's activations are
// loaded into registers before its dequantization and stored into the other buffer after its
// multiplications, one barrier a step. The weights are dequantized to s * (q - z) rounded to the
// activation dtype (no per-step sums, which would cost NF * 4 registers more). fp32 accumulators;
// K split over blocks with the last-block reduction.
#pragma once

#include "linear_tc_gemv.cuh"

namespace linquant::cuda {

// Blocks a multiprocessor holds at once (168 registers a thread), which split K aims to fill.
constexpr int kTcStagedBlocksPerSm = 3;

template <int BITS, int NF, typename T>
__global__ void __launch_bounds__(kTcWarps * 32, kTcStagedBlocksPerSm)
    tc_staged_kernel(LinearParams p, const T* __restrict__ x, T* __restrict__ y, float* __restrict__ partial,
                     int* __restrict__ tickets, int steps_per_split) {
  // Steps of weights in flight: mma_depth's, but 2 with eight fragments, whose accumulators and
  // staged activations leave no registers for more (4 steps spilled there).
  constexpr int DEPTH = NF >= 8 ? 2 : mma_depth<BITS>();
  constexpr int TILES = kMmaChunk / 4;                       // k tiles of a step
  constexpr int PIECES = NF * 8 * 4 / (kTcWarps * 32);       // (row, chunk) pieces a thread stages
  static_assert(PIECES >= 1 && PIECES * kTcWarps * 32 == NF * 32, "NF a multiple of the block's warps");
  static_assert(DEPTH % 2 == 0, "the staging buffer of a ring slot is fixed");
  __shared__ uint2 staged[2][NF][TILES][32];  // [buffer][f][j][lane]: NF * 4 KB

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kTcWarps + warp) * 16;
  const TcSteps range(p, steps_per_split);
  const int step0 = range.step0, step1 = range.step1;
  const TcWeightLane<BITS, false> wl(p, n0, g, t, step1);
  const bool pairs_exact = pairs_exact_for<BITS, T>(p);

  // Piece i of this thread: activation row 8 f + g of fragment f = warp + 4 i, chunk t, which is
  // what lane (g, t) reads of fragment f (rows past M read the last row; never stored).
  const T* xrow[PIECES];
#pragma unroll
  for (int i = 0; i < PIECES; ++i) {
    const int64_t m = 8 * (warp + kTcWarps * i) + g;
    xrow[i] = pin_register(x + (m < p.M ? m : p.M - 1) * p.K + t * kMmaChunk);
  }
  uint32_t pieces[PIECES][kMmaChunk / 2];
  auto stage_load = [&](int step) {  // zeros past K
    const bool in = step < wl.lane_steps;
#pragma unroll
    for (int i = 0; i < PIECES; ++i) {
      const uint2* src = reinterpret_cast<const uint2*>(xrow[i] + (in ? static_cast<int64_t>(step) * kTcStep : 0));
#pragma unroll
      for (int j = 0; j < TILES; ++j) {
        const uint2 v = in ? __ldg(src + j) : make_uint2(0u, 0u);
        pieces[i][2 * j] = v.x, pieces[i][2 * j + 1] = v.y;
      }
    }
  };
  auto stage_store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < PIECES; ++i) {
      tc_pair_order<BITS>(pieces[i]);
#pragma unroll
      for (int j = 0; j < TILES; ++j) {
        staged[buf][warp + kTcWarps * i][j][lane] = make_uint2(pieces[i][2 * j], pieces[i][2 * j + 1]);
      }
    }
  };

  float acc[NF][4] = {};
  // One step, reading staging buffer `buf`: the next step's activations loaded, this lane's chunks
  // dequantized, the loads DEPTH steps on issued into their registers, 8 k tiles x NF fragments,
  // the next step's activations stored into the other buffer, and the block's barrier.
  auto run_step = [&](int step, int buf, WeightChunk<BITS> (&c)[2]) {
    const bool next = step + 1 < step1;
    if (next) stage_load(step + 1);
    uint32_t lo[kMmaChunk / 2], hi[kMmaChunk / 2];
    dequant_chunk_tc<BITS, T, true>(p, c[0], pairs_exact, lo);
    dequant_chunk_tc<BITS, T, true>(p, c[1], pairs_exact, hi);
    if (step + DEPTH < step1) {
      wl.fetch(p, step + DEPTH, 0, c[0]);
      wl.fetch(p, step + DEPTH, 1, c[1]);
    }
#pragma unroll
    for (int f = 0; f < NF; ++f) {
#pragma unroll
      for (int j = 0; j < TILES; ++j) {
        const uint32_t a[4] = {lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1]};
        const uint2 bv = staged[buf][f][j][lane];
        const uint32_t b[2] = {bv.x, bv.y};
        mma_16816<T>(acc[f], a, b);
      }
    }
    if (next) stage_store(buf ^ 1);
    __syncthreads();  // the same for every thread of the block: step1 depends on the block only
  };

  WeightChunk<BITS> chunks[DEPTH][2];
  wl.fill(p, step0, step1, chunks);
  if (step0 < step1) {
    stage_load(step0);
    stage_store(0);
  }
  __syncthreads();
  for (int base = step0; base < step1; base += DEPTH) {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j) {
      if (base + j < step1) run_step(base + j, j % 2, chunks[j]);  // base - step0 is a multiple of DEPTH
    }
  }
  tc_store<BITS, NF, T>(p, x, y, partial, tickets, n0, g, t, acc, kTcStagedMaxRows);
}

}  // namespace linquant::cuda
