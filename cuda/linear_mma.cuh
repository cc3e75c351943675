// Tensor-core CUDA kernel of the weight-only linear op for batches past the GEMV's (fp16 / bf16
// activations): each block owns BN = 128 output features and BM activation rows; per K step of 64
// its threads load the packed weights of the step (one 32-value chunk per thread, the chunks of the
// next steps already in flight in registers), dequantize them to the activation dtype in shared
// memory, and eight warps multiply with WMMA 16x16x16 fragments, accumulating in fp32. K is split
// across blocks when the output tiles alone do not fill the GPU; the last block of a tile to finish
// adds the splits in a fixed order, as in the GEMV.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "linear_gemv.cuh"

namespace linquant::cuda {

constexpr int kMmaBN = 128, kMmaBK = 64, kMmaWarps = 8;
constexpr int kMmaPad = 8;  // keeps WMMA's 16-byte-aligned rows off a single bank group
constexpr int kMmaChunk = 32;  // weight values one thread dequantizes per K step

// K steps of weight chunks a thread keeps in flight, in registers: 64 bytes at 8 and 4 bits (32 at
// 2), so two blocks on a multiprocessor keep 32 KB of loads outstanding. Hiding DRAM latency at full
// bandwidth takes about 3 TB/s x 0.7 us / 132 multiprocessors = 16 KB each; one step in flight (8 KB
// at 4 bits) would cap the kernel near half the bandwidth.
template <int BITS>
constexpr int mma_depth() {
  return BITS == 8 ? 2 : 4;
}

// The device type of a storage type, for WMMA and the hardware conversions.
template <typename T>
struct MmaType;
// `magic` is the 16-bit pattern of the float whose low mantissa byte counts from 0 in steps of 1
// (1024 in fp16, 128 in bf16): (magic | q) is the exact float magic + q while q < max_q. `kind` is
// the FloatArray kind of scales stored in this dtype.
template <>
struct MmaType<core::half_t> {
  using type = __half;
  static constexpr uint32_t magic = 0x6400, max_q = 1024;
  static constexpr float magic_value = 1024.0f;
  static constexpr FloatArray::Kind kind = FloatArray::kF16;
  __device__ __forceinline__ static type from(float v) { return __float2half_rn(v); }
};
template <>
struct MmaType<core::bf16_t> {
  using type = __nv_bfloat16;
  static constexpr uint32_t magic = 0x4300, max_q = 128;
  static constexpr float magic_value = 128.0f;
  static constexpr FloatArray::Kind kind = FloatArray::kBF16;
  __device__ __forceinline__ static type from(float v) { return __float2bfloat16_rn(v); }
};

// a - b (MUL false) or a * b (MUL true) on both 16-bit floats of the words, rounded to nearest
// even, as the paired fp16 / bf16 instruction does (on the host: in fp32, exact for a product of
// two 16-bit floats and for their difference, then rounded once).
template <typename T, bool MUL>
LQ_HD uint32_t paired(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  using D2 = std::conditional_t<std::is_same_v<T, core::half_t>, __half2, __nv_bfloat162>;
  D2 va, vb;
  memcpy(&va, &a, 4);
  memcpy(&vb, &b, 4);
  const D2 r = MUL ? __hmul2(va, vb) : __hsub2(va, vb);
  uint32_t out;
  memcpy(&out, &r, 4);
  return out;
#else
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const auto half = [&](uint32_t w) { return core::to_float(T{static_cast<uint16_t>(w >> (16 * h))}); };
    out |= static_cast<uint32_t>(core::from_float<T>(MUL ? half(a) * half(b) : half(a) - half(b)).bits) << (16 * h);
  }
  return out;
#endif
}

template <typename T>
LQ_HD uint32_t sub2(uint32_t a, uint32_t b) {
  return paired<T, false>(a, b);
}

// (a - b) * s, each operation rounded.
template <typename T>
LQ_HD uint32_t sub_mul2(uint32_t a, uint32_t b, uint32_t s) {
  return paired<T, true>(paired<T, false>(a, b), s);
}

