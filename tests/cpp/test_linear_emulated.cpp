// The CUDA linear kernels (cuda/linear_gemv.cuh, cuda/linear_mma.cuh) run whole on the host through
// a small CUDA emulation (cuda_emulation/): every block, warp and lane, the split-K tickets and
// the last-block reduction, against a float64 reference over awkward shapes, bits, zero points and
// dtypes. It cannot show timing or hardware-specific faults (tests/python/test_cuda.py on a GPU
// does), but it runs the kernels' own code everywhere the C++ tests run.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <type_traits>
#include <vector>

#include "../../cuda/linear_dequant.cuh"
#include "../../cuda/linear_gemv.cuh"
#include "../../cuda/linear_hopper_qparams.cuh"
#include "../../cuda/linear_mma.cuh"
#include "../../cuda/linear_tc_gemv.cuh"
#include "../../cuda/linear_tc_staged.cuh"

namespace {

using namespace linquant::cuda;
namespace core = linquant::core;
namespace emu = cuda_emulation;

// One weight in the quantized format, activations, and the float64 reference of x @ W_hat.T + b.
struct Problem {
  int bits;
  bool symmetric;
  int64_t M, N, K, group;  // group 0: per-channel
  std::vector<uint8_t> w;
  std::vector<float> scales, bias, x;
  std::vector<int32_t> zeros;
  LinearParams p;

  Problem(int bits_, bool symmetric_, int64_t m, int64_t n, int64_t k, int64_t group_, unsigned seed)
      : bits(bits_), symmetric(symmetric_), M(m), N(n), K(k) {
    std::mt19937 rng(seed);
    const int per_byte = 8 / bits;
    const int64_t row_bytes = (K * bits + 7) / 8;
    group = group_ > 0 ? group_ : row_bytes * per_byte;
    const int64_t groups = (K + group - 1) / group;
    // 16 spare bytes in front so tests can misalign the weight on purpose; none behind, so a
    // sanitizer build catches a read past the last row.
    w.resize(N * row_bytes + 16);
    std::uniform_int_distribution<int> byte(0, 255);
    for (uint8_t& b : w) b = static_cast<uint8_t>(byte(rng));
    std::uniform_real_distribution<float> sdist(0.01f, 0.1f), xdist(-1.0f, 1.0f);
    scales.resize(N * groups);
    for (float& s : scales) s = sdist(rng);
    if (!symmetric) {
      std::uniform_int_distribution<int> zdist(-3, (1 << bits) + 2);  // a few outside the q range
      zeros.resize(N * groups);
      for (int32_t& z : zeros) z = zdist(rng);
    }
    bias.resize(N);
    for (float& b : bias) b = xdist(rng);
    x.resize(M * K);
    for (float& v : x) v = xdist(rng);

    p.w = w.data() + 16;
    p.row_bytes = row_bytes;
    p.scales = {scales.data(), FloatArray::kF32};
    set_zero_points(p, bits, symmetric ? nullptr : zeros.data());
    p.bias = {bias.data(), FloatArray::kF32};
    p.M = M, p.N = N, p.K = K;
    set_groups(p, group, groups);
  }

  void misalign(int64_t bytes) { p.w = w.data() + 16 - bytes; }

  // Activations near float's limit (|x| up to 2e37) and scales 1000 times smaller: the kernels'
  // (q - z) x sums overflow, while x @ W_hat.T stays far from it.
  Problem& huge_activations() {
    for (float& v : x) v *= 2e37f;
    for (float& s : scales) s *= 1e-3f;
    return *this;
  }

  // Biases near the outputs' size (up to 1e35; with huge_activations): a recomputed output that
  // left out the bias would be off by far more than the tolerance.
  Problem& huge_bias() {
    for (float& b : bias) b *= 1e35f;
    return *this;
  }

  // Zero points anywhere in [-limit, limit] (asymmetric only).
  Problem& wide_zeros(int limit) {
    std::mt19937 rng(static_cast<unsigned>(limit));
    std::uniform_int_distribution<int> zdist(-limit, limit);
    for (int32_t& z : zeros) z = zdist(rng);
    return *this;
  }

