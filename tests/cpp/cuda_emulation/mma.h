// Host emulation of CUDA's WMMA (see cuda_emulation.h): every lane holds the whole 16x16 tile and
// does the whole operation, so the results are those of the documented semantics, whatever the
// hardware's fragment layout. Stores are made by lane 0 only (the kernels synchronize after them).
#pragma once

#include <type_traits>

#include "../../../csrc/core/float_convert.h"
#include "cuda_emulation.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16 * 16];  // v[r * 16 + c]: A is M x K, B is K x N, the accumulator M x N
};

template <typename Use, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const P* ptr, unsigned ldm) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      const P& e = std::is_same_v<Layout, row_major> ? ptr[r * ldm + c] : ptr[c * ldm + r];
      f.v[r * 16 + c] = linquant::core::to_float(e);
    }
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float value) {
  for (float& e : f.v) e = value;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float acc = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = acc;
    }
  }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.v[r * 16 + c];
    }
  }
}

}  // namespace nvcuda::wmma
