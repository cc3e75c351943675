// CUDA kernel of the weight-only quantized linear op: argument checks, then by batch size M
// (default thresholds, measured on an H100 with bench/bench_linear_cuda.py --paths; moved by
// _cuda_linear_dispatch)
//   M = 1:           the fused GEMV kernels (linear_gemv.cuh), which read each weight byte once;
//                    up to M = 8 where no tensor-core kernel takes the call (fp32 activations,
//                    layouts they reject);
//   1 < M <= 8:      the register-dequantizing tensor-core kernel (linear_tc_gemv.cuh; up to M = 16,
//                    and with staged activations, linear_tc_staged.cuh, up to 64, when
//                    tc_max_m is raised);
//   8 < M <= 64:     the fused tensor-core kernel (linear_mma.cuh) for fp16 / bf16 activations;
//   up to hopper_max_m (0, off, until measured): on compute capability 9.0, CUTLASS's mixed-input
//                    wgmma GEMM (linear_hopper_launch.cuh), in builds that have it;
//   otherwise:       the weight dequantized to the activation dtype, then cuBLAS (at::addmm), which
//                    is also the path, past 8 rows, of fp32 activations and of layouts the fused
//                    kernels reject.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../csrc/linear_checks.h"
#include "../csrc/quant_layout.h"
#include "launch.cuh"
#include "linear_dequant.cuh"
#include "linear_gemv.cuh"
#include "linear_mma.cuh"
#include "linear_tc_gemv.cuh"
#include "linear_tc_staged.cuh"
#if LINQUANT_WITH_HOPPER
#include "linear_hopper_launch.cuh"
#endif

namespace linquant::cuda {
namespace {

constexpr int kThreads = 256;

// Split-K tickets: a counter per output tile, 0 at launch. The last block of a tile sets its
// counter back to 0 and kernels on one stream run in order, so each stream keeps one buffer across
// calls instead of a memset per call, a second launch that at batch 1 would cost a sizable part
// of the GEMV itself. While the stream is captured into a CUDA graph a fresh zeroed buffer is
// taken instead: the graph then owns it and replays its memset.
at::Tensor split_tickets(const at::Tensor& like, int64_t count) {
  const auto options = like.options().dtype(at::kInt);
  const cudaStream_t stream = current_stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({count}, options);
  static std::mutex mutex;
  // Never freed: CUDA memory must not be released after the runtime has shut down at exit.
  static auto* buffers = new std::map<std::pair<c10::DeviceIndex, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[{like.device().index(), stream}];
  if (!buffer.defined() || buffer.numel() < count) buffer = at::zeros({std::max<int64_t>(count, 4096)}, options);
  return buffer;
}

// What a launch that splits K over k.splits blocks per tile needs: fp32 partial sums [splits, M, N]
// and the tiles' tickets. Null pointers when K is not split.
class SplitWorkspace {
 public:
  SplitWorkspace(const at::Tensor& like, const SplitK& k, const LinearParams& p, int64_t tiles) {
    if (k.splits > 1) {
      partial_ = at::empty({k.splits, p.M, p.N}, like.options().dtype(at::kFloat));
      tickets_ = split_tickets(like, tiles);
    }
  }
  float* partial() { return partial_.defined() ? partial_.data_ptr<float>() : nullptr; }
  int* tickets() { return tickets_.defined() ? tickets_.data_ptr<int>() : nullptr; }

