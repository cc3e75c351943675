// Table of the quantize-family CPU inner loops for one instruction set, filled by
// quantize_kernels_isa.cpp (compiled once per ISA) and chosen at run time by quantize_kernels().
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace linquant::cpu {

enum FloatType { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum IntType { kInt8 = 0, kUInt8 = 1 };

struct QuantizeKernels {
  using MinMaxFn = void (*)(const void* x, int64_t n, float* mn, float* mx, uint32_t* nonfinite);
  using QuantizeFn = void (*)(const void* x, int64_t n, float s, int32_t z, int32_t qmin,
                              int32_t qmax, void* q, uint32_t* nonfinite);
  using DequantizeFn = void (*)(const void* q, int64_t n, float s, int32_t z, void* out);

  MinMaxFn minmax[3];             // [FloatType of x]
  QuantizeFn quantize[3][2];      // [FloatType of x][IntType of q]
  DequantizeFn dequantize[2][3];  // [IntType of q][FloatType of out]
};

// One table per ISA, each defined by its own compilation of quantize_kernels_isa.cpp.
const QuantizeKernels& quantize_kernels_baseline();
const QuantizeKernels& quantize_kernels_avx2();
const QuantizeKernels& quantize_kernels_avx512();

inline const QuantizeKernels& quantize_kernels() { return LINQUANT_PICK_ISA(quantize_kernels); }

}  // namespace linquant::cpu
