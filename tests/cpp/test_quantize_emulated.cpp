// The CUDA kernels of choose_qparams / quantize / dequantize / pack / unpack
// (cuda/quantize_kernels.cuh, cuda/pack_kernels.cuh) run on the host through the CUDA emulation
// (cuda_emulation/), compared bit for bit with the CPU kernels' own per-group and per-row
// computations (csrc/core): the grid-stride loops, the group and piece indexing, the warp
// reductions and the error flags. tests/python/test_cuda.py compares the real thing on a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "../../cuda/pack_kernels.cuh"
#include "../../cuda/quantize_kernels.cuh"
#include "../../csrc/core/quantize_span.h"

namespace {

using namespace linquant::cuda;
namespace core = linquant::core;
namespace emu = cuda_emulation;

struct Layout {
  int64_t rows, cols, group;
  int64_t groups() const { return cols == 0 ? 1 : (cols + group - 1) / group; }
};

template <typename T>
std::vector<T> random_input(int64_t n, unsigned seed, float spread) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.5f, spread);
  std::vector<T> x(n);
  for (auto& v : x) v = core::from_float<T>(dist(rng));
  return x;
}

// choose_qparams, quantize and dequantize of one layout against the CPU's span functions; Q is
// int8_t (symmetric) or uint8_t (asymmetric), as the ops store them.
template <typename T, typename Q>
void check_layout(const Layout& l, int bits, unsigned seed, float last_of_row = 0.0f) {
  constexpr bool symmetric = std::is_same_v<Q, int8_t>;
  const int64_t n = l.rows * l.cols, n_params = l.rows * l.groups();
  std::vector<T> x = random_input<T>(n, seed, 3.0f);
  // An extreme value as the last of each row (of its last group, and its last piece), if given.
  if (last_of_row != 0.0f) {
    for (int64_t row = 0; row < l.rows; ++row) x[row * l.cols + l.cols - 1] = core::from_float<T>(last_of_row);
  }

  // choose_qparams, as quantize.cu launches it (but a small grid, to exercise the strides).
  const Pieces pieces = make_pieces(l.cols, l.group, l.groups());
  const int64_t n_pieces = n_params * pieces.per_group;
  std::vector<float> lo(n_pieces), hi(n_pieces), scale(n_params);
  std::vector<int32_t> zero(n_params);
  unsigned flag = 0;
  emu::launch(dim3(3), dim3(64), minmax_kernel<T>, x.data(), pieces, n_pieces, lo.data(), hi.data(), &flag);
  emu::launch(dim3(2), dim3(32), qparams_kernel, lo.data(), hi.data(), pieces.per_group, n_params, bits, symmetric,
              scale.data(), zero.data(), &flag);
  ASSERT_EQ(flag, 0u);

  const core::QRange r = core::q_range(bits, symmetric);
  std::vector<Q> q(n), want_q(n);
  for (int64_t row = 0; row < l.rows; ++row) {
    for (int64_t j = 0; j < l.groups(); ++j) {
      const int64_t begin = row * l.cols + j * l.group, len = std::min(l.group, l.cols - j * l.group);
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
      uint32_t bad = 0;
      if (len > 0) core::minmax_span(x.data() + begin, len, &mn, &mx, &bad);
      if (mn > mx) mn = mx = 0.0f;
      const core::QParams qp = core::qparams_from_minmax(mn, mx, bits, symmetric);
      const int64_t u = row * l.groups() + j;
      ASSERT_EQ(scale[u], qp.scale) << "group " << u;
      ASSERT_EQ(zero[u], qp.zero_point) << "group " << u;
      if (len > 0) core::quantize_span(x.data() + begin, len, qp.scale, qp.zero_point, r, want_q.data() + begin, &bad);
    }
  }

  const GroupIndex gi{l.cols, l.group, l.groups()};
  emu::launch(dim3(2), dim3(128), quantize_kernel<T, Q>, x.data(), scale.data(),
              symmetric ? static_cast<const int32_t*>(nullptr) : zero.data(), q.data(), n, gi, r, &flag);
  ASSERT_EQ(flag, 0u);
  ASSERT_EQ(q, want_q);

  std::vector<T> back(n);
  emu::launch(dim3(2), dim3(128), dequantize_kernel<Q, T>, q.data(), scale.data(),
              symmetric ? static_cast<const int32_t*>(nullptr) : zero.data(), back.data(), n, gi);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t u = gi.of(i);
    const float want = core::dequantize_value(q[i], scale[u], symmetric ? 0 : zero[u]);
    ASSERT_EQ(core::to_float(back[i]), core::to_float(core::from_float<T>(want))) << "element " << i;
  }
}