  // Symmetric weights as quantize makes them (q - z >= -2^(bits-1) + 1, since |w| <= s qmax),
  // the row's padding values past K zero as pack writes them, and scales so large that
  // s (0 - z), what a padding value dequantizes to, is past fp16's range (65504) while every
  // weight within K is not; activations small enough for y to stay far from it.
  Problem& near_fp16_limit() {
    const int per_byte = 8 / bits, z = 1 << (bits - 1);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < p.row_bytes * per_byte; ++k) {
        uint8_t& b = w[16 + n * p.row_bytes + k / per_byte];
        const int shift = static_cast<int>(k % per_byte) * bits, q = (b >> shift) & ((1 << bits) - 1);
        const int want = k >= K ? 0 : q == 0 ? 1 : q;
        b = static_cast<uint8_t>((b & ~(((1 << bits) - 1) << shift)) | (want << shift));
      }
    }
    for (float& s : scales) s = 65504.0f / (static_cast<float>(z) - 0.5f);
    for (float& v : x) v *= 1e-4f;
    return *this;
  }

  // Scales and bias stored in 16-bit floats, as a model in that dtype stores them (the reference
  // keeps the rounded values): S for the scales, the other 16-bit type for the bias.
  std::vector<uint16_t> scales16, bias16;
  template <typename S>
  Problem& params_in() {
    using B = std::conditional_t<std::is_same_v<S, core::half_t>, core::bf16_t, core::half_t>;
    for (float& v : scales) scales16.push_back(core::from_float<S>(v).bits), v = core::to_float(S{scales16.back()});
    for (float& v : bias) bias16.push_back(core::from_float<B>(v).bits), v = core::to_float(B{bias16.back()});
    const auto kind = [](bool half) { return half ? FloatArray::kF16 : FloatArray::kBF16; };
    p.scales = {scales16.data(), kind(std::is_same_v<S, core::half_t>)};
    p.bias = {bias16.data(), kind(std::is_same_v<B, core::half_t>)};
    return *this;
  }
  Problem& half_params() { return params_in<core::half_t>(); }

  // x rounded to the activation storage type T, as the kernels see it.
  template <typename T>
  std::vector<T> activations() const {
    std::vector<T> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = core::from_float<T>(x[i]);
    return out;
  }

  double weight(int64_t n, int64_t k) const {
    const int per_byte = 8 / bits;
    const uint8_t b = p.w[n * p.row_bytes + k / per_byte];
    const int64_t u = n * p.groups + k / group;
    if (bits == 8 && symmetric) return static_cast<double>(scales[u]) * static_cast<int8_t>(b);
    const int q = (b >> ((k % per_byte) * bits)) & ((1 << bits) - 1);
    const int z = symmetric ? 1 << (bits - 1) : zeros[u];
    return static_cast<double>(scales[u]) * (q - z);
  }

  // |y - ref| <= rel * sum_k |x w| + the output's rounding, for every element.
  template <typename T>
  void expect_close(const std::vector<T>& y, double rel, double out_eps, const char* what) const {
    const std::vector<T> xs = activations<T>();
    int bad = 0;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double ref = bias[n], mag = std::fabs(bias[n]);
        for (int64_t k = 0; k < K; ++k) {
          const double xv = core::to_float(xs[m * K + k]);
          ref += xv * weight(n, k);
          mag += std::fabs(xv * weight(n, k));
        }
        const double got = core::to_float(y[m * N + n]);
        if (!(std::fabs(got - ref) <= rel * mag + out_eps * std::fabs(ref) + 1e-30) && ++bad <= 5) {
          ADD_FAILURE() << what << ": y[" << m << ", " << n << "] = " << got << ", want " << ref << " (bits " << bits
                        << (symmetric ? " sym" : " asym") << ", M " << M << " N " << N << " K " << K << " group "
                        << group << ")";
        }
      }
    }
  }
};

template <typename T>
constexpr double eps() {
  return std::is_same_v<T, float> ? 0x1p-23 : std::is_same_v<T, core::half_t> ? 0x1p-10 : 0x1p-7;
}

// The split-K kernels leave their tickets at 0, so the host keeps one ticket buffer per stream.
void expect_tickets_reset(const std::vector<int>& tickets) {
  for (size_t i = 0; i < tickets.size(); ++i) EXPECT_EQ(tickets[i], 0) << "ticket " << i << " not reset";
}

// gemv_kernel<BITS, VEC, MT>, with `sms` multiprocessors deciding the K split as on a GPU.
template <int BITS, int VEC, int MT, typename T>
void run_gemv(const Problem& pr, int sms) {
  using G = GemvGrid<BITS, VEC, MT>;
  ASSERT_EQ(gemv_chunk_bytes(pr.p, BITS), VEC);
  const int64_t blocks = G::row_blocks(pr.N), steps = G::steps(pr.p.row_bytes);
  const SplitK k = split_k(blocks, steps, sms);
  const std::vector<T> x = pr.activations<T>();
  std::vector<int> tickets(blocks, 0);
  for (int run = 0; run < (k.splits > 1 ? 2 : 1); ++run) {  // split K: again with the same tickets
    std::vector<T> y(pr.M * pr.N, core::from_float<T>(NAN));
    std::vector<float> partial(k.splits * pr.M * pr.N, NAN);
    emu::launch(dim3(blocks, k.splits), dim3(kGemvWarps * 32), gemv_kernel<BITS, VEC, MT, T>, pr.p, x.data(),
                y.data(), partial.data(), tickets.data(), steps, k.per_split);
    // fp32 sums over K (products of exact weights), then the output rounding.
    pr.expect_close(y, 0x1p-23 * (std::sqrt(static_cast<double>(pr.K)) + 8), eps<T>(),
                    k.splits > 1 ? "gemv (split K)" : "gemv");
    expect_tickets_reset(tickets);
  }
}

template <typename T>
void run_generic(const Problem& pr) {
  const std::vector<T> x = pr.activations<T>();
  std::vector<T> y(pr.M * pr.N, core::from_float<T>(NAN));
  emu::launch(dim3(2), dim3(64), gemv_generic_kernel<T>, pr.p, pr.bits, x.data(), y.data());
  pr.expect_close(y, 0x1p-23 * (std::sqrt(static_cast<double>(pr.K)) + 8), eps<T>(), "gemv_generic");
}