// dequant_chunk's 32 values rounded to T, as 16 words of consecutive pairs, computed with paired
// 16-bit arithmetic: each pair of values is gathered into the low mantissa bytes of two `magic`
// floats (a byte permute and a mask), minus magic + z, times s, exactly. Without SCALED, the
// integers q - z (exact under the same conditions), which a kernel scales after multiplying. Exact, hence equal to
// rounding dequant_chunk's fp32 values, when s is stored in T (its product with q - z then needs
// at most 22 bits, so rounding it once to T is the same as rounding it to fp32 first), magic + q
// and magic + z are exact in T (q < max_q, |z| <= magic) and q - z is too (it is an integer
// within 2 * magic). Callers check s and z; the other conditions hold for every format with q <
// max_q, i.e. all but 8-bit weights with bf16 activations.
template <int BITS, typename T, bool SCALED = true>
LQ_HD void dequant_chunk_pairs(const uint32_t (&chunk)[BITS], uint32_t flip, uint32_t s_bits, int32_t z,
                               uint32_t (&pairs)[kMmaChunk / 2]) {
  constexpr int P = 8 / BITS;
  constexpr uint32_t magic2 = MmaType<T>::magic * 0x10001u;
  const uint32_t fz2 = core::from_float<T>(MmaType<T>::magic_value + static_cast<float>(z)).bits * 0x10001u;
  const uint32_t s2 = s_bits * 0x10001u;
  const auto finish = [&](uint32_t v) { return SCALED ? sub_mul2<T>(v, fz2, s2) : sub2<T>(v, fz2); };
#pragma unroll
  for (int d = 0; d < BITS; ++d) {
    if constexpr (P == 1) {  // bytes 0..3 of the word are values 4d..4d+3: each next to a magic byte
      constexpr uint32_t magic_bytes = (MmaType<T>::magic >> 8) * 0x01010101u;
      const uint32_t q4 = bit_plane<BITS>(chunk[d], flip, 0);
      pairs[2 * d] = finish(byte_perm(q4, magic_bytes, 0x4140));
      pairs[2 * d + 1] = finish(byte_perm(q4, magic_bytes, 0x4342));
    } else {
      // Planes b and b + 1 hold the two values of pair (P i + b, P i + b + 1) of the word, in
      // their byte i: gathered into bytes 0 and 2, masked, given the magic's exponent.
#pragma unroll
      for (int b = 0; b < P; b += 2) {
        const uint32_t even = bit_plane<BITS>(chunk[d], flip, b), odd = bit_plane<BITS>(chunk[d], flip, b + 1);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t gathered = byte_perm(even, odd, static_cast<uint32_t>(i) | ((4u + i) << 8));
          pairs[(d * 4 * P + i * P + b) / 2] = finish((gathered & 0x00FF00FFu) | magic2);
        }
      }
    }
  }
}

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
// Column tiles go on gridDim.y, at most 65535 of them: the most output features one launch can
// take (more go to the dequantize + cuBLAS path). Row tiles go on x, which has no such limit.
constexpr int64_t kMmaMaxCols = int64_t{65535} * kMmaBN;
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

// A weight load: evict-first (streaming) when nothing reads these bytes again (STREAM), else
// cached so another block's read of them can come from L2. A compile-time choice: a run-time one
// keeps both loads in the unrolled ring and costs registers.
template <bool STREAM, typename V>
__device__ __forceinline__ V load_weights(const V* p) {
  if constexpr (STREAM) {
    return __ldcs(p);
  } else {
    return __ldg(p);
  }
}