TEST(QuantizeEmulated, MatchesTheCpuFormulas) {
  // Per-tensor (one long group split into pieces), per-channel rows, groups with a short last one.
  check_layout<float, int8_t>({1, 20000, 20000}, 8, 1);
  check_layout<core::half_t, uint8_t>({1, 20000, 20000}, 4, 2);
  check_layout<core::bf16_t, uint8_t>({7, 300, 300}, 8, 3);
  check_layout<float, int8_t>({5, 70, 32}, 4, 4);
  check_layout<core::half_t, uint8_t>({3, 50, 16}, 3, 5);
  check_layout<core::bf16_t, int8_t>({2, 33, 8}, 2, 6);
  check_layout<float, uint8_t>({4, 0, 0}, 8, 7);  // empty groups count as zeros
  // Groups of 3 pieces (20000 = 6667 + 6667 + 6666) and of 2 (10001 = 5001 + 5000), the group's
  // extreme its very last value.
  check_layout<float, uint8_t>({2, 20000, 20000}, 8, 8, 1000.0f);
  check_layout<core::bf16_t, int8_t>({1, 10001, 10001}, 4, 9, -1000.0f);
}

TEST(QuantizeEmulated, NonFiniteInputRaisesTheFlag) {
  std::vector<float> x(100, 1.0f);
  x[77] = std::numeric_limits<float>::quiet_NaN();
  const Pieces pieces = make_pieces(100, 100, 1);
  std::vector<float> lo(1), hi(1);
  unsigned flag = 0;
  emu::launch(dim3(1), dim3(32), minmax_kernel<float>, x.data(), pieces, int64_t{1}, lo.data(), hi.data(), &flag);
  EXPECT_EQ(flag, kNonFinite);
  std::vector<uint8_t> q(100);
  flag = 0;
  const float s = 1.0f;
  const int32_t z = 0;
  emu::launch(dim3(1), dim3(64), quantize_kernel<float, uint8_t>, x.data(), &s, &z, q.data(), int64_t{100},
              GroupIndex{100, 100, 1}, core::q_range(8, false), &flag);
  EXPECT_EQ(flag, kNonFinite);
}

// quantize_kernel checks each group's scale as its elements read it (quantize.cu skips the host
// check): a bad scale in any group, the short last one included, raises kBadScale, alongside
// kNonFinite when the input is bad too. (A NaN scale is left to the GPU test: on the host, the
// NaN it makes of the quotient has no defined conversion to int.)
TEST(QuantizeEmulated, BadScaleRaisesItsFlag) {
  const GroupIndex gi{70, 32, 3};  // 2 rows of groups 32, 32, 6
  std::vector<float> x(140, 0.5f);
  std::vector<uint8_t> q(140);
  const std::vector<int32_t> z(6, 1);
  const auto run = [&](const std::vector<float>& s) {
    unsigned flag = 0;
    emu::launch(dim3(2), dim3(32), quantize_kernel<float, uint8_t>, x.data(), s.data(), z.data(), q.data(),
                int64_t{140}, gi, core::q_range(4, false), &flag);
    return flag;
  };
  EXPECT_EQ(run(std::vector<float>(6, 0.25f)), 0u);
  EXPECT_EQ(q[139], 3);  // 0.5 / 0.25 + 1
  for (const float bad : {0.0f, -0.0f, -1.0f, std::numeric_limits<float>::infinity()}) {
    for (int u = 0; u < 6; ++u) {
      std::vector<float> s(6, 0.25f);
      s[u] = bad;
      EXPECT_EQ(run(s), kBadScale) << "scale " << bad << " in group " << u;
    }
  }
  std::vector<float> s(6, 0.25f);
  s[5] = 0.0f;
  x[3] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(run(s), kBadScale | kNonFinite);
}

template <int BITS>
void check_pack(int64_t rows, int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> value(0, (1 << BITS) - 1);
  std::vector<uint8_t> q(rows * n);
  for (auto& v : q) v = static_cast<uint8_t>(value(rng));
  const int64_t packed_n = core::packed_size(n, BITS);
  std::vector<uint8_t> packed(rows * packed_n), want(rows * packed_n);
  for (int64_t r = 0; r < rows; ++r) core::pack_row<BITS>(q.data() + r * n, n, want.data() + r * packed_n);
  unsigned flag = 0;
  emu::launch(dim3(2), dim3(64), pack_kernel<BITS>, q.data(), rows, n, packed.data(), packed_n, &flag);
  EXPECT_EQ(flag, 0u);
  ASSERT_EQ(packed, want) << BITS << " bits, n " << n;
  std::vector<uint8_t> back(rows * n);
  emu::launch(dim3(3), dim3(32), unpack_kernel<BITS>, packed.data(), rows, n, packed_n, back.data());
  ASSERT_EQ(back, q) << BITS << " bits, n " << n;
  if (BITS < 8) {  // one value out of range raises the flag
    q[rows * n / 2] = static_cast<uint8_t>(1 << BITS);
    emu::launch(dim3(2), dim3(64), pack_kernel<BITS>, q.data(), rows, n, packed.data(), packed_n, &flag);
    EXPECT_EQ(flag, 1u);
  }
}

TEST(PackEmulated, MatchesTheCpuRows) {
  for (int64_t n : {1, 7, 8, 13, 64, 1001}) {
    check_pack<1>(3, n, 1);
    check_pack<2>(3, n, 2);
    check_pack<3>(2, n, 3);
    check_pack<4>(3, n, 4);
    check_pack<5>(2, n, 5);
    check_pack<6>(2, n, 6);
    check_pack<7>(2, n, 7);
    check_pack<8>(2, n, 8);
  }
}

}  // namespace