template <int BITS, int BM, typename T>
void run_mma(const Problem& pr, int sms) {
  ASSERT_TRUE(mma_supports(pr.p, BITS));
  const MmaGrid g = mma_grid<BM>(pr.p);
  const SplitK k = split_k(g.col_tiles * g.row_tiles, g.steps, sms);
  const std::vector<T> x = pr.activations<T>();
  std::vector<int> tickets(g.col_tiles * g.row_tiles, 0);
  for (int run = 0; run < (k.splits > 1 ? 2 : 1); ++run) {  // split K: again with the same tickets
    std::vector<T> y(pr.M * pr.N, core::from_float<T>(NAN));
    std::vector<float> partial(k.splits * pr.M * pr.N, NAN);
    emu::launch(dim3(g.row_tiles, g.col_tiles, k.splits), dim3(kMmaWarps * 32), mma_kernel<BITS, BM, T>, pr.p,
                x.data(), y.data(), partial.data(), tickets.data(), k.per_split);
    // Weights rounded once to T (relative eps(T)), then fp32 sums.
    pr.expect_close(y, eps<T>() + 0x1p-23 * (std::sqrt(static_cast<double>(pr.K)) + 8), eps<T>(),
                    k.splits > 1 ? "mma (split K)" : "mma");
    expect_tickets_reset(tickets);
  }
}

// tc_gemv_kernel<BITS, NF>: mma.sync's documented fragment layout through warp shuffles; INT as
// linear.cu chooses it (`integer`: the variant the layout must get).
template <int BITS, int NF, typename T>
void run_tc(const Problem& pr, int sms, bool integer) {
  const std::vector<T> x = pr.activations<T>();
  ASSERT_TRUE(tc_gemv_supports(pr.p, BITS, x.data()));
  ASSERT_EQ((tc_gemv_integer_steps<BITS, T>(pr.p)), integer);
  const auto kernel = integer ? tc_gemv_kernel<BITS, NF, T, true> : tc_gemv_kernel<BITS, NF, T, false>;
  const int64_t blocks = tc_gemv_blocks(pr.N), steps = tc_gemv_steps(pr.K);
  const SplitK k = split_k(blocks, steps, sms, tc_gemv_blocks_per_sm(NF));
  std::vector<int> tickets(blocks, 0);
  for (int run = 0; run < (k.splits > 1 ? 2 : 1); ++run) {  // split K: again with the same tickets
    std::vector<T> y(pr.M * pr.N, core::from_float<T>(NAN));
    std::vector<float> partial(k.splits * pr.M * pr.N, NAN);
    emu::launch(dim3(blocks, k.splits), dim3(kTcWarps * 32), kernel, pr.p, x.data(), y.data(), partial.data(),
                tickets.data(), static_cast<int>(k.per_split));
    pr.expect_close(y, eps<T>() + 0x1p-23 * (std::sqrt(static_cast<double>(pr.K)) + 8), eps<T>(),
                    k.splits > 1 ? "tc gemv (split K)" : "tc gemv");
    expect_tickets_reset(tickets);
  }
}

// tc_staged_kernel<BITS, NF>: the activations staged in shared memory between barriers.
template <int BITS, int NF, typename T>
void run_tc_staged(const Problem& pr, int sms) {
  const std::vector<T> x = pr.activations<T>();
  ASSERT_TRUE(tc_gemv_supports(pr.p, BITS, x.data()));
  const int64_t blocks = tc_gemv_blocks(pr.N), steps = tc_gemv_steps(pr.K);
  const SplitK k = split_k(blocks, steps, sms, kTcStagedBlocksPerSm);
  std::vector<int> tickets(blocks, 0);
  for (int run = 0; run < (k.splits > 1 ? 2 : 1); ++run) {  // split K: again with the same tickets
    std::vector<T> y(pr.M * pr.N, core::from_float<T>(NAN));
    std::vector<float> partial(k.splits * pr.M * pr.N, NAN);
    emu::launch(dim3(blocks, k.splits), dim3(kTcWarps * 32), tc_staged_kernel<BITS, NF, T>, pr.p, x.data(), y.data(),
                partial.data(), tickets.data(), static_cast<int>(k.per_split));
    pr.expect_close(y, eps<T>() + 0x1p-23 * (std::sqrt(static_cast<double>(pr.K)) + 8), eps<T>(),
                    k.splits > 1 ? "tc staged (split K)" : "tc staged");
    expect_tickets_reset(tickets);
  }
}

