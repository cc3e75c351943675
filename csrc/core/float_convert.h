// Torch-free fp16 / bf16 <-> fp32 conversions, bit-identical to c10::Half and c10::BFloat16
// (IEEE round-to-nearest-even). Written branch-free on plain integers and floats so that the
// compiler vectorizes loops that call them, and usable from host and device code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LQ_HD __host__ __device__ __forceinline__
#else
#define LQ_HD inline
#endif

// The CPU kernels are compiled once per instruction set (csrc/cpu/kernels_isa.cpp); each copy
// lives in its own inline namespace so the linker never merges an AVX-512 instantiation into
// code that must run on an older CPU.
#ifndef LINQUANT_CPU_ISA
#define LINQUANT_CPU_ISA generic
#endif

namespace linquant::core {
inline namespace LINQUANT_CPU_ISA {

LQ_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LQ_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Storage types: distinct structs so templates can dispatch on them.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

LQ_HD float to_float(float v) { return v; }

LQ_HD float to_float(bf16_t v) { return f32_from_bits(static_cast<uint32_t>(v.bits) << 16); }

// fp16 -> fp32: exact either way, one instruction on a GPU (kernels convert every fp16 activation
// and scale they read); on the host Maratyszcza's FP16 algorithm, the one c10::Half uses.
LQ_HD float to_float(half_t v) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#else
  const uint32_t w = static_cast<uint32_t>(v.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from_bits(result);
#endif
}

template <typename T>
LQ_HD T from_float(float f);

template <>
LQ_HD float from_float<float>(float f) {
  return f;
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
template <>
LQ_HD bf16_t from_float<bf16_t>(float f) {
  const uint32_t u = f32_bits(f);
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded)};
}

// fp32 -> fp16, round to nearest even: one instruction on a GPU; on the host Maratyszcza's FP16
// algorithm. The two agree on every value but NaN, whose payload bits may differ.
template <>
LQ_HD half_t from_float<half_t>(float f) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return half_t{h};
#else
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const float abs_f = f32_from_bits(w & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return half_t{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
#endif
}

// True when the float is NaN or +-Inf.
LQ_HD bool is_nonfinite(float f) { return (f32_bits(f) & 0x7F800000u) == 0x7F800000u; }

}  // namespace LINQUANT_CPU_ISA
}  // namespace linquant::core
