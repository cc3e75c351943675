// Small-batch CUDA kernels of the weight-only linear op: y[m, n] = sum_k x[m, k] * s * (q - z) for
// up to 8 activation rows, reading each weight byte from memory once.
//
// gemv_kernel (the fast path): each lane of a warp streams VEC-byte chunks of R weight rows with
// wide loads; the activations of the block's K slice sit in shared memory as fp32, arranged so that
// lane L reads the four x values matching four weight bytes of its chunk as one float4, with
// consecutive lanes reading consecutive float4s (no bank conflicts). A weight byte becomes the
// exact float 2^23 + q by placing it in a float's mantissa (one byte permute), and subtracting
// 2^23 + z gives q - z exactly; products accumulate in fp32 per chunk and are scaled once per chunk
// (a chunk never crosses a group). Blocks split K when there are too few rows to fill the GPU and
// the last block of a row block to finish adds the splits up in a fixed order (deterministic).
//
// gemv_generic_kernel handles every other weight layout (odd group sizes, rows not a multiple of
// 4 bytes, unaligned storage): one warp per weight row, one value per lane at a time.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../csrc/core/float_convert.h"
#include "../csrc/core/quant_math.h"

namespace linquant::cuda {

namespace core = linquant::core;

// fp32, fp16 or bf16 values read as fp32: scales and bias stay in the model's dtype, since
// converting them on every call would cost a kernel launch, as much as a batch-1 GEMV itself.
struct FloatArray {
  enum Kind : int { kF32, kF16, kBF16 };
  const void* data = nullptr;
  Kind kind = kF32;

  LQ_HD float operator[](int64_t i) const { return value_of(raw(i)); }
  LQ_HD float get_or_zero(int64_t i) const { return data != nullptr ? (*this)[i] : 0.0f; }
  // The stored bits of element i (32 of an fp32, 16 of an fp16 / bf16), which kernels load ahead
  // of use, and the value of such bits.
  LQ_HD uint32_t raw(int64_t i) const {
    return kind == kF32 ? static_cast<const uint32_t*>(data)[i] : static_cast<const uint16_t*>(data)[i];
  }
  LQ_HD float value_of(uint32_t bits) const {
    if (kind == kF16) return core::to_float(core::half_t{static_cast<uint16_t>(bits)});
    if (kind == kBF16) return core::to_float(core::bf16_t{static_cast<uint16_t>(bits)});
    return core::f32_from_bits(bits);
  }
};

struct LinearParams {
  const uint8_t* w = nullptr;  // [N, row_bytes]
  int64_t row_bytes = 0;
  FloatArray scales;               // [N, groups]
  const int32_t* zeros = nullptr;  // [N, groups] or nullptr: every zero point is zero_const
  int32_t zero_const = 0;
  // XORed into every weight byte: 0x80 turns int8 (8-bit symmetric) into uint8 with zero point 128.
  uint32_t flip = 0;
  FloatArray bias;              // [N], or no data
  int64_t M = 0, N = 0, K = 0, group = 0, groups = 0;
  int group_shift = -1;  // log2(group) when that is whole (or 62 for one group per row), else -1