TEST(LinearEmulated, SplitCountIsTheNearestToTheBlocksAMultiprocessorHolds) {
  // 8192 rows of W4 at M = 1 (256 row blocks) on an H100's 132 SMs: one round, no reduction.
  EXPECT_EQ(split_k(256, 8, 132).splits, 1);
  EXPECT_EQ(split_k(128, 8, 132).splits, 2);  // 2.06 -> 2
  EXPECT_EQ(split_k(32, 8, 132).splits, 8);   // 8.25 -> 8
  EXPECT_EQ(split_k(1, 3, 132).splits, 3);    // never more splits than steps
  const SplitK k = split_k(7, 10, 14);        // 4 splits of 3, 3, 3 and 1 steps: each split has one
  EXPECT_EQ(k.splits, 4);
  EXPECT_EQ(k.per_split, 3);
  EXPECT_EQ(split_k(900, 64, 132).splits, 1);
  // 6 splits wanted of 10 steps: 2 steps each, which 5 splits cover (a sixth would have none).
  const SplitK five = split_k(4, 10, 12);
  EXPECT_EQ(five.splits, 5);
  EXPECT_EQ(five.per_split, 2);
  // The register tensor-core kernel's 128 blocks of 8192 rows, aiming at 4 blocks per SM.
  EXPECT_EQ(split_k(128, 64, 132, 4).splits, 4);  // 4.125 -> 4
}

TEST(LinearEmulated, GroupOfShiftsOrDivides) {
  LinearParams p;
  for (const auto [group, groups] : {std::pair<int64_t, int64_t>{128, 64}, {96, 10}, {1000, 1}, {1, 7}, {2, 3}}) {
    set_groups(p, group, groups);
    for (int64_t k : {int64_t{0}, int64_t{1}, int64_t{95}, int64_t{96}, int64_t{127}, int64_t{128}, int64_t{999},
                      int64_t{6}}) {
      if (k >= group * groups) continue;  // values of the row only
      EXPECT_EQ(p.group_of(k), k / group) << "group " << group << ", k " << k;
    }
  }
}

TEST(LinearEmulated, GemvFourBit) {
  // K ending inside a byte (zero-padded x), N not a multiple of the block's rows.
  run_gemv<4, 16, 1, core::half_t>(Problem(4, false, 1, 70, 2047, 128, 1), 1);
  run_gemv<4, 16, 1, core::bf16_t>(Problem(4, true, 1, 75, 2047, 64, 2), 1);
  run_gemv<4, 16, 2, float>(Problem(4, false, 2, 33, 1024, 0, 3).half_params(), 1);
  run_gemv<4, 16, 4, core::half_t>(Problem(4, false, 3, 20, 992, 32, 4), 1);
  run_gemv<4, 8, 8, core::half_t>(Problem(4, true, 7, 9, 48, 16, 5), 1);
  // K longer than one staged slice: a block walks several (the last one partial).
  run_gemv<4, 16, 1, core::half_t>(Problem(4, false, 1, 40, 20000, 128, 6), 1);
  // K split over blocks, the last block adding the splits up.
  run_gemv<4, 16, 1, core::half_t>(Problem(4, false, 1, 40, 20000, 128, 6), 64);
  run_gemv<4, 16, 1, core::bf16_t>(Problem(4, true, 1, 70, 20000, 64, 27).half_params(), 3);
  run_gemv<4, 16, 8, core::bf16_t>(Problem(4, false, 8, 40, 3008, 256, 7), 64);
  // A group size that is not a power of two (group_of divides instead of shifting), split K.
  run_gemv<4, 16, 1, core::half_t>(Problem(4, false, 1, 40, 2880, 96, 60), 16);
  // Fewer rows than a warp takes (its rows past N repeat row N - 1), and a last warp shifted back
  // over its neighbour's rows (5 rows: warps of rows 0-3 and 1-4), with and without split K.
  run_gemv<4, 16, 1, core::half_t>(Problem(4, false, 1, 3, 512, 128, 61), 1);
  run_gemv<4, 16, 1, core::bf16_t>(Problem(4, true, 1, 1, 4096, 64, 62), 8);
  run_gemv<4, 16, 2, core::half_t>(Problem(4, false, 2, 5, 1024, 128, 63), 1);
  run_gemv<4, 16, 2, core::half_t>(Problem(4, false, 2, 5, 4096, 128, 64), 16);
  // Fewer rows than a warp takes with two activation rows and no split: only rows [0, N) of each
  // activation row are written (a write past N lands on the next activation row's outputs).
  run_gemv<4, 16, 2, core::half_t>(Problem(4, false, 2, 3, 512, 128, 65), 1);
  // Rows of 100 bytes (a last group of 8 values) whose groups are 32 bytes: the rows, not the
  // groups, limit the chunk to 4 bytes.
  run_gemv<4, 4, 1, core::half_t>(Problem(4, false, 1, 9, 200, 64, 66), 1);
}

TEST(LinearEmulated, GemvChunkLimits) {
  // gemv_kernel's offsets within a warp's rows are 32-bit: rows over 2^27 bytes go to the generic
  // kernel. Only the parameters are read (no weight behind them).
  LinearParams p;
  p.w = reinterpret_cast<const uint8_t*>(uintptr_t{1} << 20);  // 16-byte aligned
  for (const int64_t row_bytes : {int64_t{1} << 27, (int64_t{1} << 27) + 16}) {
    p.row_bytes = row_bytes;
    set_groups(p, row_bytes * 2, 1);  // 4 bits, per-channel
    EXPECT_EQ(gemv_chunk_bytes(p, 4), row_bytes > (int64_t{1} << 27) ? 0 : 16) << row_bytes;
  }
}