// Loads kMmaChunk * BITS / 8 bytes (aligned) of a weight row as 32-bit words.
template <int BITS, bool STREAM>
__device__ __forceinline__ void load_mma_chunk(const uint8_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS == 8) {
    const uint4 a = load_weights<STREAM>(reinterpret_cast<const uint4*>(p));
    const uint4 b = load_weights<STREAM>(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else if constexpr (BITS == 4) {
    const uint4 a = load_weights<STREAM>(reinterpret_cast<const uint4*>(p));
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
  } else {
    const uint2 a = load_weights<STREAM>(reinterpret_cast<const uint2*>(p));
    w[0] = a.x, w[1] = a.y;
  }
}

// The 32 values of a chunk (BITS words, value i at bits [i * BITS, (i + 1) * BITS) of the chunk's
// little-endian bit stream) dequantized: out[i] = s * (q_i - z), exactly as core::dequantize_value
// gives it. Word d holds values [4P d, 4P (d + 1)); its bit plane b holds values 4P d + P i + b for
// bytes i = 0..3. For |z| <= 2^23, (2^23 + q) - (2^23 + z) is q - z exactly (one subtract a value);
// a zero point past that (only ever passed by hand: choose_qparams keeps them within) would round
// 2^23 + z, so those chunks take q - z in integers, converted once, as the CPU does.
template <int BITS>
LQ_HD void dequant_chunk(const uint32_t (&chunk)[BITS], uint32_t flip, float s, int32_t z, float (&out)[kMmaChunk]) {
  constexpr int P = 8 / BITS;
  // Every value through value(q4, i), byte i of bit plane q4, with the formula chosen once per
  // chunk: outside the unrolled loops, each copy of them holds one formula, not both and a select
  // per value.
  const auto fill = [&](auto value) {
#pragma unroll
    for (int d = 0; d < BITS; ++d) {
#pragma unroll
      for (int b = 0; b < P; ++b) {
        const uint32_t q4 = bit_plane<BITS>(chunk[d], flip, b);
#pragma unroll
        for (int i = 0; i < 4; ++i) out[d * 4 * P + i * P + b] = value(q4, i);
      }
    }
  };
  if (z >= -static_cast<int32_t>(kMagic) && z <= static_cast<int32_t>(kMagic)) {
    const float fz = kMagic + static_cast<float>(z);
    fill([&](uint32_t q4, int i) { return s * (magic_byte(q4, i) - fz); });
  } else {
    fill([&](uint32_t q4, int i) { return core::dequantize_value(static_cast<int32_t>(q4 >> (8 * i) & 0xFFu), s, z); });
  }
}

// A 32-value chunk of a weight row as the kernels carry it between load and use: its packed
// words, its scale's stored bits and its zero point.
template <int BITS>
struct WeightChunk {
  uint32_t w[BITS];
  uint32_t scale;
  int32_t z;
};

// Loads the chunk of row n starting at value k0 (a multiple of kMmaChunk, in a layout
// mma_supports takes); past the last row or the row's end a chunk of scale 0, which dequantizes
// to zeros. STREAM: no other block reads this chunk (see load_weights).
template <int BITS, bool STREAM>
__device__ __forceinline__ void fetch_chunk(const LinearParams& p, int64_t n, int64_t k0, WeightChunk<BITS>& c) {
  constexpr int P = 8 / BITS;
  if (n < p.N && k0 / P < p.row_bytes) {
    load_mma_chunk<BITS, STREAM>(p.w + n * p.row_bytes + k0 / P, c.w);
    const int64_t u = n * p.groups + p.group_of(k0);
    c.scale = p.scales.raw(u);
    c.z = p.zeros != nullptr ? p.zeros[u] : p.zero_const;
  } else {
    for (int i = 0; i < BITS; ++i) c.w[i] = 0;
    c.scale = 0;  // +0.0 in every scale dtype
    c.z = 0;
  }
}

// Whether dequant_chunk_pairs is exact for every chunk of this weight but those whose zero point
// is out of range: T 16-bit, scales stored in T, and every value within T's magic (not 8-bit
// weights in bf16).
template <int BITS, typename T>
LQ_HD bool pairs_exact_for(const LinearParams& p) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    return p.scales.kind == MmaType<T>::kind && (1u << BITS) <= MmaType<T>::max_q;
  }
}

