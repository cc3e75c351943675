// CPU kernel of the weight-only quantized linear op (W8A16 / W4A16 / W2A16): checks, activation
// layout, and a parallel loop over blocks of output features calling the per-ISA kernels, which
// dequantize in registers while reading each weight row from memory once; from enough activation
// rows (compute-bound), ATen's GEMM over dequantized weight tiles instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../linear_checks.h"
#include "../quant_layout.h"
#include "linear_kernels.h"

namespace linquant::cpu {
namespace {

// From this many activation rows the layer is bound by arithmetic, not weight bytes, and
// dequantizing weight tiles for ATen's GEMM (MKL's blocking) keeps up with fp32 F.linear (1.0x at
// M = 128 and 256 on 4096x4096) where the register-tiled kernel falls behind it. Below it the tiled
// kernel wins: at M = 64 it measured 1.0-1.5x fp32 F.linear, the GEMM path 0.9-1.0x.
constexpr int64_t kGemmMinRows = 128;
// Weight rows dequantized per GEMM call: at most 16 MiB of them. Fewer, longer rows cost the GEMM
// more: bf16 at M = 64 on 4096x14336, tiles of 292 / 585 / 1024 rows took 1.47x / 1.17x / 1.12x
// the time of one call on the whole weight.
constexpr int64_t kTileBytes = int64_t{1} << 24;

// y = x2 @ dequantized(weight).T, tile by tile, in x2's dtype (fp32, or bf16 with T = uint16_t
// holding bf16 bits). The tile buffer is kept per thread: a fresh 16 MiB allocation per tile costs
// more in first-touch page faults than the dequantization itself.
template <typename T>
void linear_by_gemm(const at::Tensor& x2, const LinearArgs& a,
                    void (*dequant_rows)(const LinearArgs&, int64_t, int64_t, T*), at::Tensor& y) {
  const int64_t tile = std::max<int64_t>(1, kTileBytes / static_cast<int64_t>(sizeof(T)) / std::max<int64_t>(a.K, 1));
  thread_local std::vector<T> buffer;
  buffer.resize(static_cast<size_t>(std::min(tile, a.N) * a.K));
  // The workers write through this pointer: inside the lambda `buffer` would name their own copy.
  T* const base = buffer.data();
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

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                      std::optional<int64_t> group_size) {
  const LinearShape sh = check_linear_args(x, qweight, scales, zeros, bias, bits, group_size);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "linquant: x must be on the CPU for this kernel, got ", x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = sh.N;
  if (sh.M == 0 || sh.N == 0) return at::zeros(out_shape, x.options());

  const int64_t per_byte = 8 / bits;
  const at::Tensor w = qweight.contiguous();
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const at::Tensor z = zeros.has_value() ? zero_points_as_int32(*zeros, "zeros").contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  LinearArgs a;
  a.M = sh.M;
  a.N = sh.N;
  a.K = sh.K;
  a.bits = static_cast<int>(bits);
  a.signed_q = bits == 8 && sh.symmetric;
  a.row_bytes = sh.row_bytes;
  a.group = sh.group;
  a.groups = sh.groups;
  a.w = reinterpret_cast<const uint8_t*>(w.const_data_ptr());
  a.scales = s.const_data_ptr<float>();
  a.zeros = z.defined() ? z.const_data_ptr<int32_t>() : nullptr;
  a.zero_const = sh.symmetric && bits < 8 ? 1 << (bits - 1) : 0;  // stored offset of signed sub-byte values
  a.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const LinearKernels& kernels = linear_kernels();
  const at::Tensor x_rows = x.reshape({sh.M, sh.K});
  const bool bf16_x = x.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16();
  // The layouts of the bf16 dot-product kernel (below): groups of whole 32-byte loads (one group
  // per row included), or below 8 bits 2 or 4 groups per load (16- or 8-byte groups), where it is
  // slower, spreading scales and sums over the lanes.
  // One group per row (per-channel, or a group as long as K or longer: check_linear_args gives
  // both the same group) takes the per-channel kernels.
  const bool per_channel = sh.groups == 1;
  const int64_t group_bytes = sh.group / per_byte;
  const bool whole_loads = per_channel || group_bytes % 32 == 0;
  const bool split_loads = bits < 8 && (group_bytes == 16 || group_bytes == 8);
  // bf16 GEMM over dequantized bf16 tiles, against the dot kernel (weights streamed from DRAM;
  // 4096x4096, 14336x4096, 4096x14336; same session):
  //   M = 32: 4-bit g128 1.09x / 0.98x / 0.98x, 4-bit g32 1.64x / 1.55x / 1.25x;
  //   M = 64: 4-bit g128 1.42x / 1.43x / 1.17x, 4-bit g32 1.90x / 2.08x / 1.68x, 8-bit per channel
  //     1.47x / 1.48x / 1.26x; and at M = 128 against the fp32 GEMM path, 2.2x;
  // hence from 64 rows on whole-load layouts, from 32 on the others.
  if (bf16_x && kernels.dequant_rows_bf16 != nullptr && sh.M >= (whole_loads ? 64 : 32)) {
    // The product is rounded to bf16 by the GEMM, then the bias is added in fp32 and the sum
    // rounded again: F.linear on the dequantized bf16 weight, within one more rounding.
    at::Tensor yb = at::empty({sh.M, sh.N}, x.options());
    linear_by_gemm(x_rows.contiguous(), a, kernels.dequant_rows_bf16, yb);
    if (b.defined()) yb.add_(b);
    return yb.view(out_shape);
  }
  const at::Tensor x2 = x_rows.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({sh.M, sh.N}, x.options().dtype(at::kFloat));
  a.y = y.data_ptr<float>();
  if (sh.M >= kGemmMinRows) {
    linear_by_gemm(x2, a, kernels.dequant_rows, y);
    if (b.defined()) y.add_(b);
    return y.to(x.scalar_type()).view(out_shape);
  }

  // bf16 activations on a CPU with AVX512-BF16: the dot-product kernel, on the byte streams kept in
  // bf16 and each row's sums over each group, for its layouts (whole or split loads). At 8 bits it
  // waits for 8 activation rows, since tile8 streams fewer rows as fast (weights streamed from
  // DRAM; 4096x4096, 4096x14336, 14336x4096): 0.69-0.89x tile8 at M = 1 (tile8 reaches 91-93% of
  // the read bandwidth), 0.87-1.09x at M = 4, 1.15-1.33x at M = 16. Below 8 bits it takes every M:
  // with 4 weight rows per tile for one or two activation rows it is 0.9-1.2x the LUT kernel at
  // M = 1 on the word-stream layouts (4-bit g128, per channel; this VM's noise is about as wide)
  // and faster on the others, and from M = 2 faster everywhere (0.95-1.46x at M = 2 with 2-row
  // tiles, which 4-row tiles speed up by another 20-25%).
  const int64_t dot_min_rows = bits == 8 ? 8 : 1;
  const bool bf16_dot =
      kernels.gemv_bf16 != nullptr && bf16_x && sh.M >= dot_min_rows && (whole_loads || split_loads);
  // Activation streams (see linear_kernels.h): x padded to whole bytes (or words) of weights, then
  // split by position within the byte (word).
  const auto streams = [&](const at::Tensor& rows, int64_t units, int64_t unit_values) {
    if (unit_values == 1) return rows;
    return at::constant_pad_nd(rows, {0, units * unit_values - sh.K})
        .view({sh.M, units, unit_values})
        .transpose(1, 2)
        .contiguous();
  };
  at::Tensor xd, xsum;
  if (bf16_dot) {
    xd = streams(x_rows.contiguous(), sh.row_bytes, per_byte);
    xsum = at::constant_pad_nd(x2, {0, sh.groups * sh.group - sh.K}).view({sh.M, sh.groups, sh.group}).sum(-1);
    a.xb = reinterpret_cast<const uint16_t*>(xd.const_data_ptr());
    a.xsum = xsum.const_data_ptr<float>();
  } else {
    a.word_streams = kernels.word_streams(a.bits, sh.group, per_channel);
    const int64_t unit_values = a.word_streams ? 32 / bits : per_byte;
    xd = streams(x2, a.word_streams ? (sh.row_bytes + 3) / 4 : sh.row_bytes, unit_values);
    a.xd = xd.const_data_ptr<float>();
  }
  const LinearKernels::GemvFn gemv = bf16_dot ? kernels.gemv_bf16 : kernels.gemv;
  // Threads take whole 4-row blocks so the kernels' 4-row register tiles rarely split.
  const int64_t blocks = (sh.N + 3) / 4;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) { gemv(a, b0 * 4, std::min(b1 * 4, sh.N)); });
  // The register kernels sum (q - z) x, |q - z| up to 255, and sums of x before applying the scale,
  // so activations near float's limit (|x| ~ 1e36) overflow there where x @ W_hat.T (tiny scales)
  // does not. Such a call, rare, is computed again through the dequantized weights.
  if (any_non_finite(y)) {
    linear_by_gemm(x2, a, kernels.dequant_rows, y);
    if (b.defined()) y.add_(b);
  }
  return y.to(x.scalar_type()).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace linquant::cpu