TEST(LinearEmulated, GemvEightAndTwoBit) {
  run_gemv<8, 16, 1, core::half_t>(Problem(8, true, 1, 50, 1008, 0, 8), 1);
  run_gemv<8, 16, 2, float>(Problem(8, false, 2, 50, 1024, 128, 9), 1);
  run_gemv<8, 4, 8, core::bf16_t>(Problem(8, true, 5, 30, 100, 4, 10), 64);
  run_gemv<8, 16, 4, core::half_t>(Problem(8, false, 4, 17, 9008, 64, 11), 64);
  run_gemv<2, 8, 1, core::half_t>(Problem(2, false, 1, 64, 4096, 32, 12), 64);
  run_gemv<2, 8, 2, core::bf16_t>(Problem(2, true, 2, 40, 1023, 0, 13), 1);
  run_gemv<2, 4, 8, float>(Problem(2, false, 6, 12, 400, 16, 14), 1);
}

TEST(LinearEmulated, OutputsThatOverflowAreComputedAgain) {
  // |x| ~ 1e36: (q - z) x summed over a chunk or a step overflows fp32, x @ W_hat.T does not.
  run_gemv<8, 16, 1, float>(Problem(8, false, 1, 24, 512, 128, 68).huge_activations(), 1);
  run_gemv<8, 16, 2, core::bf16_t>(Problem(8, true, 2, 24, 4096, 0, 69).huge_activations(), 16);  // split K
  run_tc<4, 1, core::bf16_t>(Problem(4, false, 3, 20, 128, 128, 70).huge_activations(), 1, true);  // one step
  run_tc<4, 1, core::bf16_t>(Problem(4, false, 2, 20, 1024, 0, 71).huge_activations(), 8, true);  // split K
  // The outputs computed again keep their bias (1e35 here, far past the tolerance).
  run_gemv<8, 16, 1, float>(Problem(8, false, 1, 24, 512, 128, 68).huge_activations().huge_bias(), 1);
  run_gemv<8, 16, 2, core::bf16_t>(Problem(8, true, 2, 24, 4096, 0, 69).huge_activations().huge_bias(), 16);
}

TEST(LinearEmulated, GemvUnalignedTakesNarrowerChunks) {
  Problem pr(4, false, 1, 24, 512, 128, 15);
  pr.misalign(4);  // 4-byte aligned only
  run_gemv<4, 4, 1, core::half_t>(pr, 1);
}

TEST(LinearEmulated, GenericGemv) {
  Problem odd(4, false, 3, 10, 5, 0, 16);  // rows of 3 bytes
  ASSERT_EQ(gemv_chunk_bytes(odd.p, 4), 0);
  run_generic<core::half_t>(odd);
  Problem group6(4, true, 8, 5, 30, 6, 17);  // a group of 3 bytes
  ASSERT_EQ(gemv_chunk_bytes(group6.p, 4), 0);
  run_generic<float>(group6);
  Problem unaligned(8, true, 1, 9, 64, 0, 18);
  unaligned.misalign(1);
  ASSERT_EQ(gemv_chunk_bytes(unaligned.p, 8), 0);
  run_generic<core::bf16_t>(unaligned);
  run_generic<core::half_t>(Problem(2, false, 2, 6, 13, 4, 19).half_params());
}

TEST(LinearEmulated, TensorCoreKernel) {
  run_mma<4, 16, core::half_t>(Problem(4, false, 9, 130, 256, 128, 20), 1);
  run_mma<4, 32, core::bf16_t>(Problem(4, true, 17, 64, 224, 32, 21), 1);  // K not a multiple of 64
  run_mma<8, 64, core::half_t>(Problem(8, true, 40, 129, 320, 0, 22), 1);
  run_mma<8, 16, core::bf16_t>(Problem(8, false, 12, 20, 96, 32, 23).half_params(), 1);
  run_mma<2, 64, core::half_t>(Problem(2, false, 65, 40, 256, 64, 24), 1);
  // Scales stored in the activation dtype: paired 16-bit dequantization (zero points past the
  // magic's range fall back to fp32 per chunk).
  run_mma<4, 16, core::half_t>(Problem(4, false, 16, 130, 256, 128, 34).params_in<core::half_t>(), 1);
  run_mma<8, 32, core::half_t>(Problem(8, true, 20, 64, 128, 0, 35).params_in<core::half_t>(), 1);
  run_mma<8, 16, core::half_t>(Problem(8, false, 9, 64, 128, 32, 36).wide_zeros(3000).params_in<core::half_t>(), 1);
  run_mma<2, 16, core::bf16_t>(Problem(2, false, 12, 40, 192, 64, 37).params_in<core::bf16_t>(), 1);
  run_mma<4, 64, core::bf16_t>(Problem(4, false, 70, 40, 256, 32, 38).wide_zeros(300).params_in<core::bf16_t>(), 4);
  // Many K steps: the ring of chunks in flight wraps several times and ends part way round.
  run_mma<4, 16, core::half_t>(Problem(4, true, 10, 50, 1344, 64, 39).params_in<core::half_t>(), 1);
  run_mma<8, 32, core::bf16_t>(Problem(8, false, 24, 30, 1216, 128, 40), 1);
  // Groups of 96 and of 160 values (not powers of two).
  run_mma<4, 32, core::half_t>(Problem(4, false, 20, 70, 960, 96, 61).params_in<core::half_t>(), 1);
  run_mma<8, 16, core::bf16_t>(Problem(8, false, 9, 40, 640, 160, 62), 1);
  // K ending inside a chunk: the padding values dequantize to -inf in fp16, which the zero
  // activations past K must not turn into NaN.
  run_mma<2, 16, core::half_t>(Problem(2, true, 12, 40, 30, 0, 63).near_fp16_limit(), 1);
  run_mma<4, 32, core::half_t>(Problem(4, true, 20, 24, 31, 0, 64).near_fp16_limit().params_in<core::half_t>(), 1);
  // Split K with the last-block reduction.
  run_mma<4, 16, core::half_t>(Problem(4, false, 16, 200, 1056, 128, 25), 8);
  run_mma<2, 32, core::bf16_t>(Problem(2, true, 20, 100, 512, 256, 26), 16);
  // Several row tiles and several column tiles (rows on the grid's x, columns on y), split K.
  run_mma<4, 16, core::half_t>(Problem(4, false, 40, 520, 512, 128, 41).params_in<core::half_t>(), 16);
}

