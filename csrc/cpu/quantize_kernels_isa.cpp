// Compiled once per instruction set: the build defines LINQUANT_CPU_ISA (baseline, avx2, avx512)
// and the matching -m flags for this file (CMakeLists.txt, "per-ISA kernels").
#include "../core/quantize_span.h"
#include "quantize_kernels.h"

namespace linquant::cpu {
namespace {

namespace core = linquant::core::LINQUANT_CPU_ISA;

template <typename T>
void minmax(const void* x, int64_t n, float* mn, float* mx, uint32_t* nonfinite) {
  core::minmax_span(static_cast<const T*>(x), n, mn, mx, nonfinite);
}

template <typename T, typename Q>
void quantize(const void* x, int64_t n, float s, int32_t z, int32_t qmin, int32_t qmax, void* q,
              uint32_t* nonfinite) {
  core::quantize_span(static_cast<const T*>(x), n, s, z, core::QRange{qmin, qmax},
                      static_cast<Q*>(q), nonfinite);
}

template <typename Q, typename T>
void dequantize(const void* q, int64_t n, float s, int32_t z, void* out) {
  core::dequantize_span(static_cast<const Q*>(q), n, s, z, static_cast<T*>(out));
}

using core::bf16_t;
using core::half_t;

const QuantizeKernels kTable = {
    {minmax<float>, minmax<half_t>, minmax<bf16_t>},
    {{quantize<float, int8_t>, quantize<float, uint8_t>},
     {quantize<half_t, int8_t>, quantize<half_t, uint8_t>},
     {quantize<bf16_t, int8_t>, quantize<bf16_t, uint8_t>}},
    {{dequantize<int8_t, float>, dequantize<int8_t, half_t>, dequantize<int8_t, bf16_t>},
     {dequantize<uint8_t, float>, dequantize<uint8_t, half_t>, dequantize<uint8_t, bf16_t>}},
};

}  // namespace

const QuantizeKernels& LINQUANT_ISA_NAME(quantize_kernels)() { return kTable; }

}  // namespace linquant::cpu