// The chunk's s * (q - z) rounded once to T (fp16 / bf16), as 16 words of consecutive pairs: with
// paired 16-bit arithmetic where that is exact (`pairs_exact` and the zero point in range), else in
// fp32. Either way the values linquant::dequantize gives. Without SCALED, q - z rounded once to T
// the same way (exact unless a zero point lies far outside the q range).
template <int BITS, typename T, bool SCALED = true>
__device__ __forceinline__ void dequant_chunk_to(const LinearParams& p, const WeightChunk<BITS>& c, bool pairs_exact,
                                                 uint32_t (&packed)[kMmaChunk / 2]) {
  const float limit = MmaType<T>::magic_value;
  if (pairs_exact && static_cast<float>(c.z) >= -limit && static_cast<float>(c.z) <= limit) {
    dequant_chunk_pairs<BITS, T, SCALED>(c.w, p.flip, c.scale, c.z, packed);
    return;
  }
  float wv[kMmaChunk];
  dequant_chunk<BITS>(c.w, p.flip, SCALED ? p.scales.value_of(c.scale) : 1.0f, c.z, wv);
#pragma unroll
  for (int i = 0; i < kMmaChunk / 2; ++i) {
    packed[i] = bits16(MmaType<T>::from(wv[2 * i])) | (bits16(MmaType<T>::from(wv[2 * i + 1])) << 16);
  }
}

// The values [valid, kMmaChunk) of a chunk's 16-bit pairs set to +0: the row's padding past K.
// Zero padding dequantizes to s (0 - z), which for symmetric weights near fp16's limit is -inf
// (-2s at 2 bits, where the largest weight is s), and inf times the zero activation there is NaN.
LQ_HD void zero_past(uint32_t (&pairs)[kMmaChunk / 2], int64_t valid) {
#pragma unroll
  for (int i = 0; i < kMmaChunk / 2; ++i) pairs[i] &= 2 * i >= valid ? 0u : 2 * i + 1 >= valid ? 0xFFFFu : ~0u;
}