  // The group of value k of a row: a shift for every usual group size, since the kernels ask
  // once per chunk and a 64-bit division costs tens of instructions.
  LQ_HD int64_t group_of(int64_t k) const { return group_shift >= 0 ? k >> group_shift : k / group; }
};

// Sets the group size and count (and the shift group_of uses).
inline void set_groups(LinearParams& p, int64_t group, int64_t groups) {
  p.group = group;
  p.groups = groups;
  p.group_shift = -1;
  if (groups == 1) {
    p.group_shift = 62;  // every value of a row is in group 0
  } else if (group > 0 && (group & (group - 1)) == 0) {
    p.group_shift = 0;
    while ((int64_t{1} << p.group_shift) < group) ++p.group_shift;
  }
}

// How the format stores zero points: asymmetric weights carry them (`zeros`); symmetric sub-byte
// weights are stored offset by 2^(bits-1); int8 symmetric weights are signed, read as unsigned after
// flipping the sign bit, which makes their zero point 128.
inline void set_zero_points(LinearParams& p, int bits, const int32_t* zeros) {
  const bool signed8 = bits == 8 && zeros == nullptr;
  p.zeros = zeros;
  p.zero_const = signed8 ? 128 : (zeros == nullptr ? 1 << (bits - 1) : 0);
  p.flip = signed8 ? 0x80808080u : 0u;
}

constexpr int kGemvWarps = 8;
constexpr int kGemvMaxRows = 8;  // activation rows the GEMV kernels take
constexpr int kGemvSharedBytes = 32 * 1024;
constexpr float kMagic = 8388608.0f;  // 2^23: a float whose mantissa's low byte is an integer

// Weight (n, k) dequantized, s * (q - z) exactly as linquant::dequantize: the reference path for
// layouts the fast kernels do not stream, and for the cuBLAS path's dense weight.
LQ_HD float weight_at(const LinearParams& p, int bits, int64_t n, int64_t k) {
  const int per_byte = 8 / bits;
  const uint32_t byte = p.w[n * p.row_bytes + k / per_byte] ^ (p.flip & 0xFFu);
  const int32_t q = static_cast<int32_t>((byte >> ((k % per_byte) * bits)) & ((1u << bits) - 1));
  const int64_t u = n * p.groups + p.group_of(k);
  return core::dequantize_value(q, p.scales[u], p.zeros != nullptr ? p.zeros[u] : p.zero_const);
}

// Loads VEC bytes (aligned) of a weight row as 32-bit words, streaming (evict first).
template <int VEC>
__device__ __forceinline__ void load_chunk(const uint8_t* p, uint32_t (&w)[VEC / 4]) {
  if constexpr (VEC == 16) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (VEC == 8) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = __ldcs(reinterpret_cast<const unsigned*>(p));
  }
}

// Layout of one K slice of activations in shared memory. A lane's chunk of V = VEC * 8 / BITS
// values is W = VEC / 4 words; word d, bit plane b (values sharing a shift: b = value % (8 / BITS))
// is the float4 holding the x of the plane's four bytes, at float4 index (it * V/4 + d * P + b) * 32
// + lane for warp iteration `it`.
template <int BITS, int VEC>
struct SliceLayout {
  static constexpr int P = 8 / BITS;       // values per byte (bit planes per word)
  static constexpr int V = VEC * P;        // values per lane chunk
  static constexpr int WARP_VALUES = 32 * V;
  static constexpr int WARP_BYTES = 32 * VEC;

  // Position (in floats) of slice value v.
  LQ_HD static int position(int v) {
    const int it = v / WARP_VALUES, rem = v % WARP_VALUES;
    const int lane = rem / V, j = rem % V;
    const int word = j / (4 * P), in_word = j % (4 * P);
    const int byte = in_word / P, plane = in_word % P;
    return ((it * (V / 4) + word * P + plane) * 32 + lane) * 4 + byte;
  }

  // The float4 of x for word d, plane b of `lane`'s chunk in warp iteration `it`.
  LQ_HD static int float4_index(int it, int d, int b, int lane) { return (it * (V / 4) + d * P + b) * 32 + lane; }
};

// prmt: byte k of the result is byte ((s >> 4k) & 7) of the eight bytes {y:x} (x is bytes 0-3).
// Selectors here never set a nibble's top bit (sign replication).
LQ_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t both = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<uint32_t>((both >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k);
  return r;
#endif
}

// 2^23 + (byte i of q4) as a float: the byte placed in the low mantissa bits of 2^23.
LQ_HD float magic_byte(uint32_t q4, int i) { return core::f32_from_bits(byte_perm(q4, 0x4B000000u, 0x7440 + i)); }

// Bit plane b of a weight word: byte i of the result is the value stored in byte i at shift
// b * BITS (int8 weights first XORed with `flip`, which is 0 at other widths: set_zero_points).
template <int BITS>
LQ_HD uint32_t bit_plane(uint32_t word, uint32_t flip, int b) {
  constexpr uint32_t MASK = BITS == 8 ? 0xFFFFFFFFu : 0x01010101u * ((1u << BITS) - 1);
  return ((BITS == 8 ? word ^ flip : word) >> (b * BITS)) & MASK;
}

