// CPU kernels of the weight-only quantized linear ops (W8A16 / W4A16 / W2A16): `linear`, and
// `grouped_linear` (a mixture's experts in one call). Checks, activation layout, and a parallel
// loop over blocks of output features calling the per-ISA kernels, which dequantize in registers
// while reading each weight row from memory once; from enough activation rows (compute-bound),
// a GEMM over dequantized weights instead: on AVX-512 CPUs linquant's panel GEMMs (in bf16 for
// bf16 activations on CPUs with AVX512-BF16, else in fp32), elsewhere ATen's fp32 GEMM over
// dequantized weight tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "../linear_checks.h"
#include "../quant_layout.h"
#include "linear_kernels.h"

namespace linquant::cpu {
namespace {

// Weight rows dequantized per GEMM call: 512, and at most 16 MiB of them. More rows are likely
// out of cache by the time the GEMM reads them; fewer cost the GEMM more per row (measured with bf16
// at M = 64, when this path also took bf16 activations: 256 and 16 MiB tiles were both slower).
constexpr int64_t kTileRows = 512;
constexpr int64_t kTileBytes = int64_t{1} << 24;

// y [M, N] fp32 = x2 @ dequantized(weight).T, tile by tile through ATen's fp32 GEMM (instruction
// sets without the panel GEMMs). The tile buffer is kept per thread: a fresh allocation (up to
// 16 MiB) per tile costs more in first-touch page faults than the dequantization itself.
void linear_by_gemm(const at::Tensor& x2, const LinearArgs& a, at::Tensor& y) {
  const int64_t tile = std::clamp<int64_t>(kTileBytes / int64_t{sizeof(float)} / std::max<int64_t>(a.K, 1), 1, kTileRows);
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(std::min(tile, a.N) * a.K));
  // The workers write through this pointer: inside the lambda `buffer` would name their own copy.
  float* const base = buffer.data();
  const auto dequant_rows = linear_kernels().dequant_rows;
  for (int64_t n0 = 0; n0 < a.N; n0 += tile) {
    const int64_t len = std::min(tile, a.N - n0);
    at::parallel_for(n0, n0 + len, 4, [&](int64_t r0, int64_t r1) { dequant_rows(a, r0, r1, base + (r0 - n0) * a.K); });
    const at::Tensor wt = at::from_blob(base, {len, a.K}, x2.options());
    if (len == a.N) {
      at::mm_out(y, x2, wt.t());  // one tile: straight into y
    } else {
      y.narrow(1, n0, len).copy_(at::mm(x2, wt.t()));
    }
  }
}

// Whether any value of the contiguous float tensor y is inf or NaN (exponent bits all ones): an
// integer OR reduction the compiler vectorizes, where at::isfinite(y).all() cost 3-10% of a call.
bool any_non_finite(const at::Tensor& y) {
  const auto* words = reinterpret_cast<const uint32_t*>(y.const_data_ptr<float>());
  uint32_t found = 0;
  for (int64_t i = 0, n = y.numel(); i < n; ++i) {
    found |= static_cast<uint32_t>((words[i] & 0x7f800000u) == 0x7f800000u);
  }
  return found != 0;
}

// One weight (a layer's, or one expert's) as the kernels read it, with the tensors holding its
// scales (in their own dtype: the kernels convert each one they read), zero points in int32 and
// bias in fp32 kept alive beside the pointers.
struct Weight {
  LinearArgs a;  // the weight's fields; M and the activation / output pointers are set per call
  at::Tensor w, s, z, b;
};

ScaleType scale_type_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return ScaleType::bf16;
    case at::kHalf:
      return ScaleType::f16;
    default:
      return ScaleType::f32;  // check_linear_args allows fp32, fp16 and bf16 scales only
  }
}