template <int BITS, int BM, typename T>
__global__ void __launch_bounds__(kMmaWarps * 32)
    mma_kernel(LinearParams p, const T* __restrict__ x, T* __restrict__ y, float* __restrict__ partial,
               int* __restrict__ tickets, int64_t steps_per_split) {
  namespace wmma = nvcuda::wmma;
  using D = typename MmaType<T>::type;
  constexpr int LDS = kMmaBK + kMmaPad, MF = BM / 16, DEPTH = mma_depth<BITS>();
  constexpr int CHUNKS_PER_ROW = kMmaBK / kMmaChunk;  // 2: two threads per weight row
  static_assert(kMmaBN * CHUNKS_PER_ROW == kMmaWarps * 32, "one weight chunk per thread");

  constexpr int LDO = kMmaBN + 4;
  // The operand tiles during the K loop, then the fp32 output tile (under the 48 KB static limit).
  constexpr int OPERAND_BYTES = (BM + kMmaBN) * LDS * static_cast<int>(sizeof(D));
  constexpr int OUT_BYTES = BM * LDO * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[OPERAND_BYTES > OUT_BYTES ? OPERAND_BYTES : OUT_BYTES];
  D* const xs = reinterpret_cast<D*>(smem);       // [BM][LDS]
  D* const ws = xs + BM * LDS;                    // [BN][LDS]: B in column-major order
  float* const out = reinterpret_cast<float*>(smem);  // [BM][LDO]

  const int warp = threadIdx.x / 32;
  // Row tiles on x: the blocks that share a weight column tile have adjacent indices, so they run
  // at the same time and all but the first read each weight chunk from L2, not DRAM (the weight
  // loads are therefore cached, not evict-first as in the kernels that read each byte once).
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kMmaBN;
  const int64_t steps = (p.K + kMmaBK - 1) / kMmaBK;
  const int64_t step0 = blockIdx.z * steps_per_split;
  const int64_t step1 = step0 + steps_per_split < steps ? step0 + steps_per_split : steps;

  // This thread's weight chunk: row n0 + wrow, values [step * BK + wcol, + kMmaChunk).
  const int wrow = threadIdx.x / CHUNKS_PER_ROW, wcol = (threadIdx.x % CHUNKS_PER_ROW) * kMmaChunk;
  const int64_t n = n0 + wrow;

  // This thread's activations: X_PER values of one row of the step's [BM, BK] tile, zero outside
  // [0, M) x [0, K).
  constexpr int X_PER = BM * kMmaBK / (kMmaWarps * 32);
  static_assert(X_PER * kMmaWarps * 32 == BM * kMmaBK && kMmaBK % X_PER == 0, "x tile split evenly");
  const int xrow = threadIdx.x * X_PER / kMmaBK, xcol = threadIdx.x * X_PER % kMmaBK;
  const int64_t xm = m0 + xrow;
  uint16_t xv[X_PER];  // T's bits as they are: the storage type and the WMMA type are the same format
  auto fetch_x = [&](int64_t step) {
#pragma unroll
    for (int i = 0; i < X_PER; ++i) {
      const int64_t k = step * kMmaBK + xcol + i;
      xv[i] = xm < p.M && k < p.K ? x[xm * p.K + k].bits : uint16_t{0};  // 0: +0.0 in fp16 and bf16
    }
  };

  const bool pairs_exact = pairs_exact_for<BITS, T>(p);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[MF];
  for (int f = 0; f < MF; ++f) wmma::fill_fragment(acc[f], 0.0f);

  // One K step: dequantize this thread's chunk, s * (q - z) rounded once to the activation dtype,
  // with paired 16-bit arithmetic where that is exact (dequant_chunk_pairs), else in fp32; stage
  // it and the activations in shared memory; issue the loads of later steps; multiply.
  auto run_step = [&](int64_t step, WeightChunk<BITS>& c) {
    uint32_t packed[kMmaChunk / 2];
    dequant_chunk_to<BITS, T>(p, c, pairs_exact, packed);
    const int64_t k0 = step * kMmaBK + wcol;
    if (k0 + kMmaChunk > p.K) zero_past(packed, p.K - k0);  // the row's last chunk, when K ends inside it
    // 64 contiguous bytes per thread, as four 16-byte stores (rows are 144 bytes apart, so the
    // eight stores of a quarter warp fall on distinct banks).
    uint4* wdst = reinterpret_cast<uint4*>(ws + wrow * LDS + wcol);
#pragma unroll
    for (int i = 0; i < kMmaChunk / 8; ++i) {
      wdst[i] = make_uint4(packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]);
    }
#pragma unroll
    for (int i = 0; i < X_PER; ++i) reinterpret_cast<uint16_t*>(xs)[xrow * LDS + xcol + i] = xv[i];
    __syncthreads();
    // In flight while the tensor cores work: the chunk DEPTH steps on (into the registers just
    // consumed) and the next step's activations.
    if (step + DEPTH < step1) fetch_chunk<BITS, false>(p, n, (step + DEPTH) * kMmaBK + wcol, c);
    if (step + 1 < step1) fetch_x(step + 1);
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
  };

  // The chunks of DEPTH steps in flight, in a ring of registers indexed by step % DEPTH: the loop
  // is unrolled DEPTH times so every index is a constant (moving a register whose load is still
  // in flight would wait for it).
  WeightChunk<BITS> chunks[DEPTH];
#pragma unroll
  for (int j = 0; j < DEPTH; ++j) {
    if (step0 + j < step1) fetch_chunk<BITS, false>(p, n, (step0 + j) * kMmaBK + wcol, chunks[j]);
  }
  if (step0 < step1) fetch_x(step0);
  for (int64_t base = step0; base < step1; base += DEPTH) {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j) {
      if (base + j < step1) run_step(base + j, chunks[j]);  // the same for every thread of the block
    }
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
  if (split) {
    finish_split_k(p, BITS, x, y, partial, &tickets[blockIdx.y * gridDim.x + blockIdx.x], gridDim.z, n0, kMmaBN,
                   m0, BM);
  }
}

}  // namespace linquant::cuda
