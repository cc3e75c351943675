// Table of the bit-packing CPU inner loops for one instruction set, filled by
// pack_kernels_isa.cpp (compiled once per ISA) and chosen at run time by pack_kernels().
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace linquant::cpu {

struct PackKernels {
  // Returns the OR of the packed values (out of range for `bits` when it has higher bits set).
  using PackFn = uint8_t (*)(const uint8_t* q, int64_t n, uint8_t* out);
  using UnpackFn = void (*)(const uint8_t* packed, int64_t n, uint8_t* q);

  PackFn pack[9];  // [bits], 1..8
  UnpackFn unpack[9];
};

const PackKernels& pack_kernels_baseline();
const PackKernels& pack_kernels_avx2();
const PackKernels& pack_kernels_avx512();

inline const PackKernels& pack_kernels() { return LINQUANT_PICK_ISA(pack_kernels); }

}  // namespace linquant::cpu