Weight weight_of(const LinearShape& sh, int64_t bits, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias) {
  Weight wt;
  wt.w = qweight.contiguous();
  wt.s = scales.contiguous();
  if (zeros.has_value()) wt.z = zero_points_as_int32(*zeros, "zeros").contiguous();
  if (bias.has_value()) wt.b = bias->to(at::kFloat).contiguous();
  LinearArgs& a = wt.a;
  a.N = sh.N;
  a.K = sh.K;
  a.bits = static_cast<int>(bits);
  a.signed_q = bits == 8 && sh.symmetric;
  a.row_bytes = sh.row_bytes;
  a.group = sh.group;
  a.groups = sh.groups;
  a.w = reinterpret_cast<const uint8_t*>(wt.w.const_data_ptr());
  a.scales = wt.s.const_data_ptr();
  a.scale_type = scale_type_of(wt.s.scalar_type());
  a.zeros = wt.z.defined() ? wt.z.const_data_ptr<int32_t>() : nullptr;
  a.zero_const = sh.symmetric && bits < 8 ? 1 << (bits - 1) : 0;  // stored offset of signed sub-byte values
  a.bias = wt.b.defined() ? wt.b.const_data_ptr<float>() : nullptr;
  return wt;
}

// Which kernel takes M activation rows of a weight.
enum class Path {
  gemm_bf16,  // the bf16 GEMM kernel over weight panels dequantized to bf16 (gemm_bf16)
  gemm,       // an fp32 GEMM over dequantized weights: gemm_f32's panels, else ATen's over tiles
  dot_bf16,   // the bf16 dot-product register kernel (gemv_bf16)
  tiles,      // the fp32 register kernels (gemv: 8-bit tiles, lookup tables)
};

// Whether the bf16 kernels may take activations of this dtype on this CPU.
bool bf16_kernels(at::ScalarType x_dtype) { return x_dtype == at::kBFloat16 && cpu_has_avx512_bf16(); }

// From how many activation rows bf16 activations take the bf16 GEMM (gemm_bf16) instead of the dot
// kernel (below) on its layouts, or the register tiles on the others; split_group_bytes is a group's
// bytes (16 or 8) on the dot kernel's split layouts, else 0. Measured with both paths alternating in
// one process (weights streamed from DRAM: rotated copies over 96 MiB; median of 9 calls, best of
// 2; 4096x4096, 4096x14336, 14336x4096 (K x N); the dot kernel's time over the GEMM's; two sweeps,
// the second below). The GEMM multiplies activation rows 16 at a time, so 17-31 rows cost it as
// much as 32, and M = 20 can be slower than M = 16 against the dot kernel:
//   per channel: 8-bit M = 12 0.99-1.03x, M = 16 1.32-1.39x; 4-bit M = 16 1.06-1.15x, M = 20
//     0.93-1.04x, M = 24 1.12-1.22x; 2-bit M = 16 1.00-1.16x, M = 20 0.92-1.05x, M = 24 1.09-1.24x;
//   whole-load groups: 8-bit g128 M = 10 0.99-1.08x, M = 12 1.11-1.25x (g32 from M = 10
//     1.28-1.32x); 4-bit g128 M = 12 0.93-1.02x, M = 16 1.23-1.35x, g256 M = 16 1.10-1.23x, M = 20
//     1.02-1.15x (g64 M = 12 1.06-1.15x); 2-bit g128 M = 12 0.91-1.02x, M = 16 1.22-1.37x, g256
//     M = 16 1.08-1.18x, M = 20 0.98-1.12x;
//   split loads: 4-bit g32 M = 10 1.01-1.06x, M = 12 1.19-1.30x; 4-bit g16 M = 12 0.81-0.88x, M = 16
//     1.09-1.16x; 2-bit g64 M = 12 0.94-1.02x, M = 16 1.26-1.33x; 2-bit g32 M = 16 1.04-1.15x, M = 20
//     1.05-1.14x;
//   the register tiles' layouts (2-bit g16): M = 16 0.89-1.07x, M = 20 0.95-1.13x, M = 24
//     1.14-1.35x.
int64_t bf16_gemm_min_rows(int bits, bool per_channel, bool whole_loads, int64_t split_group_bytes) {
  if (whole_loads) {
    if (bits == 8) return per_channel ? 16 : 12;
    return per_channel ? 24 : 16;
  }
  if (split_group_bytes == 16) return bits == 4 ? 12 : 16;
  if (split_group_bytes == 8) return 16;
  return 24;
}