 private:
  at::Tensor partial_, tickets_;
};

FloatArray float_array(const at::Tensor& t) {
  FloatArray a;
  a.data = t.const_data_ptr();
  a.kind = t.scalar_type() == at::kHalf       ? FloatArray::kF16
           : t.scalar_type() == at::kBFloat16 ? FloatArray::kBF16
                                              : FloatArray::kF32;
  return a;
}

template <int BITS, int VEC, int MT, typename T>
void launch_gemv(const LinearParams& p, const T* x, T* y, const at::Tensor& like) {
  using G = GemvGrid<BITS, VEC, MT>;
  const int64_t row_blocks = G::row_blocks(p.N), steps = G::steps(p.row_bytes);
  const SplitK k = split_k(row_blocks, steps, multiprocessors(like.device().index()));
  SplitWorkspace work(like, k, p, row_blocks);
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(k.splits));
  gemv_kernel<BITS, VEC, MT, T><<<grid, kGemvWarps * 32, 0, current_stream()>>>(
      p, x, y, work.partial(), work.tickets(), steps, k.per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int BITS, int VEC, typename T>
void launch_gemv_rows(const LinearParams& p, const T* x, T* y, const at::Tensor& like) {
  if (p.M == 1) {
    launch_gemv<BITS, VEC, 1>(p, x, y, like);
  } else if (p.M == 2) {
    launch_gemv<BITS, VEC, 2>(p, x, y, like);
  } else if (p.M <= 4) {
    launch_gemv<BITS, VEC, 4>(p, x, y, like);
  } else {
    launch_gemv<BITS, VEC, 8>(p, x, y, like);
  }
}

template <typename T>
void gemv(const LinearParams& p, int bits, const T* x, T* y, const at::Tensor& like) {
  const int vec = gemv_chunk_bytes(p, bits);
  if (bits == 8 && vec == 16) return launch_gemv_rows<8, 16>(p, x, y, like);
  if (bits == 8 && vec == 8) return launch_gemv_rows<8, 8>(p, x, y, like);
  if (bits == 8 && vec == 4) return launch_gemv_rows<8, 4>(p, x, y, like);
  if (bits == 4 && vec == 16) return launch_gemv_rows<4, 16>(p, x, y, like);
  if (bits == 4 && vec == 8) return launch_gemv_rows<4, 8>(p, x, y, like);
  if (bits == 4 && vec == 4) return launch_gemv_rows<4, 4>(p, x, y, like);
  if (bits == 2 && vec == 8) return launch_gemv_rows<2, 8>(p, x, y, like);
  if (bits == 2 && vec == 4) return launch_gemv_rows<2, 4>(p, x, y, like);
  gemv_generic_kernel<<<grid_for(p.N * 32, kThreads), kThreads, 0, current_stream()>>>(p, bits, x, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Batch sizes where linear changes path: the GEMV up to gemv_max_m rows (it takes at most
// kGemvMaxRows), the register-dequantizing tensor-core kernels up to tc_max_m (at most kTcStagedMaxRows),
// the fused tensor-core kernel up to mma_max_m, where the one-off dequantization becomes small
// next to the GEMM and cuBLAS's tiling wins. On an H100 (8192 x 8192, 8, 4 and 2 bits alike) the
// GEMV, whose time grows with M, is fastest at M = 1, the register kernel (whose time hardly
// changes from M = 1 to 4) up to M = 8, the fused kernel up to 64 and dequantize + cuBLAS from
// M = 128. The Hopper GEMM, past mma_max_m up to hopper_max_m, is off until it has been measured.
// Settable through _cuda_linear_dispatch.
std::atomic<int64_t> gemv_max_m{1};
std::atomic<int64_t> tc_max_m{8};
std::atomic<int64_t> mma_max_m{64};
std::atomic<int64_t> hopper_max_m{0};

std::vector<int64_t> set_dispatch(int64_t gemv, int64_t tc, int64_t mma, int64_t hopper) {
  TORCH_CHECK_VALUE(gemv <= kGemvMaxRows, "linquant: gemv_max_m must be at most ", kGemvMaxRows,
                    " (the GEMV kernels take up to that many rows), or negative to keep it; got ", gemv);
  TORCH_CHECK_VALUE(tc <= kTcStagedMaxRows, "linquant: tc_max_m must be at most ", kTcStagedMaxRows,
                    " (the kernel takes up to that many rows), or negative to keep it; got ", tc);
  std::vector<int64_t> previous = {gemv_max_m.load(), tc_max_m.load(), mma_max_m.load(), hopper_max_m.load()};
  if (gemv >= 0) gemv_max_m.store(gemv);
  if (tc >= 0) tc_max_m.store(tc);
  if (mma >= 0) mma_max_m.store(mma);
  if (hopper >= 0) hopper_max_m.store(hopper);
  return previous;
}

// Whether linear on this device can take the Hopper GEMM (the build has it, the GPU is sm_90).
bool has_hopper_gemm(int64_t device) {
  const int count = c10::cuda::device_count();
  TORCH_CHECK_VALUE(device >= 0 && device < count, "linquant: device must be a CUDA device index in [0, ", count,
                    "); got ", device);
#if LINQUANT_WITH_HOPPER
  return hopper_device(static_cast<c10::DeviceIndex>(device));
#else
  return false;
#endif
}

template <int BITS, int NF, typename T>
void launch_tc_gemv(const LinearParams& p, const T* x, T* y, const at::Tensor& like) {
  const int64_t blocks = tc_gemv_blocks(p.N), steps = tc_gemv_steps(p.K);
  const SplitK k = split_k(blocks, steps, multiprocessors(like.device().index()), tc_gemv_blocks_per_sm(NF));
  SplitWorkspace work(like, k, p, blocks);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(k.splits));
  const int per_split = static_cast<int>(k.per_split);
  if (tc_gemv_integer_steps<BITS, T>(p)) {
    tc_gemv_kernel<BITS, NF, T, true><<<grid, kTcWarps * 32, 0, current_stream()>>>(
        p, x, y, work.partial(), work.tickets(), per_split);
  } else {
    tc_gemv_kernel<BITS, NF, T, false><<<grid, kTcWarps * 32, 0, current_stream()>>>(
        p, x, y, work.partial(), work.tickets(), per_split);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int BITS, int NF, typename T>
void launch_tc_staged(const LinearParams& p, const T* x, T* y, const at::Tensor& like) {
  const int64_t blocks = tc_gemv_blocks(p.N), steps = tc_gemv_steps(p.K);
  const SplitK k = split_k(blocks, steps, multiprocessors(like.device().index()), kTcStagedBlocksPerSm);
  SplitWorkspace work(like, k, p, blocks);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(k.splits));
  tc_staged_kernel<BITS, NF, T><<<grid, kTcWarps * 32, 0, current_stream()>>>(p, x, y, work.partial(), work.tickets(),
                                                                             static_cast<int>(k.per_split));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The register tensor-core kernels by activation rows: 8 per fragment, in registers up to 16 rows,
// staged in shared memory up to 64.
template <int BITS, typename T>
void tc_gemv_rows(const LinearParams& p, const T* x, T* y, const at::Tensor& like) {
  if (p.M <= 8) {
    launch_tc_gemv<BITS, 1>(p, x, y, like);
  } else if (p.M <= kTcMaxRows) {
    launch_tc_gemv<BITS, 2>(p, x, y, like);
  } else if (p.M <= 32) {
    launch_tc_staged<BITS, 4>(p, x, y, like);
  } else {
    launch_tc_staged<BITS, 8>(p, x, y, like);
  }
}

template <int BITS, int BM, typename T>
void launch_mma(const LinearParams& p, const T* x, T* y, const at::Tensor& like) {
  const MmaGrid g = mma_grid<BM>(p);
  const SplitK k = split_k(g.col_tiles * g.row_tiles, g.steps, multiprocessors(like.device().index()));
  SplitWorkspace work(like, k, p, g.col_tiles * g.row_tiles);
  const dim3 grid(static_cast<unsigned>(g.row_tiles), static_cast<unsigned>(g.col_tiles),
                  static_cast<unsigned>(k.splits));
  mma_kernel<BITS, BM, T><<<grid, kMmaWarps * 32, 0, current_stream()>>>(
      p, x, y, work.partial(), work.tickets(), k.per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int BITS, typename T>
void mma_rows(const LinearParams& p, const T* x, T* y, const at::Tensor& like) {
  if (p.M <= 16) {
    launch_mma<BITS, 16>(p, x, y, like);
  } else if (p.M <= 32) {
    launch_mma<BITS, 32>(p, x, y, like);
  } else {
    launch_mma<BITS, 64>(p, x, y, like);
  }
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                       std::optional<int64_t> group_size) {
  const LinearShape sh = check_linear_args(x, qweight, scales, zeros, bias, bits, group_size);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = sh.N;
  if (sh.M == 0 || sh.N == 0) return at::zeros(out_shape, x.options());
  if (sh.K == 0) {  // an empty sum: y is the bias
    at::Tensor y = at::zeros(out_shape, x.options());
    return bias.has_value() ? y.add_(bias->to(x.scalar_type())) : y;
  }

  const at::Tensor w = qweight.contiguous();
  const at::Tensor s = scales.contiguous();
  const at::Tensor z = zeros.has_value() ? zero_points_as_int32(*zeros, "zeros").contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  LinearParams p;
  p.w = reinterpret_cast<const uint8_t*>(w.const_data_ptr());
  p.row_bytes = sh.row_bytes;
  p.scales = float_array(s);
  set_zero_points(p, static_cast<int>(bits), z.defined() ? z.const_data_ptr<int32_t>() : nullptr);
  if (b.defined()) p.bias = float_array(b);
  p.M = sh.M;
  p.N = sh.N;
  p.K = sh.K;
  set_groups(p, sh.group, sh.groups);

  const at::Tensor x2 = x.reshape({sh.M, sh.K}).contiguous();
  // The tensor-core kernels: fp16 / bf16 activations, layouts of whole 32-value chunks.
  const bool half_precision = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const bool tc = half_precision && sh.M <= tc_max_m.load(std::memory_order_relaxed) &&
                  tc_gemv_supports(p, static_cast<int>(bits), x2.const_data_ptr());
  const bool mma = !tc && half_precision && sh.M <= mma_max_m.load(std::memory_order_relaxed) &&
                   sh.N <= kMmaMaxCols && mma_supports(p, static_cast<int>(bits));
#if LINQUANT_WITH_HOPPER
  const bool hopper = !tc && !mma && sh.M <= hopper_max_m.load(std::memory_order_relaxed) &&
                      hopper_gemm_supports(p, static_cast<int>(bits), x2);
#else
  const bool hopper = false;
#endif
  // The GEMV also takes the few rows no tensor-core kernel takes (fp32 activations, layouts they
  // reject) unless it is off (gemv_max_m = 0): it reads the weight once, where dequantize + cuBLAS
  // would first write and read all of it at 16 or 32 bits.
  const int64_t gemv_rows = gemv_max_m.load(std::memory_order_relaxed);
  if (sh.M <= gemv_rows || (gemv_rows > 0 && sh.M <= kGemvMaxRows && !tc && !mma && !hopper)) {
    at::Tensor y = at::empty({sh.M, sh.N}, x.options());
    dispatch_float(x.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      gemv(p, static_cast<int>(bits), static_cast<const T*>(x2.const_data_ptr()), static_cast<T*>(y.data_ptr()), x);
    });
    return y.view(out_shape);
  }

  if (tc || mma) {
    at::Tensor y = at::empty({sh.M, sh.N}, x.options());
    auto run = [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* xp = static_cast<const T*>(x2.const_data_ptr());
      T* yp = static_cast<T*>(y.data_ptr());
      if (tc) {
        if (bits == 8) tc_gemv_rows<8>(p, xp, yp, x);
        if (bits == 4) tc_gemv_rows<4>(p, xp, yp, x);
        if (bits == 2) tc_gemv_rows<2>(p, xp, yp, x);
      } else {
        if (bits == 8) mma_rows<8>(p, xp, yp, x);
        if (bits == 4) mma_rows<4>(p, xp, yp, x);
        if (bits == 2) mma_rows<2>(p, xp, yp, x);
      }
    };
    if (x.scalar_type() == at::kHalf) {
      run(static_cast<core::half_t*>(nullptr));
    } else {
      run(static_cast<core::bf16_t*>(nullptr));
    }
    return y.view(out_shape);
  }

#if LINQUANT_WITH_HOPPER
  if (hopper) {
    at::Tensor y = at::empty({sh.M, sh.N}, x.options());
    if (hopper_gemm(p, static_cast<int>(bits), x2, b, y)) return y.view(out_shape);
  }  // else CUTLASS refused the problem: the dense path takes it
#endif

  at::Tensor wd = at::empty({sh.N, sh.K}, x.options());
  dispatch_float(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* const out = static_cast<T*>(wd.data_ptr());
    if (mma_supports(p, static_cast<int>(bits))) {  // whole chunks: one thread per 32 values
      const unsigned grid = grid_for(sh.N * (sh.row_bytes * 8 / bits) / kMmaChunk, kThreads);
      if (bits == 8) dequant_chunks_kernel<8, T><<<grid, kThreads, 0, current_stream()>>>(p, out);
      if (bits == 4) dequant_chunks_kernel<4, T><<<grid, kThreads, 0, current_stream()>>>(p, out);
      if (bits == 2) dequant_chunks_kernel<2, T><<<grid, kThreads, 0, current_stream()>>>(p, out);
    } else {
      dequant_weight_kernel<<<grid_for(sh.N * sh.K, kThreads), kThreads, 0, current_stream()>>>(
          p, static_cast<int>(bits), out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor y = b.defined() ? at::addmm(b.to(x.scalar_type()), x2, wd.t()) : at::mm(x2, wd.t());
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(linquant, CUDA, m) { m.impl("linear", &linear_cuda); }
// No tensor arguments: the kernel that runs for an empty dispatch key set.
TORCH_LIBRARY_IMPL(linquant, CompositeExplicitAutograd, m) {
  m.impl("_cuda_linear_dispatch", &set_dispatch);
  m.impl("_cuda_has_hopper_gemm", &has_hopper_gemm);
}

}  // namespace linquant::cuda