LQ_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// The heart of gemv_kernel, for one lane and one chunk per weight row: t[r][m] += sum over the
// chunk's values of x[m, k] * (q[r, k] - z[r]), with fz[r] = 2^23 + z[r]. `words` holds the chunk of
// each of the R rows; `xs4` is the slice's shared-memory activations of one row of x, the next row
// sv4 float4s further.
template <int BITS, int VEC, int MT, int R>
LQ_HD void chunk_products(const float4* xs4, int sv4, int it, int lane, const uint32_t (&words)[R][VEC / 4],
                          uint32_t flip, const float (&fz)[R], float (&t)[R][MT]) {
  using L = SliceLayout<BITS, VEC>;
#pragma unroll
  for (int d = 0; d < VEC / 4; ++d) {
#pragma unroll
    for (int b = 0; b < L::P; ++b) {
      float4 xv[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) xv[m] = xs4[m * sv4 + L::float4_index(it, d, b, lane)];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t q4 = bit_plane<BITS>(words[r][d], flip, b);  // four values, one per byte
        const float q0 = magic_byte(q4, 0) - fz[r], q1 = magic_byte(q4, 1) - fz[r];
        const float q2 = magic_byte(q4, 2) - fz[r], q3 = magic_byte(q4, 3) - fz[r];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          t[r][m] = fma_rn(xv[m].x, q0, t[r][m]);
          t[r][m] = fma_rn(xv[m].y, q1, t[r][m]);
          t[r][m] = fma_rn(xv[m].z, q2, t[r][m]);
          t[r][m] = fma_rn(xv[m].w, q3, t[r][m]);
        }
      }
    }
  }
}

// K split over blocks: `tiles` blocks of output, `steps` units of K (GEMV warp steps, MMA K steps)
// shared out so that there are about `per_sm` blocks per multiprocessor (as many as fit at once:
// two for the GEMV and the MMA kernel), each split walking
// `per_split` consecutive steps (every split gets at least one). The split count is the nearest
// to that aim, not the next above it: 256 row blocks of a 8192-row layer on 132 SMs run as one
// round without a reduction, rather than as 512 blocks in two rounds plus the reduction.
struct SplitK {
  int64_t splits = 1;
  int64_t per_split = 0;
};

inline SplitK split_k(int64_t tiles, int64_t steps, int multiprocessors, int per_sm = 2) {
  SplitK k;
  const int64_t want = static_cast<int64_t>(per_sm) * multiprocessors;
  k.splits = std::min<int64_t>(std::max<int64_t>((want + tiles / 2) / tiles, 1), std::max<int64_t>(steps, 1));
  k.per_split = (steps + k.splits - 1) / k.splits;
  k.splits = k.per_split > 0 ? (steps + k.per_split - 1) / k.per_split : 1;
  return k;
}

// Output y[m, n] made finite where the kernel's sum came out inf or NaN: summed again value by value
// over the dequantized weights, plus the bias. The register kernels sum (q - z) x over a chunk or
// step before scaling it, so activations near float's limit (|x| ~ 1e36, bf16 or fp32) overflow
// there where x @ W_hat.T does not (the CPU kernels fall back the same way). Such outputs are rare:
// a thread that stored one calls this for its outputs after storing them (reading y back, in a
// loop that is not unrolled, so the kernel holds one copy of this code; inlined, since a call
// would reserve registers for its ABI in the whole kernel), with no check on the host.
template <typename T>
__device__ __forceinline__ void recompute_if_non_finite(const LinearParams& p, int bits, const T* x, T* y, int64_t m,
                                                        int64_t n) {
  if (!core::is_nonfinite(core::to_float(y[m * p.N + n]))) return;
  float sum = 0.0f;
  for (int64_t k = 0; k < p.K; ++k) sum = fma_rn(core::to_float(x[m * p.K + k]), weight_at(p, bits, n, k), sum);
  y[m * p.N + n] = core::from_float<T>(sum + p.bias.get_or_zero(n));
}