Path path_for(const LinearArgs& a, int64_t M, at::ScalarType x_dtype) {
  const LinearKernels& kernels = linear_kernels();
  const bool bf16_x = bf16_kernels(x_dtype);
  // The layouts of the bf16 dot-product kernel (below): groups of whole 32-byte loads (one group
  // per row included), or below 8 bits 2 or 4 groups per load (16- or 8-byte groups), where it is
  // slower, spreading scales and sums over the lanes.
  // One group per row (per-channel, or a group as long as K or longer: check_linear_args gives
  // both the same group) takes the per-channel kernels.
  const bool per_channel = a.groups == 1;
  const int64_t group_bytes = a.group * a.bits / 8;
  const bool whole_loads = per_channel || group_bytes % 32 == 0;
  const bool split_loads = a.bits < 8 && (group_bytes == 16 || group_bytes == 8);
  const int64_t gemm_bf16_min_rows = bf16_gemm_min_rows(a.bits, per_channel, whole_loads, split_loads ? group_bytes : 0);
  if (bf16_x && kernels.gemm_bf16 != nullptr && M >= gemm_bf16_min_rows) {
    return Path::gemm_bf16;
  }
  // The fp32 GEMM from the row count the instruction set's kernels measured.
  if (M >= kernels.gemm_min_rows(a.bits, a.group, per_channel)) return Path::gemm;
  // bf16 activations on a CPU with AVX512-BF16: the dot-product kernel, on the byte streams kept in
  // bf16 and each row's sums over each group, for its layouts (whole or split loads). At 8 bits it
  // waits for 8 activation rows, since tile8 streams fewer rows as fast (weights streamed from
  // DRAM; 4096x4096, 4096x14336, 14336x4096): 0.69-0.89x tile8 at M = 1 (tile8 reaches 91-93% of
  // the read bandwidth), 0.87-1.09x at M = 4, 1.15-1.33x at M = 16. Below 8 bits it takes every M:
  // with 4 weight rows per tile for one or two activation rows it is 0.9-1.2x the LUT kernel at
  // M = 1 on the word-stream layouts (4-bit g128, per channel; this VM's noise is about as wide)
  // and faster on the others, and from M = 2 faster everywhere (0.95-1.46x at M = 2 with 2-row
  // tiles, which 4-row tiles speed up by another 20-25%).
  const int64_t dot_min_rows = a.bits == 8 ? 8 : 1;
  const bool dot = kernels.gemv_bf16 != nullptr && bf16_x && M >= dot_min_rows && (whole_loads || split_loads);
  return dot ? Path::dot_bf16 : Path::tiles;
}

// x_rows [M, K] in fp32, contiguous, at a 64-byte-aligned address. ATen's GEMM picks its kernels
// by its operands' alignment, and the order of its sums with them ([7, 67] rows at each 4-byte
// offset: equal to an aligned copy's product only at 16-byte ones), so rows inside a larger tensor
// (a slice of a batch, an expert's rows in grouped_linear) are copied to get the same bits as
// anywhere else.
at::Tensor gemm_rows(const at::Tensor& x_rows) {
  at::Tensor rows = x_rows.to(at::kFloat).contiguous();
  return reinterpret_cast<uintptr_t>(rows.const_data_ptr()) % 64 == 0 ? rows : rows.clone();
}

// x [M, K] (contiguous, bf16 or fp32) as the panel GEMMs read it (transpose_dwords: the dwords of
// each row, a pair of bf16 values or one fp32 value, transposed), in parallel over blocks of 16.
at::Tensor transposed_dwords(const at::Tensor& x) {
  const int64_t M = x.size(0), halves = x.size(1) * (x.element_size() / 2);
  const int64_t dwords = (halves + 1) / 2, blocks = (dwords + 15) / 16;
  at::Tensor xt = at::empty({dwords, pair_rows(M)}, x.options().dtype(at::kInt));
  const auto x16 = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
  const auto xt32 = reinterpret_cast<uint32_t*>(xt.data_ptr());
  const auto transpose = linear_kernels().transpose_dwords;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M));  // 64K dwords or more a task
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    transpose(x16, M, halves, b0 * 16, std::min(dwords, b1 * 16), xt32);
  });
  return xt;
}