TEST(LinearEmulated, TensorCoreKernelsRefuseLayoutsTheyCannotTake) {
  // Groups of 16 values: a 32-value chunk would span two scales.
  EXPECT_FALSE(mma_supports(Problem(4, false, 1, 8, 256, 16, 81).p, 4));
  EXPECT_FALSE(mma_supports(Problem(8, false, 1, 8, 256, 48, 82).p, 8));
  // Weights 4 bytes past a 16-byte boundary: the 16-byte (4-bit) and 8-byte (2-bit) chunk loads
  // need that alignment.
  Problem misaligned4(4, false, 1, 8, 256, 128, 83), misaligned2(2, false, 1, 8, 256, 128, 84);
  misaligned4.misalign(4);
  misaligned2.misalign(4);
  EXPECT_FALSE(mma_supports(misaligned4.p, 4));
  EXPECT_FALSE(mma_supports(misaligned2.p, 2));
  // K = 31: mma_kernel pads the chunk, but the register kernels read x a whole chunk at a time.
  Problem k31(4, true, 2, 8, 31, 0, 85);
  const std::vector<core::half_t> x = k31.activations<core::half_t>();
  EXPECT_TRUE(mma_supports(k31.p, 4));
  EXPECT_FALSE(tc_gemv_supports(k31.p, 4, x.data()));
}

// dequant_chunk_tc is dequant_chunk_to's values in tc_pair_order, bit for bit, for zero points
// inside and outside the magic's range (outside: the fp32 path, since magic + z is inexact in T).
template <int BITS, typename T, bool SCALED>
void check_tc_pairs(unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> word;
  std::uniform_int_distribution<int> zdist(-3000, 3000);
  std::uniform_real_distribution<float> sdist(0.01f, 0.1f);
  LinearParams p;
  p.scales.kind = MmaType<T>::kind;
  for (int trial = 0; trial < 3000; ++trial) {
    WeightChunk<BITS> c;
    for (uint32_t& w : c.w) w = word(rng);
    c.scale = core::from_float<T>(sdist(rng)).bits;
    c.z = trial < 600 ? trial - 300 : zdist(rng);  // every zero point near the bf16 magic's range
    uint32_t got[kMmaChunk / 2], want[kMmaChunk / 2];
    dequant_chunk_tc<BITS, T, SCALED>(p, c, true, got);
    dequant_chunk_to<BITS, T, SCALED>(p, c, true, want);
    tc_pair_order<BITS>(want);
    for (int i = 0; i < kMmaChunk / 2; ++i) {
      ASSERT_EQ(got[i], want[i]) << "pair " << i << ", z " << c.z << ", bits " << BITS << (SCALED ? " scaled" : "");
    }
  }
}

TEST(LinearEmulated, TensorCorePairsMatchDequantizedChunks) {
  check_tc_pairs<4, core::half_t, true>(86);
  check_tc_pairs<4, core::half_t, false>(87);
  check_tc_pairs<2, core::bf16_t, true>(88);
  check_tc_pairs<2, core::bf16_t, false>(89);
  check_tc_pairs<4, core::bf16_t, false>(90);
}

TEST(LinearEmulated, RegisterTensorCoreKernel) {
  // N not a multiple of the 16-row warp tile (nor of a block's 64), K ending inside a 128-value step.
  run_tc<4, 1, core::half_t>(Problem(4, false, 1, 70, 224, 32, 48).params_in<core::half_t>(), 1, false);
  run_tc<8, 2, core::bf16_t>(Problem(8, false, 16, 17, 128, 64, 51).params_in<core::bf16_t>(), 1, false);
  run_tc<2, 1, core::bf16_t>(Problem(2, false, 3, 30, 384, 64, 52).wide_zeros(300).params_in<core::bf16_t>(), 1,
                             false);
  run_tc<8, 1, core::bf16_t>(Problem(8, true, 5, 33, 256, 0, 55), 1, false);  // 8-bit bf16: scaled pairs
  run_tc<4, 1, core::half_t>(Problem(4, false, 2, 20, 768, 384, 67), 1, false);  // groups of 3 steps
  // Split K (and more steps than chunks in flight) with the last-block reduction.
  run_tc<2, 2, core::half_t>(Problem(2, true, 10, 16, 1024, 32, 54).params_in<core::half_t>(), 4, false);
}