// Split K, once every block has written its fp32 partial sums [split, M, N]: the block that takes
// its tile's last ticket adds the splits up in split order (so results are deterministic), adds
// the bias, writes y for weight rows [n0, n0 + n_rows) x activation rows [m0, m0 + m_rows)
// (recompute_if_non_finite), and sets the ticket back to 0 for the next launch (every other split
// has taken its ticket by then).
template <typename T>
__device__ void finish_split_k(const LinearParams& p, int bits, const T* __restrict__ x, T* __restrict__ y,
                               const float* __restrict__ partial, int* ticket, unsigned splits, int64_t n0, int n_rows,
                               int64_t m0, int m_rows) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1) == static_cast<int>(splits) - 1;
  __syncthreads();
  if (!last) return;
  if (threadIdx.x == 0) *ticket = 0;
  __threadfence();
  for (int i = threadIdx.x; i < n_rows * m_rows; i += blockDim.x) {
    const int64_t n = n0 + i % n_rows, m = m0 + i / n_rows;  // consecutive threads, consecutive n
    if (n >= p.N || m >= p.M) continue;
    float sum = 0.0f;
    for (unsigned sp = 0; sp < splits; ++sp) sum += __ldcg(partial + (sp * p.M + m) * p.N + n);
    y[m * p.N + n] = core::from_float<T>(sum + p.bias.get_or_zero(n));
    recompute_if_non_finite(p, bits, x, y, m, n);
  }
}

// Widest chunk (16, 8 or 4 bytes) gemv_kernel can stream for this layout, or 0 (then the generic
// kernel runs): rows and groups must be whole chunks (so a chunk never crosses a group) and the
// rows aligned to it. 2-bit chunks stop at 8 bytes so that a lane's 32 values fit the
// shared-memory layout of the other widths.
inline int gemv_chunk_bytes(const LinearParams& p, int bits) {
  // gemv_kernel's offsets within a warp's rows are 32-bit: R rows of bytes, of groups and of
  // values (bytes * 8 / bits) must stay under 2^31.
  if (p.row_bytes > (int64_t{1} << 27) || p.groups > (int64_t{1} << 28)) return 0;
  const int widest = bits == 2 ? 8 : 16;
  const int64_t group_bytes = p.group * bits / 8;
  const auto addr = reinterpret_cast<uintptr_t>(p.w);
  for (int vec = widest; vec >= 4; vec /= 2) {
    if (p.row_bytes % vec == 0 && group_bytes % vec == 0 && addr % vec == 0) return vec;
  }
  return 0;
}

template <int MT>
constexpr int gemv_slice_iters(int V) {
  // Warp iterations per slice: MT rows of the slice fill the shared-memory budget.
  return kGemvSharedBytes / (MT * 32 * V * 4) > 0 ? kGemvSharedBytes / (MT * 32 * V * 4) : 1;
}

template <int MT>
constexpr int gemv_rows_per_warp() {
  return MT <= 2 ? 4 : 2;
}

// Launch geometry of gemv_kernel<BITS, VEC, MT>: blocks of kGemvWarps * R weight rows; K in warp
// steps of WARP_BYTES bytes per row (what one warp reads in one go), which the K splits share out.
// A block stages the activations of up to ITERS steps at a time (a slice of SLICE_VALUES).
template <int BITS, int VEC, int MT>
struct GemvGrid {
  static constexpr int R = gemv_rows_per_warp<MT>();
  static constexpr int ITERS = gemv_slice_iters<MT>(SliceLayout<BITS, VEC>::V);
  static constexpr int SLICE_VALUES = ITERS * SliceLayout<BITS, VEC>::WARP_VALUES;
  static int64_t row_blocks(int64_t n) { return (n + kGemvWarps * R - 1) / (kGemvWarps * R); }
  static int64_t steps(int64_t row_bytes) {
    return (row_bytes + SliceLayout<BITS, VEC>::WARP_BYTES - 1) / SliceLayout<BITS, VEC>::WARP_BYTES;
  }
};