// One panel GEMM (gemm_bf16 or gemm_f32) of a with the activations xt, the threads taking 64-row
// weight panels, each dequantized once. The sums and the bias are added in fp32 and rounded to the
// output once.
void run_panel_gemm(LinearKernels::GemvFn gemm, LinearArgs& a, const at::Tensor& xt) {
  a.xt = reinterpret_cast<const uint32_t*>(xt.const_data_ptr());
  const int64_t panels = (a.N + 63) / 64;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) { gemm(a, p0 * 64, std::min(a.N, p1 * 64)); });
}

// y [M, N] (contiguous, fp32) = x_rows @ W_hat.T + bias in fp32: gemm_f32 where the instruction set
// has it, else ATen's fp32 GEMM over dequantized tiles. Also the register kernels' recomputation
// (finish_register_products), whose result is inf or NaN only where F.linear's is.
void product_f32(const at::Tensor& x_rows, const Weight& wt, at::Tensor& y) {
  const LinearKernels& kernels = linear_kernels();
  if (kernels.gemm_f32 == nullptr) {
    linear_by_gemm(gemm_rows(x_rows), wt.a, y);
    if (wt.b.defined()) y.add_(wt.b);
    return;
  }
  LinearArgs a = wt.a;
  a.M = x_rows.size(0);
  a.y = y.data_ptr<float>();
  run_panel_gemm(kernels.gemm_f32, a, transposed_dwords(x_rows.to(at::kFloat).contiguous()));
}

// out [M, N] (contiguous, x's dtype) = x_rows @ W_hat.T + bias for the GEMM paths.
void product_by_gemm(const at::Tensor& x_rows, Path path, const Weight& wt, at::Tensor out) {
  if (path == Path::gemm_bf16) {
    LinearArgs a = wt.a;
    a.M = x_rows.size(0);
    a.yb = reinterpret_cast<uint16_t*>(out.data_ptr());
    return run_panel_gemm(linear_kernels().gemm_bf16, a, transposed_dwords(x_rows.contiguous()));
  }
  at::Tensor y = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  product_f32(x_rows, wt, y);
  if (!y.is_same(out)) out.copy_(y);
}

// out[((u / block) * M + m) * unit_values * block + p * block + u % block] = convert(x[m, u *
// unit_values + p], p) (zero past K) for `units` units of `unit_values` values: each row of x [M, K]
// (contiguous) split by position p within a byte (or word) of weights, in blocks of `block` units
// (units a multiple of block): the byte streams take one block per row, the word streams
// kWordBlock (linear_kernels.h).
template <typename In, typename Out, typename Convert>
void split_rows(const In* x, int64_t M, int64_t K, int64_t units, int64_t unit_values, int64_t block, Out* out,
                Convert convert) {
  for (int64_t m = 0; m < M; ++m) {
    const In* row = x + m * K;
    for (int64_t b = 0; b < units; b += block) {
      for (int64_t p = 0; p < unit_values; ++p) {
        Out* stream = out + ((b / block) * M + m) * unit_values * block + p * block;
        const int64_t first = b * unit_values + p;  // x's index at the block's first unit
        const int64_t filled = K > first ? std::min(block, (K - first + unit_values - 1) / unit_values) : 0;
        for (int64_t u = 0; u < filled; ++u) stream[u] = convert(row[first + u * unit_values], p);
        std::fill(stream + filled, stream + block, Out{});
      }
    }
  }
}

// x as the dot kernel's vdpbf16ps reads it: bf16 subnormals (exponent bits 0) are zero there, so
// they must be zero in the group sums too, or (128 + z) sum x would subtract what the dot products
// never added (1e-39 activations against 1e30 weights came out 100x the product, sign flipped).
inline float as_dot_reads(c10::BFloat16 v) { return (v.x & 0x7f80) == 0 ? 0.0f : static_cast<float>(v); }