TEST(LinearEmulated, RegisterTensorCoreKernelMultipliesIntegers) {
  // Steps within one group: per-channel, g128, g256 (a partial last group), scales in any dtype.
  run_tc<4, 2, core::bf16_t>(Problem(4, true, 13, 20, 256, 128, 49), 1, true);
  run_tc<8, 1, core::half_t>(Problem(8, true, 8, 24, 160, 0, 50), 1, true);
  run_tc<8, 1, core::half_t>(Problem(8, false, 1, 70, 640, 128, 56).params_in<core::bf16_t>(), 1, true);
  run_tc<4, 1, core::bf16_t>(Problem(4, false, 2, 40, 384, 256, 57).params_in<core::half_t>(), 1, true);
  run_tc<2, 2, core::half_t>(Problem(2, false, 11, 9, 512, 0, 58), 1, true);
  // K = 32: three lanes of four have no chunk at all; K = 224: a partial last step; N = 1.
  run_tc<4, 1, core::half_t>(Problem(4, false, 1, 1, 32, 0, 59), 1, true);
  run_tc<2, 1, core::bf16_t>(Problem(2, true, 4, 50, 224, 0, 60), 1, true);
  // Zero points past the magic's range: q - z from fp32, rounded once to T.
  run_tc<8, 1, core::half_t>(Problem(8, false, 3, 40, 512, 128, 63).wide_zeros(3000), 1, true);
  run_tc<4, 2, core::bf16_t>(Problem(4, false, 9, 24, 256, 128, 64).wide_zeros(300), 1, true);
  // Split K, the last split ending in a partial step, and more steps than chunks in flight.
  run_tc<4, 1, core::half_t>(Problem(4, false, 2, 40, 1280, 128, 53), 8, true);
  run_tc<2, 1, core::bf16_t>(Problem(2, false, 1, 64, 1056, 0, 65), 8, true);
  run_tc<8, 2, core::half_t>(Problem(8, true, 16, 30, 800, 0, 66).params_in<core::half_t>(), 4, true);
}

TEST(LinearEmulated, TensorCoreKernelWithStagedActivations) {
  // 17..64 rows (four and eight fragments, the last partly past M), N not a multiple of a block's
  // 64 rows, K ending inside a step, steps more than the weights in flight.
  run_tc_staged<4, 4, core::half_t>(Problem(4, false, 17, 70, 224, 32, 72).params_in<core::half_t>(), 1);
  run_tc_staged<4, 8, core::bf16_t>(Problem(4, true, 64, 20, 640, 128, 73).params_in<core::bf16_t>(), 1);
  run_tc_staged<8, 8, core::half_t>(Problem(8, true, 40, 24, 384, 0, 74), 1);  // fp32 scales: scaled in fp32
  run_tc_staged<8, 4, core::bf16_t>(Problem(8, false, 32, 17, 256, 64, 75).params_in<core::bf16_t>(), 1);
  run_tc_staged<2, 8, core::bf16_t>(Problem(2, false, 33, 30, 512, 64, 76).wide_zeros(300).params_in<core::bf16_t>(),
                                    1);
  // One step only (K = 96: a lane of four has none), and split K with the last-block reduction.
  run_tc_staged<2, 4, core::half_t>(Problem(2, true, 20, 16, 96, 32, 77).params_in<core::half_t>(), 1);
  run_tc_staged<4, 8, core::half_t>(Problem(4, false, 50, 40, 1280, 128, 78).params_in<core::half_t>(), 8);
}

// The cuBLAS path's dense weight: s * (q - z) rounded once to T, element for element.
template <typename T>
void run_dequant(const Problem& pr) {
  std::vector<T> w(pr.N * pr.K);
  emu::launch(dim3(3), dim3(64), dequant_weight_kernel<T>, pr.p, pr.bits, w.data());
  for (int64_t n = 0; n < pr.N; ++n) {
    for (int64_t k = 0; k < pr.K; ++k) {
      const float want = core::to_float(core::from_float<T>(static_cast<float>(pr.weight(n, k))));
      ASSERT_EQ(core::to_float(w[n * pr.K + k]), want) << "w[" << n << ", " << k << "], bits " << pr.bits;
    }
  }
}

// The same through dequant_chunks_kernel (layouts of whole 32-value chunks).
template <int BITS, typename T>
void run_dequant_chunks(const Problem& pr) {
  ASSERT_TRUE(mma_supports(pr.p, BITS));
  std::vector<T> w(pr.N * pr.K + 32, core::from_float<T>(NAN));  // 32 values behind, which stay NaN
  emu::launch(dim3(3), dim3(64), dequant_chunks_kernel<BITS, T>, pr.p, w.data());
  for (int64_t i = pr.N * pr.K; i < pr.N * pr.K + 32; ++i) {
    ASSERT_TRUE(std::isnan(core::to_float(w[i]))) << "w written " << i - pr.N * pr.K << " values past the matrix";
  }
  for (int64_t n = 0; n < pr.N; ++n) {
    for (int64_t k = 0; k < pr.K; ++k) {
      const float want = core::to_float(core::from_float<T>(static_cast<float>(pr.weight(n, k))));
      ASSERT_EQ(core::to_float(w[n * pr.K + k]), want) << "w[" << n << ", " << k << "], bits " << BITS;
    }
  }
}

