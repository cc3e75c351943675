// Host emulation of CUDA (see cuda_emulation.h): fp16 as linquant's bit-exact storage type.
#pragma once
#include "../../../csrc/core/float_convert.h"
#include "cuda_emulation.h"

using __half = linquant::core::half_t;
inline __half __float2half_rn(float v) { return linquant::core::from_float<__half>(v); }