// sum[m, g] = the sum of read(x[m, k]) over group g's k (x [M, K] contiguous), added in double and
// rounded to fp32 once, whatever the group's length. Eight running sums keep the additions from
// waiting on each other (one chain of them cost 30 us at M = 16, K = 1536).
template <typename T, typename Read>
void group_sums(const T* x, int64_t M, int64_t K, int64_t group, int64_t groups, float* sum, Read read) {
  constexpr int kLanes = 8;
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t end = std::min(K, (g + 1) * group);
      double lanes[kLanes] = {};
      int64_t k = g * group;
      for (; k + kLanes <= end; k += kLanes) {
        for (int j = 0; j < kLanes; ++j) lanes[j] += read(row[k + j]);
      }
      for (; k < end; ++k) lanes[0] += read(row[k]);
      double total = 0;
      for (double lane : lanes) total += lane;
      sum[m * groups + g] = static_cast<float>(total);
    }
  }
}

// The register kernels' activations for x_rows [M, K] (M > 0): for Path::dot_bf16 the bf16 byte
// streams and each row's sums over each group, for Path::tiles the fp32 byte (or word) streams,
// with the group sums where the kernels ask for them (Streams::*_and_sums); see
// linear_kernels.h. Written by plain loops into one allocation: the chain of ATen ops it
// replaced (convert, pad, view, transpose, copy, sum) cost several microseconds a call, a third of
// a small layer's time at M = 1.
struct Activations {
  at::Tensor streams, sums;  // sums: dot_bf16 and Streams::*_and_sums only
  bool word_streams = false;

  Activations(const at::Tensor& x_rows, Path path, const LinearArgs& a) {
    const int64_t M = x_rows.size(0), K = a.K;
    const at::Tensor x = x_rows.contiguous();
    if (path == Path::dot_bf16) {  // x is bf16 here (bf16_kernels)
      const int64_t per_byte = 8 / a.bits;
      if (per_byte == 1) {
        streams = x;  // bf16 rows as they are
      } else {
        streams = at::empty({M, per_byte * a.row_bytes}, x.options());
        split_rows(reinterpret_cast<const uint16_t*>(x.const_data_ptr()), M, K, a.row_bytes, per_byte, a.row_bytes,
                   reinterpret_cast<uint16_t*>(streams.data_ptr()), [](uint16_t v, int64_t) { return v; });
      }
      sums = at::empty({M, a.groups}, x.options().dtype(at::kFloat));
      group_sums(x.const_data_ptr<c10::BFloat16>(), M, K, a.group, a.groups, sums.data_ptr<float>(), as_dot_reads);
      return;
    }
    const Streams layout = linear_kernels().streams(a.bits, a.group, a.groups == 1, a.zeros != nullptr, M);
    word_streams = layout != Streams::bytes;
    const int64_t unit_values = word_streams ? 32 / a.bits : 8 / a.bits;
    if (unit_values == 1 && x.scalar_type() == at::kFloat) {
      streams = x;  // fp32 rows as they are
      return;
    }
    const int64_t row_words = (a.row_bytes + 3) / 4;
    const int64_t units = word_streams ? (row_words + kWordBlock - 1) / kWordBlock * kWordBlock : a.row_bytes;
    const int64_t block = word_streams ? kWordBlock : units;
    streams = at::empty({M, unit_values * units}, x.options().dtype(at::kFloat));
    if (layout == Streams::words_and_sums || layout == Streams::scaled_words_and_sums) {
      sums = at::empty({M, a.groups}, x.options().dtype(at::kFloat));
    }
    // Stream p's factor where scaled (linear_kernels.h; a power of two, exact), else 1.
    float factor[32];
    for (int64_t p = 0; p < unit_values; ++p) {
      const int64_t exponent = a.bits * (unit_values - 2 - (p < unit_values - 1 ? p : 0));
      factor[p] = layout == Streams::scaled_words_and_sums ? std::ldexp(1.0f, static_cast<int>(exponent)) : 1.0f;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linquant_activation_streams", [&] {
      const auto read = [](scalar_t v) { return static_cast<float>(v); };
      split_rows(x.const_data_ptr<scalar_t>(), M, K, units, unit_values, block, streams.data_ptr<float>(),
                 [&](scalar_t v, int64_t p) { return read(v) * factor[p]; });
      if (sums.defined()) group_sums(x.const_data_ptr<scalar_t>(), M, K, a.group, a.groups, sums.data_ptr<float>(), read);
    });
  }

  // Points the kernels' arguments at these activations.
  void point(LinearArgs& a) const {
    a.word_streams = word_streams;
    if (streams.scalar_type() == at::kBFloat16) {  // dot_bf16's (the register tiles' are fp32)
      a.xb = reinterpret_cast<const uint16_t*>(streams.const_data_ptr());
    } else {
      a.xd = streams.const_data_ptr<float>();
    }
    if (sums.defined()) a.xsum = sums.const_data_ptr<float>();
  }
};

