// Host emulation of CUDA (see cuda_emulation.h): bf16 as linquant's bit-exact storage type.
#pragma once
#include "../../../csrc/core/float_convert.h"
#include "cuda_emulation.h"

using __nv_bfloat16 = linquant::core::bf16_t;
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return linquant::core::from_float<__nv_bfloat16>(v); }