// Activations of `iters` warp steps from step `base` (rows [0, MT), zero past M and K) as fp32 in
// the slice layout. Each thread issues LOADS loads before it uses any, so it waits for one L2
// round trip per LOADS values rather than one per value.
template <int BITS, int VEC, int MT, typename T>
__device__ __forceinline__ void stage_activations(const LinearParams& p, const T* __restrict__ x, int64_t base,
                                                  int iters, float* xs) {
  using L = SliceLayout<BITS, VEC>;
  constexpr int SV = GemvGrid<BITS, VEC, MT>::SLICE_VALUES;
  constexpr int LOADS = 8;
  const int values = iters * L::WARP_VALUES;  // of each row: only the steps this slice walks
  const int64_t k0 = base * L::WARP_VALUES;
#pragma unroll 1
  for (int m = 0; m < MT; ++m) {
    for (int j0 = threadIdx.x; j0 < values; j0 += LOADS * blockDim.x) {
      T v[LOADS];
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {
        const int j = j0 + u * static_cast<int>(blockDim.x);
        v[u] = m < p.M && j < values && k0 + j < p.K ? x[m * p.K + k0 + j] : T{};  // T{}: +0.0
      }
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {
        const int j = j0 + u * static_cast<int>(blockDim.x);
        if (j < values) xs[m * SV + L::position(j)] = core::to_float(v[u]);
      }
    }
  }
}

// A chunk's scale as stored and its zero point: loaded with the chunk, converted only when the
// chunk is used, so that the loads stay in flight over the previous chunk's arithmetic.
struct ChunkParams {
  uint32_t scale;
  int32_t z;
};

// Two blocks per multiprocessor, as split_k plans for: up to 128 registers a thread (ptxas 13.0
// then spills 80 bytes in one variant, 2-bit with 8 activation rows and fp16; more registers would
// halve the blocks).
template <int BITS, int VEC, int MT, typename T>
__global__ void __launch_bounds__(kGemvWarps * 32, 2)
    gemv_kernel(LinearParams p, const T* __restrict__ x, T* __restrict__ y, float* __restrict__ partial,
                int* __restrict__ tickets, int64_t steps, int64_t steps_per_split) {
  using L = SliceLayout<BITS, VEC>;
  using G = GemvGrid<BITS, VEC, MT>;
  constexpr int P = L::P, R = G::R, ITERS = G::ITERS, SV = G::SLICE_VALUES;
  static_assert(MT * SV * 4 <= kGemvSharedBytes, "the slice fits the shared-memory budget");
  __shared__ float4 xs4[kGemvSharedBytes / 16];  // [MT][SV / 4]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * R;
  const int64_t split = blockIdx.y;
  const int64_t s_begin = split * steps_per_split;
  const int64_t s_end = s_begin + steps_per_split < steps ? s_begin + steps_per_split : steps;

  // The warp's rows are first_row + min(r, last_r): in the last row block, rows past N would be
  // shifted back over the previous warp's rows (first_row <= row0), and where N < R the rows past
  // it repeat row N - 1. Either way every load is in bounds with no check per chunk, and only rows
  // [row0, N) are written. Kept as a 64-bit base and small ints so that the per-row offsets are
  // one multiply-add each.
  const int64_t shifted = row0 < p.N - R ? row0 : p.N - R;
  const int64_t first_row = shifted > 0 ? shifted : 0;
  const int last_r = static_cast<int>(p.N - 1 - first_row < R - 1 ? p.N - 1 - first_row : R - 1);
  const uint8_t* const w_base = p.w + first_row * p.row_bytes;
  const int64_t u_base = first_row * p.groups;
  // Offsets within R rows in 32 bits (gemv_chunk_bytes sends larger rows to the generic kernel).
  const int row_bytes = static_cast<int>(p.row_bytes), groups = static_cast<int>(p.groups);
  const int group = static_cast<int>(p.group), group_shift = p.group_shift < 31 ? p.group_shift : 31;

  float acc[R][MT] = {};
  for (int64_t base = s_begin; base < s_end; base += ITERS) {
    const int iters = s_end - base < ITERS ? static_cast<int>(s_end - base) : ITERS;
    // This lane's chunk of every row for step `it` of the slice, with its scale and zero point;
    // false past the slice or the row's end.
    auto fetch = [&](int it, uint32_t (&w)[R][VEC / 4], ChunkParams (&params)[R]) {
      const int byte = static_cast<int>(((base + it) * 32 + lane) * VEC);
      if (it >= iters || byte >= row_bytes) return false;
      const int g = group_shift >= 0 ? (byte * P) >> group_shift : (byte * P) / group;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = r < last_r ? r : last_r;
        load_chunk<VEC>(w_base + (row * row_bytes + byte), w[r]);
        const int64_t u = u_base + (row * groups + g);
        params[r].scale = p.scales.raw(u);
        params[r].z = p.zeros != nullptr ? p.zeros[u] : p.zero_const;
      }
      return true;
    };
    // acc += the products of step `it`'s chunks, scaled.
    auto consume = [&](int it, const uint32_t (&w)[R][VEC / 4], const ChunkParams (&params)[R]) {
      float s[R], fz[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] = p.scales.value_of(params[r].scale);
        fz[r] = kMagic + static_cast<float>(params[r].z);
      }
      float t[R][MT] = {};
      chunk_products<BITS, VEC, MT, R>(xs4, SV / 4, it, lane, w, p.flip, fz, t);
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = fma_rn(s[r], t[r][m], acc[r][m]);
      }
    };
    // Two buffers of chunks taking turns: the next step's chunks are loaded before this one's
    // arithmetic, so two steps of weights are in flight, and nothing is copied between buffers.
    uint32_t a[R][VEC / 4], b[R][VEC / 4];
    ChunkParams a_params[R], b_params[R];
    // The slice's first weights are in flight while its activations are staged.
    bool have = fetch(0, a, a_params);
    __syncthreads();  // the previous slice's activations are no longer read
    stage_activations<BITS, VEC, MT, T>(p, x, base, iters, reinterpret_cast<float*>(xs4));
    __syncthreads();
