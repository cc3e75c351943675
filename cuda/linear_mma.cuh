// Tensor-core CUDA kernel of the weight-only linear op for batches past the GEMV's (fp16 / bf16
// activations): each block owns BN = 128 output features and BM activation rows; per K step of 64
// its threads load the packed weights of the step (one 32-value chunk per thread, the next step's
// chunk prefetched into registers while the tensor cores work), dequantize them to the activation
// dtype in shared memory, and eight warps multiply with WMMA 16x16x16 fragments, accumulating in
// fp32. K is split across blocks when the output tiles alone do not fill the GPU; the last block of
// a tile to finish adds the splits in a fixed order, as in the GEMV.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "linear_gemv.cuh"

namespace linquant::cuda {

constexpr int kMmaBN = 128, kMmaBK = 64, kMmaWarps = 8;
constexpr int kMmaPad = 8;  // keeps WMMA's 16-byte-aligned rows off a single bank group
constexpr int kMmaChunk = 32;  // weight values one thread dequantizes per K step

// The device type of a storage type, for WMMA and the hardware conversions.
template <typename T>
struct MmaType;
template <>
struct MmaType<core::half_t> {
  using type = __half;
  __device__ __forceinline__ static type from(float v) { return __float2half_rn(v); }
};
template <>
struct MmaType<core::bf16_t> {
  using type = __nv_bfloat16;
  __device__ __forceinline__ static type from(float v) { return __float2bfloat16_rn(v); }
};

// Whether mma_kernel takes this layout: rows of whole 32-value chunks (aligned), and groups of
// whole chunks so one scale serves a chunk.
inline bool mma_supports(const LinearParams& p, int bits) {
  const int chunk_bytes = kMmaChunk * bits / 8;
  const auto addr = reinterpret_cast<uintptr_t>(p.w);
  return p.row_bytes % chunk_bytes == 0 && addr % std::min(chunk_bytes, 16) == 0 && p.group % kMmaChunk == 0;
}

// Launch geometry of mma_kernel<BITS, BM>: output tiles and K steps.
struct MmaGrid {
  int64_t col_tiles, row_tiles, steps;
};
template <int BM>
MmaGrid mma_grid(const LinearParams& p) {
  return {(p.N + kMmaBN - 1) / kMmaBN, (p.M + BM - 1) / BM, (p.K + kMmaBK - 1) / kMmaBK};
}

// The 16 bits of an fp16 / bf16 value.
template <typename D>
__device__ __forceinline__ uint32_t bits16(D v) {
  uint16_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

// Loads kMmaChunk * BITS / 8 bytes (aligned) of a weight row as 32-bit words.
template <int BITS>
__device__ __forceinline__ void load_mma_chunk(const uint8_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS == 8) {
    const uint4 a = __ldcs(reinterpret_cast<const uint4*>(p)), b = __ldcs(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else if constexpr (BITS == 4) {
    const uint4 a = __ldcs(reinterpret_cast<const uint4*>(p));
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
  } else {
    const uint2 a = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = a.x, w[1] = a.y;
  }
}

// The 32 values of a chunk (BITS words, value i at bits [i * BITS, (i + 1) * BITS) of the chunk's
// little-endian bit stream) dequantized: out[i] = s * (q_i - z), with fz = 2^23 + z. Word d holds
// values [4P d, 4P (d + 1)); its bit plane b holds values 4P d + P i + b for bytes i = 0..3.
template <int BITS>
LQ_HD void dequant_chunk(const uint32_t (&chunk)[BITS], uint32_t flip, float s, float fz, float (&out)[kMmaChunk]) {
  constexpr int P = 8 / BITS;
#pragma unroll
  for (int d = 0; d < BITS; ++d) {
#pragma unroll
    for (int b = 0; b < P; ++b) {
      const uint32_t q4 = bit_plane<BITS>(chunk[d], flip, b);
#pragma unroll
      for (int i = 0; i < 4; ++i) out[d * 4 * P + i * P + b] = s * (magic_byte(q4, i) - fz);
    }
  }
}

template <int BITS, int BM, typename T>
__global__ void __launch_bounds__(kMmaWarps * 32)
    mma_kernel(LinearParams p, const T* __restrict__ x, T* __restrict__ y, float* __restrict__ partial,
               int* __restrict__ tickets, int64_t steps_per_split) {
  namespace wmma = nvcuda::wmma;
  using D = typename MmaType<T>::type;
  constexpr int P = 8 / BITS, LDS = kMmaBK + kMmaPad, MF = BM / 16;
  constexpr int CHUNKS_PER_ROW = kMmaBK / kMmaChunk;  // 2: two threads per weight row
  static_assert(kMmaBN * CHUNKS_PER_ROW == kMmaWarps * 32, "one weight chunk per thread");

  constexpr int LDO = kMmaBN + 4;
  // The operand tiles during the K loop, then the fp32 output tile (under the 48 KB static limit).
  constexpr int OPERAND_BYTES = (BM + kMmaBN) * LDS * static_cast<int>(sizeof(D));
  constexpr int OUT_BYTES = BM * LDO * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[OPERAND_BYTES > OUT_BYTES ? OPERAND_BYTES : OUT_BYTES];
  __shared__ bool last;
  D* const xs = reinterpret_cast<D*>(smem);       // [BM][LDS]
  D* const ws = xs + BM * LDS;                    // [BN][LDS]: B in column-major order
  float* const out = reinterpret_cast<float*>(smem);  // [BM][LDO]

  const int warp = threadIdx.x / 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMmaBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t steps = (p.K + kMmaBK - 1) / kMmaBK;
  const int64_t step0 = blockIdx.z * steps_per_split;
  const int64_t step1 = step0 + steps_per_split < steps ? step0 + steps_per_split : steps;

  // This thread's weight chunk: row n0 + wrow, values [step * BK + wcol, + kMmaChunk).
  const int wrow = threadIdx.x / CHUNKS_PER_ROW, wcol = (threadIdx.x % CHUNKS_PER_ROW) * kMmaChunk;
  const int64_t n = n0 + wrow;
  uint32_t chunk[BITS];
  auto fetch = [&](int64_t step) {
    const int64_t byte = (step * kMmaBK + wcol) / P;
    if (n < p.N && byte < p.row_bytes) {
      load_mma_chunk<BITS>(p.w + n * p.row_bytes + byte, chunk);
    } else {
      for (int i = 0; i < BITS; ++i) chunk[i] = 0;
    }
  };

  // This thread's activations: X_PER values of one row of the step's [BM, BK] tile, zero outside
  // [0, M) x [0, K), converted on the way in.
  constexpr int X_PER = BM * kMmaBK / (kMmaWarps * 32);
  static_assert(X_PER * kMmaWarps * 32 == BM * kMmaBK && kMmaBK % X_PER == 0, "x tile split evenly");
  const int xrow = threadIdx.x * X_PER / kMmaBK, xcol = threadIdx.x * X_PER % kMmaBK;
  const int64_t xm = m0 + xrow;
  D xv[X_PER];
  auto fetch_x = [&](int64_t step) {
#pragma unroll
    for (int i = 0; i < X_PER; ++i) {
      const int64_t k = step * kMmaBK + xcol + i;
      xv[i] = MmaType<T>::from(xm < p.M && k < p.K ? core::to_float(x[xm * p.K + k]) : 0.0f);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[MF];
  for (int f = 0; f < MF; ++f) wmma::fill_fragment(acc[f], 0.0f);
  if (step0 < step1) {
    fetch(step0);
    fetch_x(step0);
  }
  for (int64_t step = step0; step < step1; ++step) {
    // Dequantize this thread's chunk: s * (q - z) in fp32, rounded once to the activation dtype.
    const int64_t k0 = step * kMmaBK + wcol;
    float s = 0.0f, fz = kMagic;
    if (n < p.N && k0 < p.row_bytes * P) {
      const int64_t u = n * p.groups + k0 / p.group;
      s = p.scales[u];
      fz = zero_of(p, u);
    }
    float wv[kMmaChunk];
    dequant_chunk<BITS>(chunk, p.flip, s, fz, wv);
    // 64 contiguous bytes per thread, as four 16-byte stores (rows are 144 bytes apart, so the
    // eight stores of a quarter warp fall on distinct banks).
    uint32_t packed[kMmaChunk / 2];
#pragma unroll
    for (int i = 0; i < kMmaChunk / 2; ++i) {
      const uint32_t lo = bits16(MmaType<T>::from(wv[2 * i])), hi = bits16(MmaType<T>::from(wv[2 * i + 1]));
      packed[i] = lo | (hi << 16);
    }
    uint4* wdst = reinterpret_cast<uint4*>(ws + wrow * LDS + wcol);
#pragma unroll
    for (int i = 0; i < kMmaChunk / 8; ++i) {
      wdst[i] = make_uint4(packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]);
    }
#pragma unroll
    for (int i = 0; i < X_PER; ++i) xs[xrow * LDS + xcol + i] = xv[i];
    __syncthreads();
    if (step + 1 < step1) {  // in flight while the tensor cores work
      fetch(step + 1);
      fetch_x(step + 1);
    }
    // Warp w: output columns [16w, 16w + 16) of the tile, every row fragment.
#pragma unroll
    for (int kk = 0; kk < kMmaBK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, D, wmma::col_major> bf;
      wmma::load_matrix_sync(bf, ws + warp * 16 * LDS + kk, LDS);
#pragma unroll
      for (int f = 0; f < MF; ++f) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, D, wmma::row_major> af;
        wmma::load_matrix_sync(af, xs + f * 16 * LDS + kk, LDS);
        wmma::mma_sync(acc[f], af, bf, acc[f]);
      }
    }
    __syncthreads();
  }

  for (int f = 0; f < MF; ++f) {
    wmma::store_matrix_sync(out + f * 16 * LDO + warp * 16, acc[f], LDO, wmma::mem_row_major);
  }
  __syncthreads();
  const bool split = gridDim.z > 1;
  for (int i = threadIdx.x; i < BM * kMmaBN; i += blockDim.x) {
    const int r = i / kMmaBN, c = i % kMmaBN;
    const int64_t m = m0 + r, col = n0 + c;
    if (m >= p.M || col >= p.N) continue;
    const float v = out[r * LDO + c];
    if (split) {
      partial[(blockIdx.z * p.M + m) * p.N + col] = v;
    } else {
      y[m * p.N + col] = core::from_float<T>(v + p.bias.get_or_zero(col));
    }
  }
  if (!split) return;

  // Split K: the block that finishes its output tile last adds the splits up.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&tickets[blockIdx.y * gridDim.x + blockIdx.x], 1) == static_cast<int>(gridDim.z) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < BM * kMmaBN; i += blockDim.x) {
    const int r = i / kMmaBN, c = i % kMmaBN;
    const int64_t m = m0 + r, col = n0 + c;
    if (m >= p.M || col >= p.N) continue;
    float sum = 0.0f;
    for (unsigned sp = 0; sp < gridDim.z; ++sp) sum += __ldcg(partial + (sp * p.M + m) * p.N + col);
    y[m * p.N + col] = core::from_float<T>(sum + p.bias.get_or_zero(col));
  }
}

}  // namespace linquant::cuda