TEST(LinearEmulated, DequantizedWeightByChunks) {
  run_dequant_chunks<8, float>(Problem(8, true, 1, 7, 64, 0, 41));
  run_dequant_chunks<8, core::bf16_t>(Problem(8, false, 1, 5, 96, 32, 42).params_in<core::bf16_t>());
  run_dequant_chunks<4, core::half_t>(Problem(4, false, 1, 9, 256, 128, 43).params_in<core::half_t>());
  run_dequant_chunks<4, core::half_t>(Problem(4, false, 1, 4, 128, 64, 44).wide_zeros(3000).params_in<core::half_t>());
  run_dequant_chunks<4, core::bf16_t>(Problem(4, true, 1, 6, 31, 0, 45));  // K = 31: the row's chunk reaches past K
  run_dequant_chunks<2, core::half_t>(Problem(2, true, 1, 3, 190, 64, 46));  // K = 190: value-by-value stores
  run_dequant_chunks<2, float>(Problem(2, false, 1, 5, 128, 32, 47).half_params());
  // Zero points past 2^23 (passed by hand): q - z in integers, as the CPU computes it.
  run_dequant_chunks<4, float>(Problem(4, false, 1, 6, 128, 32, 79).wide_zeros((1 << 24) - 16));
  run_dequant_chunks<8, core::half_t>(Problem(8, false, 1, 4, 96, 32, 80).wide_zeros((1 << 24) - 256));
}

// The Hopper GEMM's view of the format: each weight byte read as the CUTLASS matrix type
// hopper_weight_type names (signed int8, or unsigned values, lowest index in the lowest bits), and
// converted as CUTLASS converts it, fma(q, s, z') in fp32 from the [G, N] arrays
// hopper_qparams_kernel writes, must be s * (q - z) up to fp32 rounding.
void run_hopper_qparams(const Problem& pr) {
  const LinearParams& p = pr.p;
  std::vector<float> scales(p.groups * p.N, NAN), zeros(p.groups * p.N, NAN);
  emu::launch(dim3(2), dim3(32), hopper_qparams_kernel, p, pr.bits, scales.data(), zeros.data());
  const hopper::WeightType type = hopper_weight_type(p, pr.bits);
  const int per_byte = 8 / pr.bits;
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t k = 0; k < p.K; ++k) {
      const uint8_t byte = p.w[n * p.row_bytes + k / per_byte];
      const int q = type == hopper::WeightType::kS8 ? static_cast<int8_t>(byte)
                                                     : (byte >> (k % per_byte * pr.bits)) & ((1 << pr.bits) - 1);
      const int64_t at = k / p.group * p.N + n;
      const double got = std::fma(static_cast<float>(q), scales[at], zeros[at]), want = pr.weight(n, k);
      // q * s exact in fp32's fma, z' = -s z rounded once, the sum rounded once.
      const double bound = (std::fabs(want) + 2 * std::fabs(zeros[at])) * 0x1p-24;
      ASSERT_LE(std::fabs(got - want), bound) << "w[" << n << ", " << k << "], bits " << pr.bits << ", "
                                               << (pr.symmetric ? "symmetric" : "asymmetric");
    }
  }
}

TEST(LinearEmulated, HopperGemmScalesAndZeroPoints) {
  run_hopper_qparams(Problem(8, true, 1, 7, 96, 0, 51));
  run_hopper_qparams(Problem(8, false, 1, 9, 320, 128, 52));
  run_hopper_qparams(Problem(4, true, 1, 16, 320, 64, 53).half_params());
  run_hopper_qparams(Problem(4, false, 1, 8, 256, 64, 54).wide_zeros(3000));
  run_hopper_qparams(Problem(2, true, 1, 5, 128, 0, 55).params_in<core::bf16_t>());
  run_hopper_qparams(Problem(2, false, 1, 40, 384, 256, 56));  // a last group cut short
  EXPECT_EQ(hopper_weight_type(Problem(8, true, 1, 1, 16, 0, 57).p, 8), hopper::WeightType::kS8);
  EXPECT_EQ(hopper_weight_type(Problem(8, false, 1, 1, 16, 0, 58).p, 8), hopper::WeightType::kU8);
}

TEST(LinearEmulated, DequantizedWeight) {
  run_dequant<float>(Problem(8, true, 1, 7, 33, 0, 28));
  run_dequant<core::half_t>(Problem(8, false, 1, 5, 40, 16, 29).half_params());
  run_dequant<core::bf16_t>(Problem(4, true, 1, 9, 37, 0, 30));
  run_dequant<float>(Problem(4, false, 1, 4, 70, 6, 31));
  run_dequant<core::half_t>(Problem(2, false, 1, 6, 45, 32, 32));
  run_dequant<float>(Problem(2, true, 1, 3, 11, 4, 33));
}

}  // namespace