#pragma unroll 1
    for (int it = 0; have; it += 2) {
      const bool more = fetch(it + 1, b, b_params);
      consume(it, a, a_params);
      if (!more) break;
      have = fetch(it + 2, a, a_params);
      consume(it + 1, b, b_params);
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      for (int d = 16; d > 0; d /= 2) acc[r][m] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][m], d);
    }
  }
  if (gridDim.y == 1) {
    if (lane == 0) {
      bool non_finite = false;
      for (int r = 0; r < R; ++r) {
        const int64_t n = first_row + r;
        if (n < row0 || r > last_r) continue;
        const float b = p.bias.get_or_zero(n);
        for (int m = 0; m < MT && m < p.M; ++m) {
          y[m * p.N + n] = core::from_float<T>(acc[r][m] + b);
          non_finite |= core::is_nonfinite(acc[r][m]);
        }
      }
      if (non_finite) {
#pragma unroll 1
        for (int i = 0; i < R * MT; ++i) {
          const int r = i / MT, m = i % MT;
          if (first_row + r >= row0 && r <= last_r && m < p.M) recompute_if_non_finite(p, BITS, x, y, m, first_row + r);
        }
      }
    }
    return;
  }

  // Split K: publish this split's sums; the last block of the row block adds them up.
  if (lane == 0) {
    for (int r = 0; r < R; ++r) {
      const int64_t n = first_row + r;
      if (n < row0 || r > last_r) continue;
      for (int m = 0; m < MT && m < p.M; ++m) partial[(split * p.M + m) * p.N + n] = acc[r][m];
    }
  }
  constexpr int BLOCK_ROWS = kGemvWarps * R;
  finish_split_k(p, BITS, x, y, partial, &tickets[blockIdx.x], gridDim.y,
                 static_cast<int64_t>(blockIdx.x) * BLOCK_ROWS, BLOCK_ROWS, 0, MT);
}

// Any layout: one warp per weight row, values extracted one at a time.
template <typename T>
__global__ void gemv_generic_kernel(LinearParams p, int bits, const T* __restrict__ x, T* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; n < p.N; n += warps) {
    float acc[kGemvMaxRows] = {};
    for (int64_t k = lane; k < p.K; k += 32) {
      const float w = weight_at(p, bits, n, k);
#pragma unroll
      for (int m = 0; m < kGemvMaxRows; ++m) {
        if (m < p.M) acc[m] = fma_rn(core::to_float(x[m * p.K + k]), w, acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < kGemvMaxRows; ++m) {
      for (int d = 16; d > 0; d /= 2) acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], d);
      if (lane == 0 && m < p.M) y[m * p.N + n] = core::from_float<T>(acc[m] + p.bias.get_or_zero(n));
    }
  }
}

}  // namespace linquant::cuda