LinearKernels::GemvFn kernel_for(Path path) {
  return path == Path::dot_bf16 ? linear_kernels().gemv_bf16 : linear_kernels().gemv;
}

// One weight's product through the register kernels (a layer's, or one expert's rows in
// grouped_linear): the weight, the kernel, the activations laid out for it and the fp32 output
// (out's rows themselves for fp32 x).
struct RegisterProduct {
  Weight wt;
  Path path;  // dot_bf16 or tiles
  int64_t first;  // its first row of x
  Activations act;
  at::Tensor y;
};

// Threads for the register kernels: one per kMicrosPerThread of estimated single-thread work, at
// the kernels' single-thread rates here (weights streamed from DRAM at ~16 GB/s; ~60 GMAC/s once
// bound by arithmetic, M = 16), so small products skip the fork and the workers' wake-up (~5 us).
// 2 threads against 1 (same weights and rows): 256x576 8-bit M = 1 (est. 12 us) 0.8x, 576x576
// 4-bit M = 1 (16 us) 1.0-1.25x, M = 4 (32 us) 1.4x; 128x256 8-bit M = 32 (19 us) 1.4x.
constexpr double kBytesPerMicro = 16e3, kMacsPerMicro = 60e3, kMicrosPerThread = 6;

// Runs every product's register kernels in one parallel loop: a thread takes the same share of
// each weight's 4-row blocks (so the kernels' 4-row tiles rarely split, and experts of different
// row counts spread evenly). Small weights run on the calling thread.
void run_register_kernels(const std::vector<RegisterProduct>& products, int64_t N) {
  double micros = 0;
  for (const RegisterProduct& p : products) {
    const LinearArgs& a = p.wt.a;
    micros += static_cast<double>(N * a.row_bytes) / kBytesPerMicro +
              static_cast<double>(a.M * N * a.K) / kMacsPerMicro;
  }
  const int64_t blocks = (N + 3) / 4;
  const int64_t threads = std::clamp<int64_t>(static_cast<int64_t>(micros / kMicrosPerThread), 1,
                                              std::min<int64_t>(blocks, at::get_num_threads()));
  const auto share = [&](int64_t t) {
    const int64_t n0 = t * blocks / threads * 4, n1 = std::min((t + 1) * blocks / threads * 4, N);
    for (const RegisterProduct& p : products) kernel_for(p.path)(p.wt.a, n0, n1);
  };
  if (threads == 1) {
    share(0);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) share(t);
  });
}

// The register kernels' product of wt with x_rows (x's rows from `first`), for out_rows.
RegisterProduct register_product(Weight wt, Path path, const at::Tensor& x_rows, int64_t first,
                                 const at::Tensor& out_rows) {
  Activations act(x_rows, path, wt.a);
  act.point(wt.a);
  at::Tensor y = out_rows.scalar_type() == at::kFloat
                     ? out_rows
                     : at::empty(out_rows.sizes(), out_rows.options().dtype(at::kFloat));
  wt.a.y = y.data_ptr<float>();
  return {std::move(wt), path, first, std::move(act), std::move(y)};
}

// After run_register_kernels: a product that overflowed is computed again, and each is written to
// out's rows in x's dtype. The register kernels sum (q - z) x, |q - z| up to 255, and sums of x
// before applying the scale, so activations near float's limit (|x| ~ 1e36) overflow there where
// x @ W_hat.T (tiny scales) does not: such a product, rare (any_non_finite), goes again through the
// dequantized weights (product_f32).
void finish_register_products(std::vector<RegisterProduct>& products, const at::Tensor& x, at::Tensor& out) {
  for (RegisterProduct& p : products) {
    const at::Tensor out_rows = out.narrow(0, p.first, p.wt.a.M);
    if (any_non_finite(p.y)) {
      product_f32(x.narrow(0, p.first, p.wt.a.M), p.wt, p.y);
    }
    if (!p.y.is_same(out_rows)) out_rows.copy_(p.y);
  }
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                      std::optional<int64_t> group_size) {
  const LinearShape sh = check_linear_args(x, qweight, scales, zeros, bias, bits, group_size);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "linquant: x must be on the CPU for this kernel, got ", x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = sh.N;
  if (sh.M == 0 || sh.N == 0) return at::zeros(out_shape, x.options());

  Weight wt = weight_of(sh, bits, qweight, scales, zeros, bias);
  wt.a.M = sh.M;
  const at::Tensor x_rows = x.reshape({sh.M, sh.K});
  const Path path = path_for(wt.a, sh.M, x.scalar_type());
  at::Tensor out = at::empty({sh.M, sh.N}, x.options());
  if (path == Path::gemm_bf16 || path == Path::gemm) {
    product_by_gemm(x_rows, path, wt, out);
    return out.view(out_shape);
  }
  std::vector<RegisterProduct> products;
  products.push_back(register_product(std::move(wt), path, x_rows, 0, out));
  run_register_kernels(products, sh.N);
  finish_register_products(products, x_rows, out);
  return out.view(out_shape);
}

// grouped_linear: the experts whose rows take a GEMM go one at a time (bound by arithmetic, as
// `linear` is there); all the others' register kernels run in one parallel loop, so a decoding
// step's experts cost one thread fork instead of one each. Each expert's rows get exactly
// `linear`'s kernel and result.
at::Tensor grouped_linear_cpu(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& qweight,
                              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                              const std::optional<at::Tensor>& bias, int64_t bits,
                              std::optional<int64_t> group_size) {
  check_grouped_linear_args(x, counts, qweight, scales, zeros, bias);
  const int64_t experts = qweight.size(0);
  if (experts == 0) return at::empty({0, qweight.size(1)}, x.options());
  const auto slice = [](const std::optional<at::Tensor>& t, int64_t e) {
    return t.has_value() ? std::optional<at::Tensor>(t->select(0, e)) : std::nullopt;
  };
  const LinearShape sh =
      check_linear_args(x, qweight.select(0, 0), scales.select(0, 0), slice(zeros, 0), slice(bias, 0), bits, group_size);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "linquant: x must be on the CPU for this kernel, got ", x.device());
  const int64_t T = x.size(0);
  if (T == 0 || sh.N == 0) return at::zeros({T, sh.N}, x.options());

  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({T, sh.N}, x.options());
  // Each expert's activations and output are allocated on their own, a few rows each, as `linear`
  // allocates them: one layout of all T rows took fresh megabytes per call (page faults), 1.2x
  // slower at 64 tokens of OLMoE's shapes than one call per expert.
  std::vector<RegisterProduct> products;
  for (int64_t e = 0, first = 0; e < experts; first += counts[e], ++e) {
    const int64_t m = counts[e];
    if (m == 0) continue;
    Weight wt = weight_of(sh, bits, qweight.select(0, e), scales.select(0, e), slice(zeros, e), slice(bias, e));
    wt.a.M = m;
    const at::Tensor x_rows = xc.narrow(0, first, m);
    const Path path = path_for(wt.a, m, x.scalar_type());
    if (path == Path::gemm_bf16 || path == Path::gemm) {
      product_by_gemm(x_rows, path, wt, out.narrow(0, first, m));
      continue;
    }
    products.push_back(register_product(std::move(wt), path, x_rows, first, out.narrow(0, first, m)));
  }
  run_register_kernels(products, sh.N);
  finish_register_products(products, xc, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("grouped_linear", &grouped_linear_cpu);
}

}  // namespace linquant::cpu
